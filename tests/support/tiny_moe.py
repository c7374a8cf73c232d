"""Tiny random mixture-of-experts models (bf16) and FP8 copies of them, built locally.

Models: Qwen3-MoE, Mixtral (experts w1/w2/w3 under block_sparse_moe, expert width 160: a partial
128-block), Qwen2-MoE (a shared expert and its shared_expert_gate besides the routed experts) and
DeepSeek-V3 (MLA attention, grouped top-k routing with sigmoid scores and a correction bias, a
shared expert, a dense first layer).

FP8 copies (:func:`fp8_copy`), every format fp8-backend reads, quantized with numerics.py:
"fp8-block" is what the published Qwen3-*-FP8 checkpoints look like (``quant_method: fp8``,
``weight_block_size: [128, 128]``, dynamic activations, fp32 ``weight_scale_inv`` grids, every
router named in full in ``modules_to_not_convert``); "fp8-tensor" AutoFP8's static per-tensor
layout (scalar weight_scale and input_scale), "fp8-tensor-dynamic" the same without input
scales; "ct-fp8", "ct-fp8-dynamic" and "ct-fp8-block"
llm-compressor's FP8 (per-tensor, static inputs), FP8_DYNAMIC (per-channel, bf16 scales) and
FP8_BLOCK presets with its usual ignore list (lm_head, routers, shared-expert gates).
:func:`dequantized_copy` turns any of them back into a bf16 checkpoint (the reference that
vLLM's own 16-bit MoE runs).

``python tiny_moe.py SPEC_JSON`` runs several engines in one process (see :func:`run_engines`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fp8_backend.testing.tiny_model import CORPUS  # noqa: F401  (same corpus as the dense tiny model)
from fp8_backend.testing.tiny_moe import build_qwen3_moe, save_bf16, tokenizer_dir

# Expert width and hidden size are multiples of 128: vLLM's block-FP8 MoE requires it.
MOE_SHAPE = dict(hidden_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2)


_COMMON = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.08,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)


def build_tiny_mixtral(out: str | Path, num_layers: int = 2, seed: int = 1) -> Path:
    """A random Mixtral: 8 experts, top-2, hidden 256, expert width 160 (not a multiple of 128)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    out = Path(out)
    vocab = tokenizer_dir(out)
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=256, intermediate_size=160, num_hidden_layers=num_layers,
                        num_local_experts=8, num_experts_per_tok=2, head_dim=64, **_COMMON)
    return save_bf16(MixtralForCausalLM(cfg), out)


def build_tiny_qwen2_moe(out: str | Path, num_layers: int = 2, seed: int = 2) -> Path:
    """A random Qwen2-MoE: 8 routed experts of width 128, top-2, one shared expert of width 192
    with its sigmoid shared_expert_gate."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    out = Path(out)
    vocab = tokenizer_dir(out)
    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=num_layers,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                         shared_expert_intermediate_size=192, norm_topk_prob=False, **_COMMON)
    return save_bf16(Qwen2MoeForCausalLM(cfg), out)


def build_tiny_deepseek_v3(out: str | Path, num_layers: int = 3, seed: int = 3) -> Path:
    """A random DeepSeek-V3: MLA attention (q and kv low-rank projections; latent 512 + rope 64,
    the one size vLLM's CPU MLA kernel is built for), layer 0 a dense MLP, then MoE layers of 8
    routed experts of width 128 in 2 groups (top-2 within the best group, sigmoid scores with
    e_score_correction_bias, routed_scaling_factor 2.5) and one shared expert."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    out = Path(out)
    vocab = tokenizer_dir(out)
    torch.manual_seed(seed)
    # Initializer 0.04, not 0.08: at 0.08 the random MLA attention alone moves prompt log-probs
    # by 0.26 nats mean under FP8 rounding (the experts by 0.03), far from any trained model.
    common = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"} | {"initializer_range": 0.04}
    cfg = DeepseekV3Config(vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=num_layers,
                           num_key_value_heads=4, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                           routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=128, kv_lora_rank=512,
                           qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=64, num_nextn_predict_layers=0,
                           **common)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a bias that changes which experts win, as trained ones do
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn_like(m.e_score_correction_bias) * 0.05)
    save_bf16(model, out)
    # DeepSeek-V3's config.json names its routing; vLLM reads these (softmax / no bias otherwise).
    data = json.loads((out / "config.json").read_text())
    data.update(scoring_func="sigmoid", topk_method="noaux_tc")
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return out


def build_tiny_qwen3_moe(out: str | Path, num_layers: int = 2, seed: int = 0) -> Path:
    """config.json, model.safetensors (bf16) and the tiny tokenizer for a random Qwen3-MoE."""
    return build_qwen3_moe(out, num_layers=num_layers, seed=seed, **MOE_SHAPE)


