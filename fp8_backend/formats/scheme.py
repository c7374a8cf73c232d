"""The one scheme model (scale granularity as a block shape) and ignore-pattern matching (no
vLLM import)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from .. import numerics
from ..numerics import E4M3


@dataclass(frozen=True)
class Granularity:
    """Which elements share one FP8 scale, as a block shape (torchao's Float8Tensor idea).

    A tensor [..., R, C] gets one scale per ``rows`` x ``cols`` block of its last two dims; 0
    stands for the whole dimension, and a partial last block covers what is left. Leading dims
    (the experts of a mixture-of-experts weight, the batch dims of activations) each get their
    own grid. So per-tensor, per-channel (weights [N, K]), per-token (activations [M, K]),
    128x128 blocks and 1x128 activation groups are five shapes of one rule, not five cases.
    """

    rows: int = 0
    cols: int = 0

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Granularity.{name}: expected an integer >= 0 (0: the whole dim), found {v!r}")

    def block(self, shape) -> tuple[int, int]:
        """The concrete [rows, cols] block for a tensor of ``shape`` (0 resolved to the dim)."""
        r, c = int(shape[-2]), int(shape[-1])
        return (self.rows or max(r, 1), self.cols or max(c, 1))

    def grid(self, shape) -> tuple[int, int]:
        """Scales along the last two dims: [ceil(R / rows), ceil(C / cols)]."""
        (br, bc), r, c = self.block(shape), int(shape[-2]), int(shape[-1])
        return (max(-(-r // br), 1), max(-(-c // bc), 1))

    def scale_shape(self, shape) -> tuple[int, ...]:
        """Shape of the scale tensor of a tensor of ``shape``: leading dims, then the grid."""
        return (*(int(d) for d in shape[:-2]), *self.grid(shape))

    @property
    def whole_rows(self) -> bool:
        """One scale per row or coarser along C: the scale factors out of each row's dot product."""
        return self.cols == 0

    def words(self, role: str = "weight") -> str:
        """"per-tensor", "per-channel" (weights) / "per-token" (activations), "128x128 block",
        "1x128 group"."""
        if self == PER_TENSOR:
            return "per-tensor"
        if self == PER_ROW:
            return "per-channel" if role == "weight" else "per-token"
        if self.rows == 1 and role != "weight":
            return f"1x{self.cols} group"
        return f"{self.rows or 'all'}x{self.cols or 'all'} block"


#: One scale for the whole tensor.
PER_TENSOR = Granularity(0, 0)
#: One scale per row: per output channel of a weight [N, K], per token of activations [M, K].
PER_ROW = Granularity(1, 0)


def blocks(rows: int, cols: int) -> Granularity:
    """Block scales of ``rows`` x ``cols`` (DeepSeek-style 128x128 weights, 1x128 activation groups)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"blocks: expected two sizes >= 1, found {rows}x{cols}")
    return Granularity(rows, cols)


@dataclass(frozen=True)
class ActivationQuant:
    """How a linear layer's input is quantized to FP8: ``granularity`` over [tokens, K]
    (PER_TENSOR, PER_ROW = per token, or 1 x k groups) and ``static`` (a calibrated scale stored
    in the checkpoint, per tensor) or dynamic (computed from each input)."""

    granularity: Granularity = PER_ROW
    static: bool = False

    def __post_init__(self) -> None:
        if self.granularity.rows not in (0, 1) or (self.granularity.rows == 0 and self.granularity.cols):
            raise ValueError(
                f"ActivationQuant.granularity: expected per-tensor, per-token or 1 x k groups, "
                f"found {self.granularity}"
            )
        if self.static and self.granularity != PER_TENSOR:
            raise ValueError(
                f"ActivationQuant: static activation scales are per tensor, found "
                f"{self.granularity.words('activation')}"
            )

    def words(self) -> str:
        return f"{'static' if self.static else 'dynamic'} {self.granularity.words('activation')}"

    def fake_quantize(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., K] rounded to the FP8 grid as this quantization rounds it and scaled back,
        in x.dtype (numerics.fake_quantize): the static ``input_scale``, or dynamic scales per
        block of the granularity."""
        if self.static and input_scale is None:
            raise ValueError("ActivationQuant.fake_quantize: static activations need input_scale")
        x2 = x.reshape(-1, x.shape[-1])
        y = numerics.fake_quantize(x2, self.granularity.block(x2.shape), input_scale if self.static else None)
        return y.to(x.dtype).reshape(x.shape)


@dataclass(frozen=True)
class Fp8Scheme:
    """What FP8 means for a linear layer (or a mixture-of-experts layer's experts): the weights'
    scale granularity, the activations' quantization (None: weights only, activations stay
    16-bit) and the FP8 format. One model for the checkpoint parser and writer, the producer,
    online quantization and kernel choice. On CPU activations stay 16-bit in every case (W8A16);
    ``activation`` says what a W8A8 path does with them.
    """

    weight: Granularity = PER_TENSOR
    activation: ActivationQuant | None = None
    dtype: torch.dtype = E4M3

    def __post_init__(self) -> None:
        w, a = self.weight, self.activation
        if w.rows == 0 and w.cols:
            raise ValueError(f"Fp8Scheme.weight: expected per-tensor, per-channel or blocks, found {w}")
        if a is not None and a.granularity.cols and a.granularity.cols != w.cols:
            raise ValueError(
                f"Fp8Scheme.activation: 1x{a.granularity.cols} activation groups need weight blocks "
                f"with the same K size, found weights {w.words()}"
            )
        if a is not None and a.static and w.cols:
            raise ValueError(f"Fp8Scheme.activation: block weights take dynamic activations, found {a.words()}")

    @property
    def static_activation(self) -> bool:
        """Activations quantized with a calibrated scale the checkpoint stores (``input_scale``)."""
        return self.activation is not None and self.activation.static

    def w8a8_activation(self) -> ActivationQuant:
        """How a W8A8 kernel quantizes this layer's input: block weights take 1 x (K block)
        groups, static checkpoints their stored per-tensor scale, the rest per-token scales."""
        if self.weight.cols:
            return ActivationQuant(Granularity(1, self.weight.cols))
        if self.static_activation:
            return self.activation
        return ActivationQuant(PER_ROW)

    def describe(self) -> str:
        act = "16-bit activations" if self.activation is None else f"{self.activation.words()} activation scales"
        return f"FP8 e4m3 weights, {self.weight.words()} scales, {act}"


def check_ignore_patterns(patterns, field: str = "ignore") -> None:
    """Every pattern of an ignore list is a non-empty string, and a ``re:`` one a valid regex
    (ValueError naming the pattern otherwise): the one check for the configs and the producer."""
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{field}: expected layer names or patterns (non-empty str), found {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"{field}: expected 're:' + a valid regex, found {p!r} ({e})") from None


def _match_one(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None or re.match(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def match_ignore(
    prefix: str,
    patterns: list[str],
    fused: dict[str, list[str]] | None = None,
    *,
    field: str = "ignore",
    verb: str = "ignored",
) -> bool:
    """True if layer ``prefix`` matches ``patterns`` (an ignore list: it stays unquantized; or
    config-group targets).

    A fused layer (e.g. ``qkv_proj`` made of q/k/v_proj) matches if its own name does or all of
    its shards do; some but not all shards matching is an error (ValueError naming ``field``),
    since one fused weight cannot be half quantized.
    """
    if any(_match_one(prefix, p) for p in patterns):
        return True
    fused = fused or {}
    proj = prefix.rsplit(".", 1)[-1]
    if proj not in fused:
        return False
    base = prefix[: len(prefix) - len(proj)]
    hits = [any(_match_one(base + shard, p) for p in patterns) for shard in fused[proj]]
    if all(hits):
        return True
    if any(hits):
        raise ValueError(
            f"{field}: expected the shards {list(fused[proj])} of fused layer {prefix} all {verb} or "
            f"none (one fused weight cannot be half quantized), found {verb}: "
            f"{[s for s, h in zip(fused[proj], hits) if h]}"
        )
    return False


def moe_layer_ignored(layer: str, patterns: list[str], expert_projections: list[str], field: str = "ignore") -> bool:
    """True if mixture-of-experts layer ``layer`` (the experts module, e.g.
    ``model.layers.0.mlp.experts``) stays 16-bit: a pattern names the layer, or the patterns
    together name every one of its ``expert_projections`` (``<layer>.<e>.<proj>``, every expert
    and projection; a pattern naming the expert module ``<layer>.<e>`` names its projections).

    The layer's experts are one fused weight served one way (vLLM's FusedMoE, this plugin's
    kernel), so patterns that name some but not all of them (one expert, or only the down
    projections) raise ValueError naming the patterns and the layer: quantizing the others
    silently, or serving that expert in 16-bit, would both be wrong."""
    if any(_match_one(layer, p) for p in patterns):
        return True
    # A pattern naming an expert's module (``<layer>.3``) names its projections too. Models have
    # ~100 layers x 128+ experts x 3 projections and ignore lists of ~100 router names: a plain
    # name can only match here if it ends in a projection's name or an expert number.
    owners = [(n, n.rsplit(".", 1)[0]) for n in expert_projections]
    leaves = {n.rsplit(".", 1)[-1] for n in expert_projections}
    hits = {}
    for p in patterns:
        if p.startswith("re:"):
            rx = re.compile(p[3:])
            hits[p] = [n for n, e in owners if rx.match(n) or rx.match(e)]
        elif any(c in p for c in "*?["):
            hits[p] = [n for n, e in owners if fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(e, p)]
        elif p.rsplit(".", 1)[-1] in leaves or p.rsplit(".", 1)[-1].isdigit():
            hits[p] = [n for n, e in owners if _match_one(n, p) or _match_one(e, p)]
        else:
            hits[p] = []
    covered = {n for names in hits.values() for n in names}
    if not covered:
        return False
    if len(covered) == len(set(expert_projections)):
        return True
    some = [n for n in expert_projections if n in covered]
    raise ValueError(
        f"{field}: patterns {[p for p, h in hits.items() if h]} match {len(covered)} of the "
        f"{len(set(expert_projections))} expert projections of MoE layer {layer} (e.g. {some[:3]}); its "
        f"experts are served as one fused layer, so they are quantized or left 16-bit together: "
        f"ignore {layer!r} to keep them 16-bit"
    )
