"""The tensors of one FP8 linear layer (and KV-cache scale names), checked against a
:class:`~fp8_backend.formats.checkpoint.CheckpointFormat` before anything is served.

No vLLM import. Every error names the full tensor name, what was expected and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .checkpoint import CheckpointFormat, CheckpointFormatError, KVCacheScheme
from .scheme import Granularity

#: Scale tensors may be stored in these dtypes; they are returned as float32 (exactly).
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Tensors a quantized linear layer may carry besides weight and scales, and that loading drops:
# zero points of symmetric schemes (older llm-compressor writes them, all zero).
ZERO_POINTS = ("weight_zero_point", "input_zero_point")


@dataclass
class LayerTensors:
    """One linear layer's checkpoint tensors, validated and normalized.

    weight: float8_e4m3fn [N, K], as stored.
    weight_scale: float32 in the canonical shape: [] (tensor), [N, 1] (channel) or
        [ceil(N/bn), ceil(K/bk)] (block).
    input_scale: float32 [] for static activations, else None.
    unused: names of tensors that were given but that the scheme does not use (for example an
        ``input_scale`` in a dynamic checkpoint, or all-zero zero points); callers may log them.
    """

    prefix: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    unused: tuple[str, ...] = ()


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float8_e4m3fn: "float8_e4m3fn (F8_E4M3)"}.get(dt, str(dt).replace("torch.", ""))


def _local(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept keys as full names ("<prefix>.weight") or as local names ("weight")."""
    out: dict[str, torch.Tensor] = {}
    p = prefix + "."
    for k, v in tensors.items():
        out[k[len(p):] if k.startswith(p) else k] = v
    return out


def check_fp8_weight(
    name: str, w: torch.Tensor, fp8_dtype: torch.dtype, *, check_values: bool = True
) -> torch.Tensor:
    """An FP8 weight as the config declares it: dtype ``fp8_dtype`` and (``check_values``) no
    NaN encodings. Returned unchanged."""
    if not isinstance(w, torch.Tensor):
        raise CheckpointFormatError(f"{name}: expected a tensor, found {type(w).__name__}")
    if w.dtype != fp8_dtype:
        raise CheckpointFormatError(
            f"{name}: expected dtype {_dtype_name(fp8_dtype)} (the config declares FP8 "
            f"weights), found {_dtype_name(w.dtype)}; if this layer is meant to stay unquantized "
            f"it must be in the config's ignore list"
        )
    if check_values and w.numel():
        nan = (w.view(torch.uint8) & 0x7F) == 0x7F  # e4m3fn's only non-finite encodings
        if bool(nan.any()):
            raise CheckpointFormatError(
                f"{name}: expected finite FP8 values, found {int(nan.sum())} NaN encodings "
                f"(0x7F/0xFF) of {w.numel()}"
            )
    return w


