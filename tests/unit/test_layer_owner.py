"""The rule that says who serves each layer (fp8_backend.vllm_adapter.layer_owner): one case
per branch, and the expert-tensor checks attached to layers delegated to vLLM."""

import pytest
import torch
from schemes import WEIGHTS

from fp8_backend.formats.checkpoint import CheckpointFormatError
from fp8_backend.formats.scheme import blocks
from fp8_backend.vllm_adapter.layer_owner import LayerOwner, describe_cpu, layer_owner

AMX = frozenset({"avx2", "avx512", "avx512_bf16", "amx"})
ZEN4 = frozenset({"avx2", "avx512", "avx512_bf16"})
AVX2 = frozenset({"avx2"})
BLOCK = dict(weight=WEIGHTS["block"])


def test_dense_layers_are_the_plugins():
    for fmt in ("online", "fp8", "compressed-tensors"):
        assert layer_owner("linear", fmt).owner == "plugin"
        assert layer_owner("attention", fmt).owner == "plugin"
        assert layer_owner("other", fmt).owner == "none"


def test_routers_stay_16bit_online_and_as_stored_in_checkpoints():
    from fp8_backend.vllm_adapter.layer_owner import linear_kind

    assert linear_kind("model.layers.3.mlp.gate") == "router"
    assert linear_kind("model.layers.3.mlp.shared_expert_gate") == "router"
    assert linear_kind("model.layers.3.mlp.gate_proj") == "linear"
    assert linear_kind("model.layers.3.mlp.gate_up_proj") == "linear"
    assert layer_owner("router", "online").owner == "unquantized"
    assert layer_owner("router", "fp8").owner == "plugin"
    assert layer_owner("router", "compressed-tensors").owner == "plugin"


def test_online_moe_is_the_plugins_on_cpu_and_vllms_on_cuda():
    r = layer_owner("moe", "online", cpu_features=AVX2, activation="silu")
    assert r.owner == "plugin" and "fp8-backend's FP8 MoE method" in r.reason
    assert layer_owner("moe", "online", platform="cuda").owner == "vllm"


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_block_fp8_moe_on_amx_cpu_goes_to_vllm_by_default(fmt):
    r = layer_owner("moe", fmt, platform="cpu", cpu_features=AMX, activation="silu", **BLOCK)
    assert r.owner == "vllm" and "CPUExpertsFp8" in r.reason and "FP8_BACKEND_MOE=plugin" in r.reason


def test_moe_choice_forces_the_owner_where_both_exist():
    r = layer_owner("moe", "fp8", cpu_features=AMX, activation="silu", moe_choice="plugin", **BLOCK)
    assert r.owner == "plugin" and "FP8_BACKEND_MOE=plugin" in r.reason
    r = layer_owner("moe", "fp8", cpu_features=AMX, activation="silu", moe_choice="vllm", **BLOCK)
    assert r.owner == "vllm"
    with pytest.raises(ValueError, match="moe_choice"):
        layer_owner("moe", "fp8", moe_choice="both", **BLOCK)


@pytest.mark.parametrize("features", [ZEN4, AVX2])
def test_moe_choice_vllm_where_vllm_cannot_run_is_refused_naming_why(features):
    r = layer_owner("moe", "fp8", cpu_features=features, activation="silu", moe_choice="vllm", **BLOCK)
    assert r.owner == "refuse" and "FP8_BACKEND_MOE=vllm" in r.reason and "AMX only" in r.reason
    r = layer_owner("moe", "fp8", weight=WEIGHTS["tensor"], cpu_features=AMX, moe_choice="vllm")
    assert r.owner == "refuse" and "block-FP8 experts only" in r.reason


