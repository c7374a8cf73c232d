"""A tiny random Qwen3-MoE (bf16) and FP8 copies of it in the Qwen3-FP8 layout, built locally.

The FP8 copy is what the published Qwen3-*-FP8 checkpoints look like: ``quant_method: fp8``,
``weight_block_size: [128, 128]``, dynamic activations, every linear weight (attention and each
expert's gate/up/down projection) F8_E4M3 with an fp32 ``weight_scale_inv`` block grid, and every
router named in full in ``modules_to_not_convert``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fp8_backend.testing.tiny_model import CORPUS  # noqa: F401  (same corpus as the dense tiny model)

# Expert width and hidden size are multiples of 128: vLLM's block-FP8 MoE requires it.
MOE_SHAPE = dict(hidden_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2)


def build_tiny_qwen3_moe(out: str | Path, num_layers: int = 2, seed: int = 0) -> Path:
    """config.json, model.safetensors (bf16) and the tiny tokenizer for a random Qwen3-MoE."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from fp8_backend.testing.tiny_model import build_tiny_llama

    out = Path(out)
    # The tokenizer of the dense tiny model (trained on the same corpus); its weights are replaced.
    build_tiny_llama(out, num_layers=1, hidden_size=64, intermediate_size=64, num_heads=2, num_kv_heads=1)
    for f in out.glob("*.safetensors"):
        f.unlink()
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=256,
        max_position_embeddings=2048,
        initializer_range=0.08,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        norm_topk_prob=True,
        **MOE_SHAPE,
    )
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    data = json.loads((out / "config.json").read_text())
    data.setdefault("rope_theta", 10000.0)
    data["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return out


def _is_fp8_linear(name: str) -> bool:
    return name.endswith(".weight") and any(
        p in name for p in (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", "_proj.")
    ) and ".mlp.gate." not in name


def fp8_block_copy(src: Path, dst: Path, ignore: list[str] | None = None) -> Path:
    """Qwen3-FP8-style copy of ``src``: 128x128 block FP8 for every projection, routers in
    ``modules_to_not_convert`` by full name (or ``ignore`` as given)."""
    from safetensors.torch import load_file, save_file

    from fp8_backend import numerics

    shutil.copytree(src, dst)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        out = {}
        for name, t in tensors.items():
            if _is_fp8_linear(name):
                q, s = numerics.quantize_block(t.float(), block_size=(128, 128))
                out[name] = q
                out[name[: -len("weight")] + "weight_scale_inv"] = s.float()
            else:
                out[name] = t
        save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ignore if ignore is not None
        else [f"model.layers.{i}.mlp.gate" for i in range(layers)],
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
