"""FP8 checkpoint formats: ``quantization_config`` → one normalized :class:`CheckpointFormat`.

Two on-disk conventions are understood (no vLLM import here):

* AutoFP8 / vLLM / Hugging Face "fp8" (``quant_method: "fp8"``): per-tensor ``weight_scale``
  (scalar) with ``activation_scheme`` static (adds a scalar ``input_scale``) or dynamic, or
  DeepSeek-style blocks (``weight_block_size: [128, 128]``, ``weight_scale_inv`` of shape
  ``[ceil(N/128), ceil(K/128)]``, dynamic activations only).
* compressed-tensors as llm-compressor writes it (``quant_method: "compressed-tensors"``,
  ``format: "float-quantized" | "naive-quantized"``): presets FP8 (static per-tensor weights and
  activations), FP8_DYNAMIC (per-channel ``weight_scale`` [N, 1], dynamic per-token activations),
  FP8_BLOCK (128x128 ``weight_scale``, dynamic 1x128 activation groups), and FP8 weight-only.
  The config is parsed with the compressed-tensors library's own pydantic models (imported
  lazily: the library pulls in transformers, which takes seconds).

Errors: :class:`CheckpointFormatError` (a ValueError) names the field, what was expected and
what was found. A compressed-tensors config that is valid but not FP8 (int8, int4, NVFP4, MXFP8,
...) raises :class:`NotFp8CheckpointError` instead, so the caller can leave it to vLLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..numerics import E4M3
from .scheme import PER_ROW, PER_TENSOR, ActivationQuant, Fp8Scheme, Granularity, blocks, check_ignore_patterns, match_ignore

#: Block shapes fp8-backend serves for block-quantized weights ([N block, K block]).
SUPPORTED_BLOCK_SIZES: tuple[tuple[int, int], ...] = ((128, 128),)

#: compressed-tensors storage formats whose FP8 weights are float8_e4m3fn tensors named ``weight``.
CT_FP8_FORMATS = ("float-quantized", "naive-quantized")

QUANT_METHODS = ("fp8", "compressed-tensors")
_FP8_ACTIVATION_SCHEMES = ("static", "dynamic")
_FP8_FMTS = ("e4m3", "e4m3fn")


class CheckpointFormatError(ValueError):
    """A checkpoint's config or tensors do not describe something fp8-backend can serve.

    The message names the field or tensor, what was expected and what was found.
    """


class NotFp8CheckpointError(ValueError):
    """A valid quantized checkpoint whose scheme is not FP8 (e.g. int8, int4 W4A16, NVFP4,
    MXFP8): not this plugin's to serve; the caller should leave it to vLLM. ``reason`` says what
    was found."""

    def __init__(self, reason: str, weight_kinds: tuple[str, ...] = ()):
        super().__init__(
            f"not an FP8 checkpoint fp8-backend serves: {reason}; leaving it to vLLM's own "
            f"quantization methods"
        )
        self.reason = reason
        #: the non-FP8 weight kinds found ("int8", "int4", "float4", "MXFP8", ...)
        self.weight_kinds = weight_kinds


@dataclass(frozen=True)
class KVCacheScheme:
    """Static FP8 scales for the attention K/V cache, as the checkpoint declares them.

    strategy: "tensor" (one k and one v scale per attention layer) or "head" (one per KV head,
    compressed-tensors' ``attn_head``).
    """

    strategy: str = "tensor"
    fp8_dtype: torch.dtype = E4M3


@dataclass(frozen=True)
class CheckpointFormat:
    """How the linear layers of an FP8 checkpoint are stored, normalized over formats.

    source: "fp8" (AutoFP8 / vLLM / HF fine-grained FP8) or "compressed-tensors".
    storage_format: "fp8", or the compressed-tensors format ("float-quantized" | "naive-quantized").
    scheme: the FP8 scheme of its layers (weight scale granularity: per-tensor scales stored as []
        or [1], per-channel as [N, 1] or [N], blocks as the grid [ceil(N/bn), ceil(K/bk)];
        activations: None for weight-only, static per-tensor ``input_scale``, or dynamic).
    ignore: layer names or patterns (exact / dotted suffix, "re:<regex>", globs) left unquantized.
    targets: compressed-tensors' config-group targets ("Linear" = every linear layer, names,
        "re:" patterns); ("Linear",) for the "fp8" format.
    kv_cache: static KV-cache scales declared by the config, or None.
    weight_scale_name / input_scale_name: the tensor names (after "<layer>.") to expect.
    scale_fmt: the "fp8" format's optional ``scale_fmt`` hint ("ue8m0": scales are powers of 2).
    notes: things the parser skipped that a caller may want to log once.
    """

    source: str
    storage_format: str
    scheme: Fp8Scheme
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("Linear",)
    kv_cache: KVCacheScheme | None = None
    weight_scale_name: str = "weight_scale"
    input_scale_name: str | None = None
    scale_fmt: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        w = self.scheme.weight
        if w.cols and (w.rows, w.cols) not in SUPPORTED_BLOCK_SIZES:
            raise CheckpointFormatError(
                f"CheckpointFormat.scheme.weight: expected per-tensor, per-channel or blocks "
                f"{[list(b) for b in SUPPORTED_BLOCK_SIZES]}, found {w}"
            )
        if (self.input_scale_name is not None) != self.scheme.static_activation:
            raise CheckpointFormatError(
                f"CheckpointFormat.input_scale_name: expected a name exactly when activations are "
                f"static, found {self.input_scale_name!r}"
            )

    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.scheme.dtype

    def tensor_names(self, prefix: str) -> dict[str, str]:
        """Full names of the tensors a quantized linear layer ``prefix`` must have, by role
        ("weight", "weight_scale", and "input_scale" when static)."""
        names = {"weight": f"{prefix}.weight", "weight_scale": f"{prefix}.{self.weight_scale_name}"}
        if self.input_scale_name is not None:
            names["input_scale"] = f"{prefix}.{self.input_scale_name}"
        return names

    @property
    def scalar_shape(self) -> tuple[int, ...]:
        """Shape a writer gives one scale (per-tensor weight, input and KV scales): [] in the
        "fp8" format, [1] in compressed-tensors (readers accept both)."""
        return () if self.source == "fp8" else (1,)

    @staticmethod
    def kv_scale_names(attention: str) -> dict[str, str]:
        """Names a writer gives the K/V-cache scales of attention module ``attention``, by role
        (readers also accept the older names of layer_tensors.KV_SCALE_SUFFIXES)."""
        return {"k": f"{attention}.k_scale", "v": f"{attention}.v_scale"}

    def weight_scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        """Shape a writer gives the fp32 weight scale of an [n, k] weight: the granularity's grid,
        one per-tensor scale as the format's scalar shape."""
        grid = self.scheme.weight.grid((n, k))
        return self.scalar_shape if self.scheme.weight == PER_TENSOR else grid

    def is_ignored(self, prefix: str, fused: Mapping[str, list[str]] | None = None) -> bool:
        """True if layer ``prefix`` stays unquantized by the ignore list. ``fused`` maps a fused
        layer's last name component to its shards (vLLM's packed_modules_mapping); shards that
        disagree raise ValueError, since one fused weight cannot be half quantized."""
        try:
            return match_ignore(prefix, list(self.ignore), dict(fused) if fused else None)
        except ValueError as e:
            raise CheckpointFormatError(f"quantization_config.{e}") from None

    def is_targeted(self, prefix: str, fused: Mapping[str, list[str]] | None = None,
                    module_classes: tuple[str, ...] = ("Linear",)) -> bool:
        """True if a config-group target covers layer ``prefix`` of a module whose class (or a
        base) is named in ``module_classes``; "Linear" stands for every linear layer."""
        names = [t for t in self.targets if t not in module_classes]
        if len(names) < len(self.targets):
            return True
        try:
            return match_ignore(prefix, names, dict(fused) if fused else None,
                                field="config_groups targets", verb="targeted")
        except ValueError as e:
            raise CheckpointFormatError(f"quantization_config.{e}") from None

    def is_quantized(self, prefix: str, fused: Mapping[str, list[str]] | None = None,
                     module_classes: tuple[str, ...] = ("Linear",)) -> bool:
        """True if linear layer ``prefix`` is stored in FP8 (targeted and not ignored)."""
        return self.is_targeted(prefix, fused, module_classes) and not self.is_ignored(prefix, fused)

    def describe(self) -> str:
        a = self.scheme.activation
        act = "weight-only" if a is None else f"{a.words()} activation scales"
        kv = f", static FP8 KV-cache scales (per-{self.kv_cache.strategy})" if self.kv_cache else ""
        return (f"FP8 e4m3 checkpoint ({self.source}, {self.storage_format}): "
                f"{self.scheme.weight.words()} scales, {act}{kv}")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def parse_quantization_config(cfg: Mapping[str, Any]) -> CheckpointFormat:
    """Parse a checkpoint's ``quantization_config`` (the dict under that key in config.json).

    Raises :class:`CheckpointFormatError` for configs that are malformed or that no FP8 path of
    this plugin can serve, :class:`NotFp8CheckpointError` for valid non-FP8 compressed-tensors
    configs.
    """
    if not isinstance(cfg, Mapping):
        raise CheckpointFormatError(
            f"quantization_config: expected a dict, found {type(cfg).__name__} {cfg!r:.80}"
        )
    if "quant_method" not in cfg:
        raise CheckpointFormatError(
            f"quantization_config.quant_method: required, expected one of {list(QUANT_METHODS)}; "
            f"found keys {sorted(cfg)}"
        )
    method = cfg["quant_method"]
    norm = method.lower() if isinstance(method, str) else method
    if norm == "fp8":
        return _parse_fp8(cfg)
    if norm == "compressed-tensors":
        return _parse_compressed_tensors(cfg)
    raise CheckpointFormatError(
        f"quantization_config.quant_method: expected one of {list(QUANT_METHODS)}, found {method!r}"
    )


