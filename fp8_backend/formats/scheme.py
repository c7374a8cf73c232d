"""One normalized description of what to quantize and how (no vLLM import)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

WEIGHT_STRATEGIES = ("tensor", "channel")
ACTIVATION_SCHEMES = ("none", "dynamic", "static")


@dataclass
class Fp8Scheme:
    """What the plugin does to each linear layer.

    weight_strategy: "tensor" (one scale per tensor; for fused q/k/v or gate/up layers one per
        shard, kept exact as a per-output-channel vector) or "channel" (one per output row).
    activation_scheme: "none" for online weight-only quantization; "dynamic" / "static" as
        declared by a checkpoint. On CPU activations stay 16-bit in every case (W8A16).
    online: True when weights arrive in 16-bit and are quantized while loading.
    ignore: layer names or patterns ("re:<regex>", fnmatch globs, exact or dotted-suffix names)
        that stay unquantized. lm_head is never quantized.
    """

    weight_strategy: str = "tensor"
    activation_scheme: str = "none"
    online: bool = True
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.weight_strategy not in WEIGHT_STRATEGIES:
            raise ValueError(
                f"weight_strategy: expected one of {WEIGHT_STRATEGIES}, found {self.weight_strategy!r}"
            )
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"activation_scheme: expected one of {ACTIVATION_SCHEMES}, found {self.activation_scheme!r}"
            )
        check_ignore_patterns(self.ignore)

    def describe(self) -> str:
        act = "16-bit activations" if self.activation_scheme == "none" else f"{self.activation_scheme} activation scales"
        src = "online from 16-bit weights" if self.online else "from an FP8 checkpoint"
        return f"FP8 e4m3 weights, per-{self.weight_strategy} scales, {act}, {src}"


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
