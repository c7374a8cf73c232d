"""vllm_adapter/linear_paths.py: the per-layer kernel choice (a pure function, tested for every device
class on CPU), bad input at load, and the chosen GPU ops run end to end by the Triton
interpreter on CPU tensors against numerics.py (nothing runs on a GPU)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fp8_backend import numerics as nm
from fp8_backend.vllm_adapter import linear_paths, settings
from schemes import GROUP_128, PER_TOKEN, STATIC, scheme


@pytest.mark.parametrize("cap,kernel", [((8, 0), linear_paths.GPU_MARLIN_W8A16), ((8, 6), linear_paths.GPU_MARLIN_W8A16),
                                        ((8, 7), linear_paths.GPU_MARLIN_W8A16), ((8, 9), linear_paths.GPU_W8A8),
                                        ((9, 0), linear_paths.GPU_W8A8), ((10, 0), linear_paths.GPU_W8A8),
                                        ((12, 0), linear_paths.GPU_W8A8)])
def test_choose_by_capability(cap, kernel):
    assert linear_paths.choose_linear_path("cuda", cap, scheme("channel", "none")).kernel == kernel


def test_choose_cpu_keeps_cpu_kernels():
    for strategy in ("tensor", "channel", "block"):
        for act in ("none", "dynamic", "static")[: 2 if strategy == "block" else 3]:  # blocks: dynamic only
            p = linear_paths.choose_linear_path("cpu", None, scheme(strategy, act))
            assert p.kernel == linear_paths.CPU_W8A16 and p.act is None


@pytest.mark.parametrize("strategy,act,want", [("block", "dynamic", GROUP_128), ("tensor", "static", STATIC),
                                               ("channel", "none", PER_TOKEN),
                                               ("tensor", "dynamic", PER_TOKEN)])
def test_choose_w8a8_activation_quant(strategy, act, want):
    assert linear_paths.choose_linear_path("cuda", (9, 0), scheme(strategy, act)).act == want


def test_sm80_never_gets_the_fp8_gemm():
    # sm_80 has no FP8 MMA: the W8A8 kernel is refused by the dispatcher (not by a compile crash)
    for strategy in ("tensor", "channel", "block"):
        assert linear_paths.choose_linear_path("cuda", (8, 0), scheme(strategy, "dynamic")).kernel != linear_paths.GPU_W8A8


@pytest.mark.parametrize("cap", [(7, 5), (7, 0), (6, 1)])
def test_old_gpu_is_a_clear_error(cap):
    with pytest.raises(ValueError, match=rf"expected sm_80 or newer.*found sm_{cap[0]}{cap[1]}"):
        linear_paths.choose_linear_path("cuda", cap, scheme("channel", "none"))


def test_unknown_device_and_capability_errors():
    with pytest.raises(ValueError, match="device type"):
        linear_paths.choose_linear_path("xpu", None, scheme("channel", "none"))
    with pytest.raises(ValueError, match="capability"):
        linear_paths.choose_linear_path("cuda", None, scheme("channel", "none"))


def test_path_for_cpu_device_logs_once(caplog):
    linear_paths._logged.clear()
    with caplog.at_level("INFO", logger="vllm.fp8_backend"):
        for _ in range(3):
            p = linear_paths.path_for_device(torch.device("cpu"), scheme("channel", "none"))
    assert p.kernel == linear_paths.CPU_W8A16
    assert sum("linear kernel" in r.message for r in caplog.records) == 1


def make_layer(strategy: str, n: int = 70, k: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    layer = torch.nn.Module()
    block = None
    if strategy == "block":
        q, s = nm.quantize_block(w)
        block = [128, 128]
    elif strategy == "channel":
        q, s = nm.quantize_per_channel(w)
        s = s.reshape(-1)
    else:
        q, s = nm.quantize_per_tensor(w)
        s = s.reshape(1)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(s, requires_grad=False)
    layer.block_size = block
    return layer, q, s, block


def test_prepare_cpu_leaves_layer_untouched():
    layer, q, s, _ = make_layer("channel")
    linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cpu", None, scheme("channel", "none")), "l")
    assert layer.weight.data_ptr() == q.data_ptr() and layer.weight_scale.data_ptr() == s.data_ptr()


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("cap", [(8, 6), (9, 0)])
def test_gpu_paths_interpreted_vs_numerics(strategy, cap):
    layer, q, s, block = make_layer(strategy)
    act = "static" if strategy == "tensor" else "dynamic"
    layer.input_scale = torch.nn.Parameter(torch.tensor([0.02, 0.03]), requires_grad=False)  # 2 shards: max used
    path = linear_paths.choose_linear_path("cuda", cap, scheme(strategy, act))
    linear_paths.prepare_layer(layer, path, "model.layers.0.mlp")
    x = torch.randn(5, 300).bfloat16()
    bias = torch.randn(70)
    y = linear_paths.apply_linear(layer, x, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 70)
    if path.kernel == linear_paths.GPU_MARLIN_W8A16:
        ref = nm.w8a16_linear(x.float(), q, s, bias, tuple(block) if block else None)
    elif path.act == GROUP_128:
        xq, xs = nm.quantize_group(x, 128)
        ref = (xq.float() * xs.repeat_interleave(128, 1)[:, :300]) @ nm.dequantize(q, s, (128, 128)).T + bias
    else:
        ref = nm.w8a8_linear(x.float(), q, s, input_scale=torch.tensor(0.03) if path.act.static else None, bias=bias)
    # fp32 sums in another order, then one bf16 rounding (2^-8 relative) of the result
    assert bool(((y.float() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-3).all())


def test_gpu_ops_have_fake_impls():
    from fp8_backend.kernels import gpu_ops  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(3, 7, 64, dtype=torch.bfloat16)
        y = torch.ops.fp8_backend.triton_w8a8_linear(x, torch.empty(48, 64, dtype=nm.E4M3), torch.empty(48), None,
                                                     None, None)
        z = torch.ops.fp8_backend.triton_w8a16_linear(x, torch.empty(1, 1, 64, 64, dtype=torch.uint8),
                                                      torch.empty(1, 64), None, 48, 64, 0)
    assert y.shape == (3, 7, 48) and z.shape == (3, 7, 48)


def test_bad_scales_clear_error_at_load():
    layer, *_ = make_layer("channel")
    layer.weight_scale = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match=r"l0\.weight_scale: expected 1 or N=70 scales"):
        linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cuda", (9, 0), scheme("channel", "none")), "l0")
    layer, *_ = make_layer("channel")
    layer.weight_scale = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match=r"l0: weight_scale: expected 1 or N=70"):
        linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cuda", (8, 0), scheme("channel", "none")), "l0")
    layer, *_ = make_layer("block")
    layer.weight_scale = torch.nn.Parameter(torch.ones(1, 1), requires_grad=False)
    for cap in ((8, 0), (9, 0)):
        with pytest.raises(ValueError, match=r"expected block scale"):
            linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cuda", cap, scheme("block", "dynamic")), "l0")


def test_untileable_block_shape_clear_error_at_load():
    # 128 x 48 blocks: the W8A16 tile K (64) does not divide 48, the W8A8 group must be a power of two
    layer, *_ = make_layer("channel")
    layer.block_size = [128, 48]
    layer.weight_scale = torch.nn.Parameter(torch.ones(1, 7), requires_grad=False)
    with pytest.raises(ValueError, match="not a multiple of the W8A16 tile K"):
        linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cuda", (8, 6), scheme("block", "dynamic")), "l0")
    with pytest.raises(ValueError, match="power of two"):
        linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cuda", (9, 0), scheme("block", "dynamic")), "l0")


def test_static_without_input_scale_clear_error():
    layer, *_ = make_layer("tensor")
    with pytest.raises(ValueError, match="input_scale"):
        linear_paths.prepare_layer(layer, linear_paths.choose_linear_path("cuda", (9, 0), scheme("tensor", "static")), "l0")


def test_interpreter_setting_does_not_leak_into_the_session():
    import os

    from fp8_backend.kernels.triton import quant

    assert "TRITON_INTERPRET" not in os.environ  # vLLM engines of other tests must not inherit it
    q, _ = quant.quantize_per_token(torch.ones(2, 16))  # and the kernels still run interpreted
    assert bool((q.float() == 448).all())


def test_gpu_ops_opcheck_interpreted():
    """torch.library.opcheck: fake tensors and AOT dispatch (what torch.compile needs). Its
    test_schema is left out: torch's schema checker multiplies inputs, which fp8 tensors on CPU
    do not support ("mul_cpu_reduced_float" not implemented for Float8_e4m3fn)."""
    from fp8_backend.kernels import gpu_ops  # noqa: F401
    from fp8_backend.kernels.triton.w8a16_repack import repack

    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    x = torch.randn(3, 64).bfloat16()
    wq, ws = nm.quantize_per_channel(torch.randn(48, 64))
    torch.library.opcheck(torch.ops.fp8_backend.triton_w8a8_linear,
                          (x, wq, ws.reshape(-1), None, None, None), test_utils=utils)
    p = repack(wq, ws.reshape(-1))
    torch.library.opcheck(torch.ops.fp8_backend.triton_w8a16_linear, (x, p.tiles, p.scales, None, 48, 64, 0),
                          test_utils=utils)


@pytest.mark.parametrize("cap", [(8, 0), (9, 0)])
def test_gpu_paths_interpreted_per_row_block_grid(cap):
    """checkpoint_linear expands non-aligned fused block grids to one scale row per output row
    (block_size [1, bk]); both GPU paths take that layout."""
    layer, q, s, _ = make_layer("block")
    s_rows = s.repeat_interleave(128, 0)[:70].contiguous()
    layer.weight_scale = torch.nn.Parameter(s_rows, requires_grad=False)
    layer.block_size = [1, 128]
    path = linear_paths.choose_linear_path("cuda", cap, scheme("block", "dynamic"))
    linear_paths.prepare_layer(layer, path, "l0")
    x = torch.randn(4, 300).bfloat16()
    y = linear_paths.apply_linear(layer, x, None)
    if path.kernel == linear_paths.GPU_MARLIN_W8A16:
        ref = nm.w8a16_linear(x.float(), q, s, None, (128, 128))
    else:
        xq, xs = nm.quantize_group(x, 128)
        ref = (xq.float() * xs.repeat_interleave(128, 1)[:, :300]) @ nm.dequantize(q, s, (128, 128)).T
    assert bool(((y.float() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-3).all())


@pytest.mark.parametrize("strategy,act", [("tensor", "static"), ("channel", "dynamic"), ("block", "dynamic"),
                                          ("tensor", "none")])
def test_cpu_w8a8_emulation_vs_numerics(strategy, act):
    """FP8_BACKEND_EMULATE_W8A8: the CPU kernel with activations fake-quantized as W8A8 does."""
    layer, q, s, block = make_layer(strategy)
    layer.input_scale = torch.nn.Parameter(torch.tensor([0.02, 0.03]), requires_grad=False)
    path = linear_paths.choose_linear_path("cpu", None, scheme(strategy, act), emulate_w8a8=True)
    assert path.kernel == linear_paths.CPU_W8A16 and path.act == {"block": GROUP_128, "static": STATIC}.get(
        strategy if strategy == "block" else act, PER_TOKEN)
    linear_paths.prepare_layer(layer, path, "model.layers.0.mlp")
    x = torch.randn(5, 300).bfloat16() * 3
    bias = torch.randn(70).bfloat16()
    y = linear_paths.apply_linear(layer, x, bias)
    bias = bias.float()
    if path.act == GROUP_128:
        xq, xs = nm.quantize_group(x, 128)
        ref = (xq.float() * xs.repeat_interleave(128, 1)[:, :300]) @ nm.dequantize(q, s, (128, 128)).T + bias
    else:
        ref = nm.w8a8_linear(x.float(), q, s, input_scale=torch.tensor(0.03) if path.act.static else None, bias=bias)
    w16 = nm.w8a16_linear(x.float(), q, s, bias, tuple(block) if block else None)
    # Static folds the activation scale into the weight scale: fp32 sums in another order, then one
    # bf16 rounding (2^-8). Per-token / group emulation rounds each dequantized activation to bf16
    # once more (2^-9 relative each): bounded by 2^-9 * |x| @ |w| on top.
    spread = x.float().abs() @ nm.dequantize(q, s, tuple(block) if block else None).abs().T
    extra = 0 if path.act == STATIC else 2.0**-9 * spread
    assert bool(((y.float() - ref).abs() <= 2.0**-8 * ref.abs() + extra + 1e-3).all())
    # ... and it is not the W8A16 result: activation quantization is visible.
    assert float((y.float() - w16).abs().max()) > 1e-3


def test_emulation_env_is_read_and_validated(monkeypatch):
    monkeypatch.setenv(settings.EMULATE_ENV, "1")
    assert linear_paths.path_for_device(torch.device("cpu"), scheme("tensor", "static")).act == STATIC
    monkeypatch.setenv(settings.EMULATE_ENV, "yes please")
    with pytest.raises(ValueError, match="FP8_BACKEND_EMULATE_W8A8: expected 1, 0 or unset"):
        linear_paths.path_for_device(torch.device("cpu"), scheme("tensor", "static"))
    monkeypatch.delenv(settings.EMULATE_ENV)
    assert linear_paths.path_for_device(torch.device("cpu"), scheme("tensor", "static")).act is None