# ----------------------------------------------------------------------------------------------
# AutoFP8 / vLLM / HF "fp8"
# ----------------------------------------------------------------------------------------------


def _name_list(cfg: Mapping[str, Any], key: str) -> list[str]:
    value = cfg.get(key)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CheckpointFormatError(
            f"quantization_config.{key}: expected a list of layer names or patterns, found {value!r:.120}"
        )
    return list(value)


def _check_ignore_patterns(field_name: str, patterns: list[str]) -> None:
    try:
        check_ignore_patterns(patterns, f"quantization_config.{field_name}")
    except ValueError as e:
        raise CheckpointFormatError(str(e)) from None


def _block_size(field_name: str, value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(v > 0 for v in value)
    ):
        raise CheckpointFormatError(
            f"{field_name}: expected two positive integers [N block, K block], "
            f"found {value!r}"
        )
    bs = (int(value[0]), int(value[1]))
    if bs not in SUPPORTED_BLOCK_SIZES:
        raise CheckpointFormatError(
            f"{field_name}: expected one of "
            f"{[list(b) for b in SUPPORTED_BLOCK_SIZES]} (block sizes fp8-backend serves), "
            f"found {list(bs)}"
        )
    return bs


def _parse_fp8(cfg: Mapping[str, Any]) -> CheckpointFormat:
    if "activation_scheme" not in cfg:
        raise CheckpointFormatError(
            f"quantization_config.activation_scheme: required for quant_method 'fp8', expected one "
            f"of {list(_FP8_ACTIVATION_SCHEMES)}; found keys {sorted(cfg)}"
        )
    act = cfg["activation_scheme"]
    if act not in _FP8_ACTIVATION_SCHEMES:
        raise CheckpointFormatError(
            f"quantization_config.activation_scheme: expected one of {list(_FP8_ACTIVATION_SCHEMES)}, "
            f"found {act!r}"
        )
    fmt = cfg.get("fmt")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in _FP8_FMTS):
        raise CheckpointFormatError(
            f"quantization_config.fmt: expected 'e4m3' (float8_e4m3fn weights), found {fmt!r}"
        )
    scale_fmt = cfg.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise CheckpointFormatError(
            f"quantization_config.scale_fmt: expected 'ue8m0' or absent, found {scale_fmt!r}"
        )
    # vLLM reads ignored_layers (AutoFP8) and falls back to modules_to_not_convert (HF); a
    # checkpoint naming both means both, so take the union.
    ignore = _name_list(cfg, "ignored_layers")
    ignore += [p for p in _name_list(cfg, "modules_to_not_convert") if p not in ignore]
    _check_ignore_patterns("ignored_layers", ignore)

    block = None
    if cfg.get("weight_block_size") is not None:
        block = _block_size("quantization_config.weight_block_size", cfg["weight_block_size"])
        if act != "dynamic":
            raise CheckpointFormatError(
                "quantization_config.activation_scheme: expected 'dynamic' with block-quantized "
                f"weights (weight_block_size {list(block)}), found {act!r}"
            )

    kv = cfg.get("kv_cache_scheme")
    if kv is None:
        kv_scheme = None
    elif kv == "static":  # AutoFP8: k_proj/v_proj.output_scale tensors
        kv_scheme = KVCacheScheme("tensor")
    elif isinstance(kv, Mapping):  # some writers put a compressed-tensors style dict here
        kv_scheme = _parse_ct_kv_cache(kv)
    else:
        raise CheckpointFormatError(
            f"quantization_config.kv_cache_scheme: expected 'static' or absent, found {kv!r}"
        )

    if block is not None:
        scheme = Fp8Scheme(blocks(*block), ActivationQuant(Granularity(1, block[1])))
    else:
        scheme = Fp8Scheme(PER_TENSOR, ActivationQuant(PER_TENSOR if act == "static" else PER_ROW, act == "static"))
    return CheckpointFormat(
        source="fp8",
        storage_format="fp8",
        scheme=scheme,
        ignore=tuple(ignore),
        kv_cache=kv_scheme,
        weight_scale_name="weight_scale_inv" if block is not None else "weight_scale",
        input_scale_name="input_scale" if act == "static" else None,
        scale_fmt=scale_fmt,
    )


