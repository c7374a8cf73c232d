"""Random Qwen3-MoE models built locally (a tokenizer trained here, random weights): tiny ones for
the tests, larger ones for the MoE speed benchmark."""

from __future__ import annotations

import json
from pathlib import Path


def tokenizer_dir(out: Path) -> int:
    """The dense tiny model's tokenizer in ``out`` (its weights removed); returns the vocabulary size."""
    from .tiny_model import build_tiny_llama

    build_tiny_llama(out, num_layers=1, hidden_size=64, intermediate_size=64, num_heads=2, num_kv_heads=1)
    for f in out.glob("*.safetensors"):
        f.unlink()
    return json.loads((out / "config.json").read_text())["vocab_size"]


def build_qwen3_moe(out: str | Path, num_layers: int = 2, hidden_size: int = 256, moe_intermediate_size: int = 128,
                    num_experts: int = 8, num_experts_per_tok: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    head_dim: int = 64, seed: int = 0, init_std: float = 0.08) -> Path:
    """config.json, model.safetensors (bf16) and the tokenizer of a random Qwen3-MoE in ``out``."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out)
    vocab = tokenizer_dir(out)
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, hidden_size=hidden_size,
        intermediate_size=2 * moe_intermediate_size, moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, max_position_embeddings=2048,
        initializer_range=init_std, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rope_theta=10000.0, norm_topk_prob=True,
    )
    return save_bf16(Qwen3MoeForCausalLM(cfg), out)


def save_bf16(model, out: Path) -> Path:
    """Save a transformers model in bf16 with the config fields vLLM 0.32 reads (rope_theta)."""
    import torch

    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    data = json.loads((out / "config.json").read_text())
    data.setdefault("rope_theta", 10000.0)
    data["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return out