def check_weight_shape(name: str, w: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a 2-D linear weight."""
    if w.dim() != 2:
        raise CheckpointFormatError(f"{name}: expected a 2-D [N, K] weight, found shape {list(w.shape)}")
    return int(w.shape[0]), int(w.shape[1])


def check_scale(name: str, t: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor as float32 (exact): a float dtype, every value finite and > 0.

    The one check of scale values: weight, input, expert and KV-cache scales all go through it."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointFormatError(f"{name}: expected a tensor, found {type(t).__name__}")
    if t.dtype not in SCALE_DTYPES:
        raise CheckpointFormatError(
            f"{name}: expected a float32, bfloat16 or float16 scale, found dtype {_dtype_name(t.dtype)}"
        )
    if t.numel() == 0:
        raise CheckpointFormatError(f"{name}: expected at least one scale, found an empty tensor of shape {list(t.shape)}")
    s = t.float()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        flat = s.reshape(-1)
        first = float(flat[int(bad.reshape(-1).nonzero()[0])])
        counts = ((int(torch.isnan(s).sum()), "NaN"), (int(torch.isinf(s).sum()), "Inf"),
                  (int((s <= 0).sum()), "<= 0"))
        detail = ", ".join(f"{c} {what}" for c, what in counts if c)
        example = f", e.g. {flat[bad.reshape(-1)][:4].tolist()}" if s.numel() > 1 else ""
        raise CheckpointFormatError(
            f"{name}: expected a finite scale > 0, found {first!r} ({int(bad.sum())} of "
            f"{s.numel()} scales: {detail}{example})"
        )
    return s


def check_scalar_scale(name: str, t: torch.Tensor, what: str = "per-tensor") -> torch.Tensor:
    """One scale (shape [] or [1]), checked by :func:`check_scale`, as a float32 []."""
    return _scalar(name, check_scale(name, t), what)


def stored_scale_shapes(granularity: Granularity, shape) -> tuple[tuple[int, ...], ...]:
    """Shapes a checkpoint may store the scale of a tensor of ``shape`` in, canonical first: the
    granularity's grid (leading dims kept); scales of whole rows may drop trailing 1s ([N, 1] as
    [N], one scale as [1] or [])."""
    canonical = granularity.scale_shape(shape)
    shapes = [canonical]
    while granularity.whole_rows and shapes[-1] and shapes[-1][-1] == 1:
        shapes.append(shapes[-1][:-1])
    return tuple(shapes)


def check_weight_scale(
    name: str, t: torch.Tensor, scheme: CheckpointFormat, n: int, k: int, *, check_values: bool = True
) -> torch.Tensor:
    """The weight scale of an [n, k] FP8 weight stored as ``scheme`` says, as float32 in the
    granularity's grid (:func:`stored_scale_shapes`: per-tensor [] or [1] -> [1, 1], per-channel
    [n, 1] or [n], block [ceil(n/bn), ceil(k/bk)], a partial last block allowed).
    ``check_values=False`` checks the shape only (values already checked)."""
    ws = check_scale(name, t) if check_values else t.float()
    g = scheme.scheme.weight
    accepted = stored_scale_shapes(g, (n, k))
    if tuple(ws.shape) not in accepted:
        alts = "".join(f" or {list(a)}" for a in accepted[1:])
        raise CheckpointFormatError(
            f"{name}: expected {g.words()} scales of shape {list(accepted[0])}{alts} for weight "
            f"{[n, k]}, found {list(ws.shape)}"
        )
    return ws.reshape(accepted[0])


def check_zero_point(name: str, t: torch.Tensor) -> None:
    """A zero point of a symmetric FP8 scheme (older llm-compressor writes them): all zeros."""
    if t.numel() and bool((t.float() != 0).any()):
        raise CheckpointFormatError(
            f"{name}: expected all zeros (symmetric FP8), found nonzero values "
            f"{t.float().flatten()[:4].tolist()}"
        )


def _scalar(name: str, t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() != 1:
        raise CheckpointFormatError(
            f"{name}: expected one {what} scale (shape [] or [1]), found shape {list(t.shape)}"
        )
    return t.reshape(())


# -- scale slots a loader fills ------------------------------------------------------------------

#: Scale parameters start as this float32 NaN (a payload of its own, told apart from a NaN stored
#: in a checkpoint, 0x7FC00000 as torch writes it) so that a slot no checkpoint tensor filled is
#: named "missing" after loading.
UNFILLED_SCALE_BITS = 0x7FC0BAD0


def unfilled_scales(*shape: int) -> torch.Tensor:
    """float32 scales of ``shape``, every slot marked unfilled."""
    return torch.full(shape, UNFILLED_SCALE_BITS, dtype=torch.int32).view(torch.float32)


def first_unfilled(s: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the first slot of ``s`` (made by :func:`unfilled_scales`) that no checkpoint
    tensor filled, or None when all were."""
    missing = s.contiguous().view(torch.int32) == UNFILLED_SCALE_BITS
    if not bool(missing.any()):
        return None
    return tuple(int(i) for i in missing.nonzero()[0])