# ----------------------------------------------------------------------------------------------
# compressed-tensors (llm-compressor)
# ----------------------------------------------------------------------------------------------


def _enum_values(field_name: str) -> list[Any] | None:
    from compressed_tensors.quantization import (
        QuantizationStatus,
        QuantizationStrategy,
        QuantizationType,
    )

    enums = {"strategy": QuantizationStrategy, "type": QuantizationType, "quantization_status": QuantizationStatus}
    if field_name in enums:
        return [e.value for e in enums[field_name]]
    if field_name == "dynamic":
        return [True, False, "local"]
    return None


def _pydantic_error(where: str, err: Exception) -> CheckpointFormatError:
    """Turn a pydantic ValidationError (or a validator's own ValueError) into one message:
    "<field path>: expected ..., found ..."."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return CheckpointFormatError(f"{where}: expected a scheme compressed-tensors accepts, found: {err}")
    parts = []
    for e in errors():
        loc = [str(x) for x in e.get("loc", ())]
        path = ".".join([where, *loc])
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        msg = re.sub(r"<\w+\.\w+: ('[^']*')>", r"\1", msg)  # <QuantizationStrategy.TOKEN: 'token'>
        found = e.get("input")
        if isinstance(found, Mapping):  # a whole args dict: show the fields that decide
            keys = ("type", "num_bits", "strategy", "dynamic", "group_size", "block_structure", "targets")
            found = {k: found[k] for k in keys if k in found}
        if e.get("type") == "extra_forbidden":
            expected = (
                "no such field (the installed compressed-tensors does not know it; a newer writer "
                "may have added it)"
            )
        elif loc and _enum_values(loc[-1]) is not None:
            expected = f"one of {_enum_values(loc[-1])}"
        else:
            expected = f"what compressed-tensors accepts ({msg})"
        parts.append(f"{path}: expected {expected}, found {found!r:.160}")
    return CheckpointFormatError("; ".join(parts))


def _args(where: str, value: Any):
    from compressed_tensors.quantization import QuantizationArgs

    if isinstance(value, QuantizationArgs):
        return value
    if not isinstance(value, Mapping):
        raise CheckpointFormatError(f"{where}: expected a dict of quantization args, found {value!r:.120}")
    try:
        return QuantizationArgs.model_validate(dict(value))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise _pydantic_error(where, e) from None


def _check_symmetric_fp8(where: str, args, context: str) -> None:
    """compressed-tensors QuantizationArgs that describe symmetric 8-bit floats."""
    if args.type != "float" or args.num_bits != 8:
        raise CheckpointFormatError(
            f"{where}: expected num_bits 8, type 'float' {context}, found num_bits "
            f"{args.num_bits}, type {args.type!r}"
        )
    if not args.symmetric:
        raise CheckpointFormatError(f"{where}.symmetric: expected true, found {args.symmetric!r}")


def _parse_ct_kv_cache(kv: Mapping[str, Any], where: str = "quantization_config.kv_cache_scheme") -> KVCacheScheme:
    args = _args(where, kv)
    _check_symmetric_fp8(where, args, "(FP8 KV cache)")
    if args.dynamic:
        raise CheckpointFormatError(
            f"{where}.dynamic: expected false (static k/v scales stored in the checkpoint), found {args.dynamic!r}"
        )
    strategies = {"tensor": "tensor", "attn_head": "head"}
    if args.strategy not in strategies:
        raise CheckpointFormatError(
            f"{where}.strategy: expected one of {list(strategies)}, found {args.strategy!r}"
        )
    return KVCacheScheme(strategies[args.strategy])


def _scheme_summary(s) -> str:
    w, a = s.weights, s.input_activations
    ws = "none" if w is None else f"{w.type}{w.num_bits} {w.strategy}"
    as_ = "none" if a is None else f"{a.type}{a.num_bits} {a.strategy} {'dynamic' if a.dynamic else 'static'}"
    return f"weights {ws}, input_activations {as_}"


def _is_mx(args) -> bool:
    return args.strategy == "group" and args.group_size == 32 and args.scale_dtype == torch.uint8


def _fp8_group(where: str, scheme, fmt: str | None) -> Fp8Scheme:
    """Map one FP8 compressed-tensors QuantizationScheme onto what this plugin serves."""
    w, a = scheme.weights, scheme.input_activations
    if fmt not in CT_FP8_FORMATS:
        found = "absent" if fmt is None else repr(fmt)
        hint = " (weights stored unquantized)" if fmt in ("dense", "fakequant") else ""
        raise CheckpointFormatError(
            f"{where}.format: expected one of {list(CT_FP8_FORMATS)} for FP8 weights, found {found}{hint}"
        )
    if not w.symmetric:
        raise CheckpointFormatError(f"{where}.weights.symmetric: expected true for FP8 weights, found false")
    if w.dynamic:
        raise CheckpointFormatError(
            f"{where}.weights.dynamic: expected false (scales stored in the checkpoint), found {w.dynamic!r}"
        )
    if w.strategy not in ("tensor", "channel", "block"):
        raise CheckpointFormatError(
            f"{where}.weights.strategy: expected one of ['tensor', 'channel', 'block'] for FP8 weights, "
            f"found {w.strategy!r}"
        )
    if w.actorder == "group":
        raise CheckpointFormatError(f"{where}.weights.actorder: expected null or 'weight', found 'group'")
    if w.scale_dtype is not None and w.scale_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointFormatError(
            f"{where}.weights.scale_dtype: expected float32, bfloat16 or float16, found {w.scale_dtype}"
        )
    block = _block_size(f"{where}.weights.block_structure", w.block_structure) if w.strategy == "block" else None
    if scheme.output_activations is not None:
        raise CheckpointFormatError(
            f"{where}.output_activations: expected null (output quantization is not supported), "
            f"found {_args_text(scheme.output_activations)}"
        )

    weight = {"tensor": PER_TENSOR, "channel": PER_ROW}.get(w.strategy) or blocks(*block)
    if a is None:
        return Fp8Scheme(weight)
    _check_symmetric_fp8(f"{where}.input_activations", a, "with FP8 weights")
    if a.dynamic is True:
        if a.strategy in ("token", "tensor"):
            act = ActivationQuant(PER_TENSOR if a.strategy == "tensor" else PER_ROW)
        elif a.strategy == "group":
            if block is None or a.group_size != block[1]:
                raise CheckpointFormatError(
                    f"{where}.input_activations.group_size: expected the weights' K block size "
                    f"({'but the weights are not block-quantized' if block is None else block[1]}) for "
                    f"dynamic activation groups, found group_size {a.group_size} with weights.strategy "
                    f"{w.strategy!r}"
                )
            act = ActivationQuant(Granularity(1, a.group_size))
        else:
            raise CheckpointFormatError(
                f"{where}.input_activations.strategy: expected 'token', 'tensor' or 'group' for dynamic "
                f"activations, found {a.strategy!r}"
            )
    elif a.dynamic is False:
        if a.strategy != "tensor":
            raise CheckpointFormatError(
                f"{where}.input_activations.strategy: expected 'tensor' for static activations, "
                f"found {a.strategy!r}"
            )
        act = ActivationQuant(PER_TENSOR, static=True)
    else:
        raise CheckpointFormatError(
            f"{where}.input_activations.dynamic: expected true or false, found {a.dynamic!r}"
        )
    if block is not None and act.static:
        raise CheckpointFormatError(
            f"{where}.input_activations.dynamic: expected true (block-quantized weights take dynamic "
            f"activations), found false"
        )
    return Fp8Scheme(weight, act)


def _args_text(args) -> str:
    return f"{args.type}{args.num_bits} {args.strategy}"


def _parse_compressed_tensors(cfg: Mapping[str, Any]) -> CheckpointFormat:
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        preset_name_to_scheme,
    )

    top = "quantization_config"
    groups = cfg.get("config_groups")
    if groups is None:
        raise CheckpointFormatError(
            f"{top}.config_groups: expected a dict of config groups (required for compressed-tensors), "
            f"found none"
        )
    if not isinstance(groups, Mapping):
        raise CheckpointFormatError(f"{top}.config_groups: expected a dict of groups, found {groups!r:.120}")

    sparsity = cfg.get("sparsity_config")
    if isinstance(sparsity, Mapping) and sparsity.get("format") not in (None, "dense"):
        raise CheckpointFormatError(
            f"{top}.sparsity_config: expected empty or format 'dense' (sparse weights are not "
            f"supported), found format {sparsity.get('format')!r}"
        )
    if cfg.get("transform_config"):
        raise CheckpointFormatError(
            f"{top}.transform_config: expected empty (SpinQuant/QuIP-style transforms are not "
            f"supported), found {cfg['transform_config']!r:.120}"
        )

    ignore = cfg.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise CheckpointFormatError(
            f"{top}.ignore: expected a list of layer names or 're:' patterns, found {ignore!r:.120}"
        )
    _check_ignore_patterns("ignore", ignore)

    # Each group through the library's QuantizationScheme (a list value names a preset).
    schemes: dict[str, Any] = {}
    for name, group in groups.items():
        where = f"{top}.config_groups.{name}"
        try:
            if isinstance(group, list):
                schemes[name] = preset_name_to_scheme(name, group)
            elif isinstance(group, Mapping):
                schemes[name] = QuantizationScheme.model_validate(dict(group))
            else:
                raise CheckpointFormatError(
                    f"{where}: expected a scheme dict or a list of targets of a preset, found {group!r:.120}"
                )
        except KeyError as e:
            raise CheckpointFormatError(
                f"{where}: expected a scheme dict, or a list of targets under a preset name "
                f"({e.args[0]}), found {group!r:.120}"
            ) from None
        except (ValueError, TypeError, NotImplementedError) as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise _pydantic_error(where, e) from None
        if not schemes[name].targets:
            raise CheckpointFormatError(f"{where}.targets: expected at least one target, found []")

    kv_raw = cfg.get("kv_cache_scheme")
    # The whole config through the library's QuantizationConfig as well (format, status, ...).
    whole = {k: v for k, v in cfg.items() if k not in ("config_groups", "kv_cache_scheme")}
    whole["config_groups"] = schemes
    try:
        QuantizationConfig.model_validate(whole)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise _pydantic_error(top, e) from None

    global_fmt = cfg.get("format")
    notes: list[str] = []
    fp8: dict[str, Fp8Scheme] = {}
    formats: dict[str, str] = {}
    other: list[str] = []
    kinds: list[str] = []
    targets: list[str] = []
    for name, s in schemes.items():
        where = f"{top}.config_groups.{name}"
        if len(s.targets) == 1 and s.targets[0].endswith("Attention"):
            notes.append(
                f"config group {name} quantizes {s.targets[0]} (attention); only its KV-cache "
                f"scales are used"
            )
            continue
        w = s.weights
        if w is None:
            if s.input_activations is None and s.output_activations is None:
                continue  # UNQUANTIZED
            other.append(f"{name}: activation-only quantization ({_scheme_summary(s)})")
            continue
        if w.type != "float" or w.num_bits != 8 or _is_mx(w):
            kind = "MXFP8" if w.type == "float" and w.num_bits == 8 else f"{w.type}{w.num_bits}"
            other.append(f"{name}: {kind} weights ({_scheme_summary(s)})")
            kinds.append(kind)
            continue
        fmt = s.format if s.format is not None else global_fmt
        if fmt == "mxfp8-quantized":
            other.append(f"{name}: MXFP8 weights (format mxfp8-quantized)")
            kinds.append("MXFP8")
            continue
        fp8[name] = _fp8_group(where, s, fmt)
        formats[name] = fmt
        targets += [t for t in s.targets if t not in targets]

    if other:
        what = "; ".join(other)
        if fp8:
            what = f"FP8 groups {sorted(fp8)} mixed with non-FP8 groups: {what}"
        raise NotFp8CheckpointError(f"compressed-tensors config_groups: {what}", tuple(kinds))
    if not fp8:
        kv_note = " (only kv_cache_scheme)" if kv_raw else ""
        raise NotFp8CheckpointError(f"compressed-tensors config with no quantized linear layers{kv_note}")

    distinct = set(fp8.values())
    if len(distinct) > 1:
        found = ", ".join(f"{n}: {g.describe()}" for n, g in fp8.items())
        raise CheckpointFormatError(
            f"{top}.config_groups: expected one FP8 scheme for all groups (fp8-backend serves one "
            f"per checkpoint), found {found}"
        )
    g = next(iter(distinct))
    kv_scheme = _parse_ct_kv_cache(kv_raw) if kv_raw is not None else None
    return CheckpointFormat(
        source="compressed-tensors",
        storage_format=next(iter(formats.values())),  # both store float8_e4m3fn "weight" tensors
        scheme=g,
        ignore=tuple(ignore),
        targets=tuple(targets),
        kv_cache=kv_scheme,
        weight_scale_name="weight_scale",
        input_scale_name="input_scale" if g.static_activation else None,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# Ignore lists against a model's module names
# ----------------------------------------------------------------------------------------------


def module_names(tensor_names) -> list[str]:
    """The module (layer) names that own ``tensor_names`` ("a.b.weight" → "a.b"), sorted."""
    return sorted({n.rsplit(".", 1)[0] for n in tensor_names if "." in n})


def unmatched_ignores(
    patterns, names, fused: Mapping[str, list[str]] | None = None
) -> list[str]:
    """The ignore patterns (same syntax as :meth:`CheckpointFormat.is_ignored`) that match none of
    the module ``names``. A pattern matching one shard of a fused name (``fused`` maps e.g.
    "qkv_proj" to ["q_proj", "k_proj", "v_proj"]) counts as matching.

    Note that ignore lists routinely name "lm_head", which a checkpoint with tied embeddings does
    not store: callers pass the model's module names, or treat "lm_head" as a warning.
    """
    candidates: list[str] = []
    for n in names:
        candidates.append(n)
        proj = n.rsplit(".", 1)[-1]
        if fused and proj in fused:
            base = n[: len(n) - len(proj)]
            candidates += [base + s for s in fused[proj]]
    return [p for p in patterns if not any(match_ignore(c, [p]) for c in candidates)]
