"""Mixture-of-experts layers of a checkpoint: their per-expert linear weights, their routers.

The layout is read from the stored tensor names, the way vLLM loads them: one MoE layer ``M``
(e.g. ``model.layers.0.mlp.experts``) stores ``M.<e>.gate_proj / up_proj / down_proj.weight``
per expert ``e`` (Qwen-MoE, DeepSeek, ...; Mixtral's ``w1`` / ``w3`` / ``w2`` are the same
roles). Each such projection is quantized exactly like a dense linear layer, under its own name,
so a checkpoint stores ``M.<e>.<proj>.weight`` + ``weight_scale`` (``weight_scale_inv`` for
blocks in the AutoFP8 format) and, for static activations, ``input_scale``.

Routers stay 16-bit: their logits pick the experts, and every published FP8 MoE checkpoint
keeps them so. They are the siblings ``gate``, ``router`` and ``shared_expert_gate`` of the
experts module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..formats.scheme import match_ignore, moe_layer_ignored
from .options import QuantizeError

#: Checkpoint projection name -> role in the expert MLP (SiLU(gate) * up, then down).
EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
#: Router modules next to an experts module; they stay 16-bit.
ROUTERS = ("gate", "router", "shared_expert_gate")

_EXPERT_KEY = re.compile(r"^(?P<moe>.+\.experts)\.(?P<e>\d+)\.(?P<proj>%s)\.weight$" % "|".join(EXPERT_PROJ))


@dataclass
class MoeLayer:
    """One MoE layer of the checkpoint: ``name`` is the experts module (vLLM's FusedMoE prefix)."""

    name: str
    num_experts: int
    #: expert projection layer name ("M.3.up_proj") -> (expert, role)
    projections: dict[str, tuple[int, str]] = field(default_factory=dict)

    def by_role(self, role: str) -> list[str]:
        """The layer names of one role ("gate", "up", "down"), expert by expert."""
        return [n for n, (_, r) in sorted(self.projections.items(), key=lambda kv: kv[1][0]) if r == role]


def find_moe_layers(stored: set[str]) -> dict[str, MoeLayer]:
    """The MoE layers stored per expert, in name order. Raises QuantizeError for a layer whose
    experts are incomplete (an expert or a projection missing)."""
    found: dict[str, dict[str, tuple[int, str]]] = {}
    for key in stored:
        m = _EXPERT_KEY.match(key)
        if m:
            found.setdefault(m["moe"], {})[key[: -len(".weight")]] = (int(m["e"]), EXPERT_PROJ[m["proj"]])
    layers = {}
    for name in sorted(found, key=_natural):
        projs = found[name]
        experts = {e for e, _ in projs.values()}
        n = max(experts) + 1
        missing = [f"{name}.{e}.{role}" for e in range(n) for role in ("gate", "up", "down")
                   if (e, role) not in set(projs.values())]
        if missing:
            raise QuantizeError(
                f"model_dir: MoE layer {name}: expected gate / up / down projection weights for each of "
                f"experts 0..{n - 1}, found {len(missing)} missing (e.g. {missing[:3]})"
            )
        layers[name] = MoeLayer(name, n, projs)
    return layers


def routers(moe_names, stored: set[str]) -> list[str]:
    """The stored router layers next to each experts module (e.g. "model.layers.0.mlp.gate")."""
    out = []
    for name in moe_names:
        parent = name.rsplit(".", 1)[0]
        out += [f"{parent}.{r}" for r in ROUTERS if f"{parent}.{r}.weight" in stored]
    return out


def split_ignored(moe: dict[str, MoeLayer], patterns: list[str]) -> tuple[list[str], set[str]]:
    """(MoE layers left 16-bit by the ignore patterns, the patterns that matched any of them).

    One fused MoE layer is served as a whole, so a layer is ignored when a pattern names it (the
    experts module) or names every one of its expert projections; a pattern matching only some
    of them is an error."""
    ignored, used = [], set()
    for name, layer in moe.items():
        projections = sorted(layer.projections, key=_natural)
        used.update(p for p in patterns if match_ignore(name, [p]) or any(match_ignore(n, [p]) for n in projections))
        try:
            if moe_layer_ignored(name, patterns, projections):
                ignored.append(name)
        except ValueError as e:
            raise QuantizeError(str(e)) from None
    return ignored, used


def ignore_entries(name: str, compressed_tensors: bool) -> list[str]:
    """What the written ignore list names for an ignored MoE layer: the layer (vLLM's "fp8"
    config and this plugin match the FusedMoE prefix); compressed-tensors loaders match the
    expert projections ("M.0.gate_proj"), so a regex over them is added in that format."""
    if not compressed_tensors:
        return [name]
    return [name, f"re:{re.escape(name)}\\.\\d+\\.(gate_proj|up_proj|down_proj|w1|w2|w3)$"]


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