#: Last name components of the linear layers quantized in the FP8 copies (attention, DeepSeek's
#: MLA projections, dense and shared-expert MLPs, experts of Qwen, Mixtral and DeepSeek); routers
#: and their gates never are.
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3",
                 "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
ROUTER_LEAVES = ("gate", "shared_expert_gate")
FORMATS = ("fp8-tensor", "fp8-tensor-dynamic", "fp8-block", "ct-fp8", "ct-fp8-dynamic", "ct-fp8-block")
#: llm-compressor's usual ignore list for MoE models.
CT_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]


def _leaf(name: str) -> str:
    return name[: -len(".weight")].rsplit(".", 1)[-1]


def _is_fp8_linear(name: str) -> bool:
    return name.endswith(".weight") and _leaf(name) in LINEAR_LEAVES


def _ct_args(strategy: str, dynamic: bool, **extra) -> dict:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}, **extra}


def fp8_copy(src: Path, dst: Path, fmt: str, ignore: list[str] | None = None) -> Path:
    """An FP8 checkpoint of ``src`` in format ``fmt`` (one of :data:`FORMATS`), quantized with
    numerics.py. ``ignore`` replaces the format's ignore list."""
    import torch
    from safetensors.torch import load_file, save_file

    from fp8_backend import numerics

    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, found {fmt!r}")
    shutil.copytree(src, dst)
    routers = []
    for f in dst.glob("*.safetensors"):
        out = {}
        for name, t in load_file(f).items():
            base = name[: -len("weight")]
            if name.endswith(".weight") and _leaf(name) in ROUTER_LEAVES:
                routers.append(base[:-1])
            if not _is_fp8_linear(name):
                out[name] = t
                continue
            w = t.float()
            if fmt.endswith("block"):
                q, sc = numerics.quantize_block(w, block_size=(128, 128))
                out[base + ("weight_scale_inv" if fmt == "fp8-block" else "weight_scale")] = sc.float()
            elif fmt == "ct-fp8-dynamic":
                # llm-compressor stores the model's dtype and quantizes with the stored scale.
                sc = numerics.compute_scale(w.abs().amax(dim=1, keepdim=True)).to(torch.bfloat16)
                q = numerics.quantize_with_scale(w, sc.float())
                out[base + "weight_scale"] = sc
            else:
                q, sc = numerics.quantize_per_tensor(w)
                shape = () if fmt.startswith("fp8-") else (1,)
                out[base + "weight_scale"] = sc.reshape(shape)
                if fmt != "fp8-tensor-dynamic":
                    out[base + "input_scale"] = torch.full(shape, 0.02)
            out[name] = q
        save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    if fmt.startswith("fp8-"):
        qc = {"quant_method": "fp8", "fmt": "e4m3",
              "activation_scheme": "static" if fmt == "fp8-tensor" else "dynamic",
              "modules_to_not_convert": ignore if ignore is not None else sorted(routers)}
        if fmt == "fp8-block":
            qc["weight_block_size"] = [128, 128]
    else:
        if fmt == "ct-fp8":
            w, a = _ct_args("tensor", False), _ct_args("tensor", False)
        elif fmt == "ct-fp8-dynamic":
            w, a = _ct_args("channel", False), _ct_args("token", True)
        else:
            w, a = _ct_args("block", False, block_structure=[128, 128]), _ct_args("group", True, group_size=128)
        qc = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a,
                                            "output_activations": None}},
              "format": "float-quantized", "ignore": ignore if ignore is not None else CT_IGNORE,
              "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def fp8_block_copy(src: Path, dst: Path, ignore: list[str] | None = None) -> Path:
    """Qwen3-FP8-style copy of ``src``: 128x128 block FP8 for every projection, routers in
    ``modules_to_not_convert`` by full name (or ``ignore`` as given)."""
    return fp8_copy(src, dst, "fp8-block", ignore)


def dequantized_copy(src: Path, dst: Path) -> Path:
    """An FP8 copy turned back into a bf16 checkpoint (weights dequantized with their scales,
    scales dropped, no quantization_config): the same model for vLLM's own 16-bit path."""
    import torch
    from safetensors.torch import load_file, save_file

    from fp8_backend import numerics

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    block = "weight_block_size" in cfg["quantization_config"] or "block_structure" in json.dumps(cfg["quantization_config"]).replace('"block_structure": null', "")
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        out = {}
        for name, t in sd.items():
            if name.endswith(("weight_scale", "weight_scale_inv", "input_scale")):
                continue
            if t.dtype == torch.float8_e4m3fn:
                base = name[: -len("weight")]
                sc = sd.get(base + "weight_scale_inv", sd.get(base + "weight_scale"))
                out[name] = numerics.dequantize(t, sc.float(), (128, 128) if block else None).to(torch.bfloat16)
            else:
                out[name] = t
        save_file(out, f, metadata={"format": "pt"})
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