@pytest.mark.parametrize("features,cpu", [(ZEN4, "AVX-512 BF16 without AMX"), (AVX2, "AVX2 without AVX-512 or AMX")])
def test_block_fp8_moe_without_amx_is_the_plugins_saying_why(features, cpu):
    r = layer_owner("moe", "fp8", platform="cpu", cpu_features=features, activation="silu", **BLOCK)
    assert r.owner == "plugin" and "128x128 block-FP8" in r.reason and cpu in r.reason


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("features", [AMX, AVX2])
def test_non_block_fp8_moe_on_cpu_is_the_plugins(fmt, strategy, features):
    r = layer_owner("moe", fmt, weight=WEIGHTS[strategy], platform="cpu", cpu_features=features, activation="silu")
    assert r.owner == "plugin"
    assert ("per-channel" if strategy == "channel" else "per-tensor") in r.reason


def test_other_block_size_on_cpu_is_the_plugins():
    r = layer_owner("moe", "fp8", weight=blocks(64, 64), platform="cpu", cpu_features=AMX)
    assert r.owner == "plugin" and "64x64" in r.reason


@pytest.mark.parametrize("fmt", ["online", "fp8"])
@pytest.mark.parametrize("feature,words", [
    (dict(activation="swigluoai"), "activation swigluoai"),
    (dict(activation="gelu"), "activation gelu"),
    (dict(has_bias=True), "expert biases"),
    (dict(router_weight_on_input=True), "apply_router_weight_on_input"),
])
def test_unsupported_expert_features_on_cpu_are_refused_naming_them(fmt, feature, words):
    for choice in (None, "plugin", "vllm"):
        r = layer_owner("moe", fmt, platform="cpu", cpu_features=AMX, moe_choice=choice,
                        **({**BLOCK} if fmt != "online" else {}), **{"activation": "silu", **feature})
        assert r.owner == "refuse" and words in r.reason, (choice, r)


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_fp8_moe_on_cuda_goes_to_vllms_fp8_moe_method(strategy):
    # Any scheme, any activation: vLLM's own Fp8MoEMethod / compressed-tensors MoE method picks
    # its kernel (and refuses what it cannot run; the adapter wraps that error with the layer).
    r = layer_owner("moe", "fp8", weight=WEIGHTS[strategy],
                    platform="cuda", activation="gelu", moe_choice="plugin")
    assert r.owner == "vllm" and "cuda" in r.reason


@pytest.mark.parametrize("fmt", ["online", "fp8", "compressed-tensors"])
@pytest.mark.parametrize("kind", ["linear", "router"])
def test_linear_layers_on_cuda_are_vllms_unless_gpu_kernels_asked(fmt, kind):
    r = layer_owner(kind, fmt, platform="cuda")
    if kind == "router" and fmt == "online":
        assert r.owner == "unquantized"
        return
    assert r.owner == "vllm" and "FP8_BACKEND_GPU_KERNELS=1" in r.reason
    assert layer_owner(kind, fmt, platform="cuda", gpu_kernels=True).owner == "plugin"
    assert layer_owner(kind, fmt, platform="cpu", gpu_kernels=True).owner == "plugin"
    assert layer_owner(kind, fmt, platform="cpu").owner == "plugin"


def test_owner_is_validated():
    with pytest.raises(ValueError, match="LayerOwner.owner"):
        LayerOwner("maybe", "")
    assert describe_cpu(frozenset()) == "neither AVX2, AVX-512 nor AMX"


# ---- expert-tensor checks on a delegated method ----------------------------------------------


