"""Which modules of a model are linear layers (quantized) and attention layers (KV scales).

The model is built from config.json on the meta device: no weights are read, no memory used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.checkpoint import unmatched_ignores
from ..formats.scheme import match_ignore


@dataclass(frozen=True)
class ModelLayers:
    linear: tuple[str, ...]  #: every nn.Linear module name (lm_head included)
    attention: tuple[str, ...]  #: modules owning k_proj and v_proj (get k_scale / v_scale)
    #: experts modules of mixture-of-experts blocks (name, number of experts); which of them the
    #: checkpoint stores per expert (and so get FP8) is read from the tensor names (experts.py)
    moe: tuple[tuple[str, int], ...] = ()


def _num_experts(module: torch.nn.Module) -> int | None:
    """Experts in a module named "experts" (transformers' convention for Mixtral, Qwen-MoE,
    DeepSeek, ...): a ModuleList of experts, or fused 3-D expert weights [E, ...]."""
    if isinstance(module, torch.nn.ModuleList):
        return len(module)
    n = getattr(module, "num_experts", None)
    if isinstance(n, int):
        return n
    dims = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3}
    return dims.pop() if len(dims) == 1 else None


def linear_modules(model: torch.nn.Module) -> ModelLayers:
    linear = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    attention = tuple(
        n for n, m in model.named_modules()
        if isinstance(getattr(m, "k_proj", None), torch.nn.Linear)
        and isinstance(getattr(m, "v_proj", None), torch.nn.Linear)
    )
    moe = []
    for n, m in model.named_modules():
        if n.rsplit(".", 1)[-1] == "experts":
            e = _num_experts(m)
            if e:
                moe.append((n, e))
    return ModelLayers(linear, attention, tuple(moe))


def model_layers(model_dir: Path) -> ModelLayers:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_modules(model)


def quantized_layers(layers: ModelLayers, ignore: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(quantized, ignored, unmatched patterns): linear layers split by the ignore patterns
    (same matching as the loader: exact / dotted suffix, globs, "re:")."""
    quant, ignored = [], []
    for n in layers.linear:
        (ignored if match_ignore(n, ignore) else quant).append(n)
    return quant, ignored, unmatched_ignores(ignore, layers.linear)