def validate_layer_tensors(
    prefix: str,
    tensors: Mapping[str, torch.Tensor],
    scheme: CheckpointFormat,
    *,
    check_weight_values: bool = True,
) -> LayerTensors:
    """Check one quantized linear layer's tensors against ``scheme`` and normalize them.

    ``tensors`` holds the layer's tensors keyed by full name ("model.layers.0.mlp.up_proj.weight")
    or by local name ("weight"). Checks: the weight is float8_e4m3fn and 2-D (and, with
    ``check_weight_values``, holds no NaN encodings); the weight scale exists under the scheme's
    name with the strategy's shape (per-tensor [] or [1]; per-channel [N, 1] or [N]; block
    [ceil(N/bn), ceil(K/bk)], a partial last block allowed); ``input_scale`` is present and scalar
    when activations are static; every scale is finite and > 0 (bf16 / fp16 scales are converted
    to fp32 exactly); zero points, if present, are all zero.
    Raises :class:`CheckpointFormatError` naming the full tensor name, expected vs found.
    """
    t = _local(prefix, tensors)
    names = scheme.tensor_names(prefix)
    used = {"weight", "bias", scheme.weight_scale_name}

    # -- weight --------------------------------------------------------------------------------
    wname = names["weight"]
    if "weight" not in t:
        hint = ""
        if "weight_packed" in t:
            hint = " (found weight_packed: a packed int/FP4 checkpoint, not FP8)"
        raise CheckpointFormatError(
            f"{wname}: missing; expected a float8_e4m3fn (F8_E4M3) [N, K] weight{hint}; "
            f"found tensors {sorted(f'{prefix}.{k}' for k in t)}"
        )
    w = check_fp8_weight(wname, t["weight"], scheme.fp8_dtype, check_values=check_weight_values)
    n, k = check_weight_shape(wname, w)

    # -- weight scale ---------------------------------------------------------------------------
    sname = names["weight_scale"]
    if scheme.weight_scale_name not in t:
        others = ("weight_scale", "weight_scale_inv")
        other = next((o for o in others if o != scheme.weight_scale_name and o in t), None)
        hint = ""
        if other is not None:
            hint = (
                f" (found {prefix}.{other}: the config says {scheme.scheme.weight.words()} scales, "
                f"stored as {scheme.weight_scale_name} in the {scheme.source} format)"
            )
        raise CheckpointFormatError(
            f"{sname}: missing; expected the {scheme.scheme.weight.words()} weight scale of shape "
            f"{list(scheme.weight_scale_shape(n, k))} for weight {list(w.shape)}{hint}"
        )
    ws = check_weight_scale(sname, t[scheme.weight_scale_name], scheme, n, k)

    # -- input scale ----------------------------------------------------------------------------
    xs = None
    if scheme.input_scale_name is not None:
        iname = names["input_scale"]
        if scheme.input_scale_name not in t:
            raise CheckpointFormatError(
                f"{iname}: missing; expected a scalar per-tensor input scale (the config declares "
                f"static activations)"
            )
        xs = check_scalar_scale(iname, t[scheme.input_scale_name], "per-tensor input")
        used.add(scheme.input_scale_name)

    # -- zero points and anything else ---------------------------------------------------------
    for zp in ZERO_POINTS:
        if zp in t:
            check_zero_point(f"{prefix}.{zp}", t[zp])
    unused = tuple(sorted(f"{prefix}.{k}" for k in t if k not in used))
    return LayerTensors(prefix, w, ws, xs, unused)


# ----------------------------------------------------------------------------------------------
# KV-cache scales
# ----------------------------------------------------------------------------------------------

# Suffix → which scale, for the names checkpoints use for attention K/V scales:
#   self_attn.k_scale / v_scale         (compressed-tensors, vLLM, ModelOpt)
#   self_attn.k_proj.output_scale / ... (AutoFP8 and older llm-compressor)
#   self_attn.kv_scale                  (deprecated: one scale for both)
KV_SCALE_SUFFIXES = (
    (".k_proj.output_scale", "k"),
    (".v_proj.output_scale", "v"),
    (".k_scale", "k"),
    (".v_scale", "v"),
    (".kv_scale", "kv"),
)


def kv_scale_role(name: str) -> tuple[str, str] | None:
    """(attention module prefix, "k" | "v" | "kv") if tensor ``name`` is a KV-cache scale, else
    None. "model.layers.3.self_attn.k_proj.output_scale" → ("model.layers.3.self_attn", "k")."""
    for suffix, role in KV_SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


def validate_kv_scale(
    name: str, t: torch.Tensor, kv: KVCacheScheme | None = None, num_kv_heads: int | None = None
) -> torch.Tensor:
    """A KV-cache scale as float32: [] for per-tensor, [num_kv_heads] for per-head; finite, > 0."""
    s = check_scale(name, t)
    if kv is not None and kv.strategy == "head":
        if num_kv_heads is not None and s.numel() not in (1, num_kv_heads):
            raise CheckpointFormatError(
                f"{name}: expected per-head scales of shape [{num_kv_heads}] (or one scale), "
                f"found {list(s.shape)}"
            )
        return s.reshape(-1) if s.numel() > 1 else s.reshape(())
    return _scalar(name, s, "per-tensor KV-cache")


__all__ = [
    "KV_SCALE_SUFFIXES",
    "LayerTensors",
    "SCALE_DTYPES",
    "UNFILLED_SCALE_BITS",
    "ZERO_POINTS",
    "check_fp8_weight",
    "check_scalar_scale",
    "check_scale",
    "check_weight_scale",
    "check_weight_shape",
    "check_zero_point",
    "first_unfilled",
    "kv_scale_role",
    "unfilled_scales",
    "validate_kv_scale",
    "validate_layer_tensors",
]