class _FakeMethod:
    """The two methods attach_expert_checks wraps, recording what vLLM's would receive."""

    def __init__(self):
        self.loaded = []
        self.processed = False

    def create_weights(self, layer, num_experts, **extra):
        for name, dtype in (("w13_weight", torch.float8_e4m3fn), ("w13_weight_scale_inv", torch.float32)):
            p = torch.nn.Parameter(torch.zeros(num_experts, 2, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, p)
        layer.loader = extra["weight_loader"]

    def process_weights_after_loading(self, layer):
        self.processed = True


def _layer(num_experts=3):
    from fp8_backend.vllm_adapter.moe import attach_expert_checks

    method = _FakeMethod()
    attach_expert_checks(method, "model.layers.0.mlp.experts", torch.float8_e4m3fn)
    layer = torch.nn.Module()
    layer.global_num_experts = num_experts
    method.create_weights(layer, num_experts, weight_loader=lambda p, w, name, shard, e, *a, **k: method.loaded.append(name))
    return method, layer


def _load_all(layer, skip=(), weight=None, scale=None):
    for e in range(layer.global_num_experts):
        for shard, proj in (("w1", "gate_proj"), ("w3", "up_proj")):
            base = f"model.layers.0.mlp.experts.{e}.{proj}"
            if (e, proj, "weight") not in skip:
                w = weight if weight is not None else torch.zeros(2, 2, dtype=torch.float8_e4m3fn)
                layer.loader(layer.w13_weight, w, base + ".weight", shard, e)
            if (e, proj, "scale") not in skip:
                s = scale if scale is not None else torch.ones(1)
                layer.loader(layer.w13_weight_scale_inv, s, base + ".weight_scale_inv", shard, e)


def test_expert_checks_pass_a_complete_checkpoint_through():
    method, layer = _layer()
    _load_all(layer)
    method.process_weights_after_loading(layer)
    assert method.processed and len(method.loaded) == 12


def test_expert_weight_in_16_bit_is_refused_by_name():
    method, layer = _layer()
    with pytest.raises(CheckpointFormatError, match=r"experts\.0\.gate_proj\.weight: expected dtype float8_e4m3fn.*found bfloat16"):
        _load_all(layer, weight=torch.zeros(2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad,what", [(float("nan"), "NaN"), (float("inf"), "Inf"), (0.0, "<= 0"), (-1.0, "<= 0")])
def test_expert_scale_not_finite_positive_is_refused_by_name(bad, what):
    method, layer = _layer()
    with pytest.raises(CheckpointFormatError, match=r"experts\.0\.gate_proj\.weight_scale_inv: .*" + what):
        _load_all(layer, scale=torch.tensor([bad]))


def test_expert_weight_of_nan_encodings_is_refused():
    method, layer = _layer()
    nan = torch.full((2, 2), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(CheckpointFormatError, match="NaN encodings"):
        _load_all(layer, weight=nan)


def test_missing_expert_tensor_is_named_before_serving():
    method, layer = _layer()
    _load_all(layer, skip={(2, "up_proj", "scale")})
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight_scale_inv: missing"):
        method.process_weights_after_loading(layer)
    assert not method.processed


def test_scales_missing_for_every_expert_are_refused():
    method, layer = _layer()
    _load_all(layer, skip={(e, p, "scale") for e in range(3) for p in ("gate_proj", "up_proj")})
    with pytest.raises(CheckpointFormatError, match=r"w13_weight_scale_inv: no expert tensor"):
        method.process_weights_after_loading(layer)


def test_vllm_refusal_is_reworded_with_the_layer():
    from fp8_backend.vllm_adapter.layer_owner import UnsupportedLayerError
    from fp8_backend.vllm_adapter.moe import delegated_moe_method

    class Refusing:
        def get_quant_method(self, layer, prefix):
            raise ValueError("FP8 MoE backend CPU does not support the deployment configuration")

    with pytest.raises(UnsupportedLayerError, match=r"^model\.layers\.3\.mlp\.experts: vLLM's own fp8 .*deployment"):
        delegated_moe_method(Refusing(), torch.nn.Module(), "model.layers.3.mlp.experts", "fp8", torch.float8_e4m3fn)


def test_non_fp8_float_schemes_refused_on_cpu_only():
    from fp8_backend.vllm_adapter.layer_owner import non_fp8_scheme_owner

    r = non_fp8_scheme_owner(("float4",), "cpu")
    assert r.owner == "refuse" and "found float4 weights" in r.reason and "stub op" in r.reason
    assert non_fp8_scheme_owner(("MXFP8",), "cpu").owner == "refuse"
    assert non_fp8_scheme_owner(("float4",), "cuda").owner == "vllm"
    assert non_fp8_scheme_owner(("int8",), "cpu").owner == "vllm"  # vLLM's CPU int8 kernels run it
    assert non_fp8_scheme_owner(("int4",), "cpu").owner == "vllm"


def test_expert_tensors_are_named_as_the_checkpoint_names_them():
    # vLLM's FusedMoE loader hands over the parameter's name; errors name the checkpoint tensor.
    from fp8_backend.vllm_adapter.moe import checkpoint_tensor_name

    layer = torch.nn.Module()
    layer.layer_name = "model.layers.0.block_sparse_moe.experts"
    layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name = "w1", "w3", "w2"
    name = "model.layers.0.block_sparse_moe.experts.w13_weight_scale_inv"
    assert checkpoint_tensor_name(layer, name, "w3", 17) == "model.layers.0.block_sparse_moe.experts.17.w3.weight_scale_inv"
    assert checkpoint_tensor_name(layer, name.replace("w13", "w2"), "w2", 0).endswith("experts.0.w2.weight_scale_inv")
    assert checkpoint_tensor_name(layer, "x.experts.w13_input_scale", "w1", 2).endswith("experts.2.w1.input_scale")
    assert checkpoint_tensor_name(layer, "a.experts.5.up_proj.weight", "w3", 5) == "a.experts.5.up_proj.weight"


def test_expert_count_against_config_names_both():
    from fp8_backend.formats.moe_tensors import check_expert_indices, expert_count_field

    assert expert_count_field({"num_local_experts": 8, "num_experts_per_tok": 2}) == ("num_local_experts", 8)
    assert expert_count_field({"hidden_size": 8}) is None
    names = [f"m.l.0.experts.{j}.w1.weight" for j in range(10)] + ["m.l.0.experts.w13_weight"]
    check_expert_indices("m.l.0.experts", names[:8], 8)
    with pytest.raises(CheckpointFormatError, match=r"m\.l\.0\.experts\.9\.w1\.weight: expert 9 .*num_local_experts=8 .*found at least 10"):
        check_expert_indices("m.l.0.experts", names, 8, "num_local_experts")


@pytest.mark.parametrize("platform,env,expected", [
    ("cuda", None, "vllm"), ("cuda", "1", "plugin"), ("cpu", None, "plugin"), ("cpu", "1", "plugin")])
def test_config_hands_cuda_linear_layers_to_vllms_own_config(monkeypatch, platform, env, expected):
    # The adapter's side of the rule: on (faked) CUDA a quantized linear layer gets the method of
    # vLLM's own config for the same quantization_config (a real one needs a GPU to build).
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config as VllmFp8Config

    from fp8_backend.vllm_adapter import config as C
    from fp8_backend.vllm_adapter.checkpoint_linear import Fp8CheckpointLinearMethod
    from fp8_backend.vllm_adapter.moe import vllm_config_for

    monkeypatch.setattr(C, "platform_name", lambda: platform)
    if env is None:
        monkeypatch.delenv("FP8_BACKEND_GPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("FP8_BACKEND_GPU_KERNELS", env)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    cfg = C.Fp8Config.from_config(qc)
    cfg._files_checked = True  # no model directory here
    assert isinstance(vllm_config_for("fp8", qc), VllmFp8Config)
    asked = []

    class Own:
        def get_quant_method(self, layer, prefix):
            asked.append(prefix)
            return "vllm's method"

    monkeypatch.setattr(cfg, "_vllm_own_config", lambda: Own())
    layer = ReplicatedLinear.__new__(ReplicatedLinear)  # a LinearBase without building weights
    torch.nn.Module.__init__(layer)
    m = cfg.get_quant_method(layer, "model.layers.0.mlp.down_proj")
    if expected == "vllm":
        assert m == "vllm's method" and asked == ["model.layers.0.mlp.down_proj"]
    else:
        assert isinstance(m, Fp8CheckpointLinearMethod) and not asked