# ---- engines ---------------------------------------------------------------------------------


def direct_check(model, ckpt_dir: str, online_strategy: str | None = None) -> dict:
    """Runs inside the worker: the first FusedMoE layer's FP8 experts and scales against the
    checkpoint's tensors put in the kernel's layout here (or, online, quantized here with
    numerics.py), and the layer's method output against numerics.fused_moe_w8a16 on them."""
    import torch
    from safetensors.torch import load_file
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from fp8_backend import numerics

    layer = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    prefix = layer.layer_name  # the checkpoint's name ("model.layers.0.mlp.experts")
    sd = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        sd.update(load_file(f))
    e = layer.w13_weight.shape[0]
    block = getattr(layer, "fp8_block_size", None)
    names = (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)

    def expert(j, proj):
        base = f"{prefix}.{j}.{proj}."
        w = sd[base + "weight"]
        if online_strategy == "channel":
            return numerics.quantize_per_channel(w.float())
        if online_strategy == "tensor":
            q, s = numerics.quantize_per_tensor(w.float())
            return q, s.reshape(1, 1).expand(w.shape[0], 1)
        s = sd.get(base + "weight_scale_inv", sd.get(base + "weight_scale")).float()
        if block is None:
            s = s.reshape(-1, 1).expand(w.shape[0], 1) if s.numel() == 1 else s.reshape(-1, 1)
        return w, s

    w13, s13, w2, s2 = [], [], [], []
    for j in range(e):
        (g, gs), (u, us), (d, ds) = (expert(j, p) for p in names)
        w13.append(torch.cat([g, u]))
        s13.append(torch.cat([gs, us]) if block else torch.cat([gs, us]).reshape(-1))
        w2.append(d)
        s2.append(ds if block else ds.reshape(-1))
    w13, s13, w2, s2 = (torch.stack(t) for t in (w13, s13, w2, s2))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, w13.shape[2], generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, e, (7, 2), generator=gen)
    wts = torch.rand(7, 2, generator=gen)
    out = layer.quant_method.apply(layer, x, wts, ids, None, None)
    ref = numerics.fused_moe_w8a16(x, w13, s13, w2, s2, wts, ids, tuple(block) if block else None)
    return {
        "layer": prefix,
        "method": type(layer.quant_method).__module__ + "." + type(layer.quant_method).__qualname__,
        "weights_equal": bool(torch.equal(layer.w13_weight.view(torch.uint8), w13.view(torch.uint8))
                              and torch.equal(layer.w2_weight.view(torch.uint8), w2.view(torch.uint8))),
        "scales_equal": bool(torch.equal(layer.w13_weight_scale, s13) and torch.equal(layer.w2_weight_scale, s2)),
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
        "ref_max_abs": float(ref.float().abs().max()),
    }


def run_engines(specs: list[dict], prompts: list[str]) -> None:
    """Build one engine per spec ({"name", "model", "kwargs", "check": None | "checkpoint" |
    "tensor" | "channel"}) in this process, all kept alive (vLLM 0.32 cannot build another
    engine in a process after deleting one), and print one "RESULT <json>" line per spec with
    prompt log-probs, the layer report, the direct check and generated text; an engine that
    fails to build prints its error instead."""
    import functools
    import traceback

    from vllm import LLM, SamplingParams

    from fp8_backend.vllm_adapter.evaluate import layer_report, prompt_logprobs

    alive = []
    for spec in specs:
        r = {"name": spec["name"]}
        try:
            kwargs = dict(dtype="bfloat16", kv_cache_memory_bytes=32 << 20, seed=0, enforce_eager=True,
                          max_model_len=256)
            kwargs.update(spec.get("kwargs", {}))
            llm = LLM(model=spec["model"], **kwargs)
            alive.append(llm)
            tok = llm.get_tokenizer()
            r["prompt_logprobs"] = prompt_logprobs(llm, [tok.encode(p) for p in prompts])
            outs = llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
            r["texts"] = [o.outputs[0].text for o in outs]
            r["report"] = layer_report(llm)
            if spec.get("check"):
                online = spec["check"] if spec["check"] in ("tensor", "channel") else None
                fn = functools.partial(direct_check, ckpt_dir=spec["model"], online_strategy=online)
                r["check"] = llm.apply_model(fn)[0]
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            r["error"] = f"{type(e).__name__}: {e}"
            r["traceback"] = traceback.format_exc()[-3000:]
        sys.stdout.write("\nRESULT " + json.dumps(r) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_engines(spec["engines"], spec["prompts"])
