"""Checks on the expert tensors of a mixture-of-experts layer that need the whole checkpoint's
tensor names (no vLLM import). Per-tensor checks (dtype, finite scales) are layer_tensors'."""

from __future__ import annotations

import re
from typing import Iterable

from .checkpoint import CheckpointFormatError

#: config.json fields that give the number of routed experts, by model family.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_count_field(hf_config) -> tuple[str, int] | None:
    """(field name, value) of the first expert-count field config.json sets (a dict, or a
    transformers config: its serialized keys first, as config.json spells them), else None."""
    sources = [hf_config] if isinstance(hf_config, dict) else []
    if not isinstance(hf_config, dict):
        try:
            sources.append(hf_config.to_dict())
        except Exception:  # noqa: BLE001 - any config object: fall back to attributes
            pass
        sources.append({n: getattr(hf_config, n, None) for n in EXPERT_COUNT_FIELDS})
    for src in sources:
        for name in EXPERT_COUNT_FIELDS:
            v = src.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return name, v
    return None


def check_expert_indices(
    prefix: str, tensor_names: Iterable[str], num_experts: int, field: str = "num_experts"
) -> None:
    """Every per-expert tensor ``<prefix>.<j>.*`` of the checkpoint has j < ``num_experts``
    (config.json's ``field``). An expert the config does not declare would be dropped without a
    word by the loader (and one it declares but the checkpoint lacks is named at load)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    worst = None
    for name in tensor_names:
        m = pat.match(name)
        if m and int(m.group(1)) >= num_experts and (worst is None or int(m.group(1)) > worst[0]):
            worst = (int(m.group(1)), name)
    if worst is not None:
        raise CheckpointFormatError(
            f"{worst[1]}: expert {worst[0]} of {prefix}, but config.json declares {field}="
            f"{num_experts} (experts 0..{num_experts - 1}); expected the checkpoint's expert count "
            f"and config.json's to agree, found at least {worst[0] + 1} experts in the checkpoint"
        )


__all__ = ["EXPERT_COUNT_FIELDS", "check_expert_indices", "expert_count_field"]
