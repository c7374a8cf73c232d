"""Linear-layer policy of the adapter: which kernel serves an FP8 layer (chosen once per layer
at load time) and W8A8 emulation on CPU (``FP8_BACKEND_EMULATE_W8A8``, read in settings.py).

- CPU              -> torch.ops.fp8_backend.w8a16_linear (csrc/cpu), weights as loaded;
- CUDA sm_89+      -> W8A8: activations quantized to FP8, FP8 tensor-core GEMM (Triton);
- CUDA sm_80/86/87 -> Marlin-style W8A16: weights repacked into tiles, bit-decoded to fp16/bf16;
- anything else    -> a clear error at load (no FP8 or fp16 tensor-core path to run on).

:func:`choose_linear_path` is a pure function of (device type, capability, scheme) so that the
decision is unit-tested on CPU; :func:`prepare_layer` applies it to a layer and
:func:`apply_linear` runs the chosen op of ``fp8_backend.kernels``. Importable without vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import kernels  # noqa: F401  (registers torch.ops.fp8_backend)
from ..formats.scheme import ActivationQuant, Fp8Scheme
from . import settings

logger = logging.getLogger("vllm.fp8_backend")

_cpu_w8a16_linear = torch.ops.fp8_backend.w8a16_linear.default  # csrc/cpu

CPU_W8A16 = "cpu_w8a16"
GPU_W8A8 = "gpu_w8a8"
GPU_MARLIN_W8A16 = "gpu_marlin_w8a16"

_logged: set[str] = set()

@dataclass(frozen=True)
class LinearPath:
    kernel: str  # CPU_W8A16 | GPU_W8A8 | GPU_MARLIN_W8A16
    act: ActivationQuant | None  # how activations are quantized (W8A8, or its CPU emulation)
    reason: str


def choose_linear_path(device_type: str, capability: tuple[int, int] | None, scheme: Fp8Scheme,
                       emulate_w8a8: bool = False) -> LinearPath:
    """The kernel for a layer of ``scheme`` on ``device_type`` ("cpu" / "cuda") with CUDA
    ``capability``.

    ``emulate_w8a8`` (CPU only): fake-quantize activations as the W8A8 GPU path would."""
    if device_type == "cpu":
        if emulate_w8a8:
            act = scheme.w8a8_activation()
            return LinearPath(CPU_W8A16, act, f"CPU: W8A16 kernels of csrc/cpu with activations "
                              f"fake-quantized to FP8 ({act.words()}), emulating the numerics of W8A8")
        return LinearPath(CPU_W8A16, None, "CPU: W8A16 kernels of csrc/cpu (no FP8 arithmetic on CPU)")
    if device_type != "cuda":
        raise ValueError(f"fp8-backend: device type: expected 'cpu' or 'cuda', found {device_type!r}")
    if capability is None or len(capability) != 2:
        raise ValueError(f"fp8-backend: CUDA capability: expected (major, minor), found {capability!r}")
    cap = tuple(int(c) for c in capability)
    if cap >= (8, 9):
        act = scheme.w8a8_activation()
        return LinearPath(GPU_W8A8, act, f"sm_{cap[0]}{cap[1]}: FP8 tensor cores, W8A8 ({act.words()} activations)")
    if cap >= (8, 0):
        return LinearPath(GPU_MARLIN_W8A16, None,
                          f"sm_{cap[0]}{cap[1]}: no FP8 tensor cores, Marlin-style W8A16 (bit-decoded weights)")
    raise ValueError(
        f"fp8-backend: GPU compute capability: expected sm_80 or newer (Ampere: W8A16; Ada/Hopper: W8A8), "
        f"found sm_{cap[0]}{cap[1]}"
    )


def path_for_device(device: torch.device, scheme: Fp8Scheme) -> LinearPath:
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    emulate = device.type == "cpu" and settings.emulate_w8a8()
    path = choose_linear_path(device.type, cap, scheme, emulate)
    if path.reason not in _logged:
        _logged.add(path.reason)
        logger.info("fp8-backend linear kernel: %s", path.reason)
    return path


def prepare_layer(layer: torch.nn.Module, path: LinearPath, prefix: str) -> None:
    """Bring a layer whose ``weight`` (e4m3 [N, K]), ``weight_scale`` (1 / N / block grid) and
    ``block_size`` are set into the form ``path`` reads; CPU layers are left untouched."""
    layer.fp8_path = path
    static = path.act is not None and path.act.static
    if path.kernel == CPU_W8A16:
        if static:
            _set_static_input_scale(layer, prefix)
        return
    block = getattr(layer, "block_size", None)
    w, scale = layer.weight.data, layer.weight_scale.data
    if path.kernel == GPU_MARLIN_W8A16:
        from ..kernels.triton.w8a16_repack import repack

        try:
            packed = repack(w, scale, tuple(block) if block else None)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
        layer.weight = torch.nn.Parameter(packed.tiles, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(packed.scales, requires_grad=False)
        layer.fp8_shape = (packed.n, packed.k, packed.group_size)
        return
    n, k = w.shape
    if path.act.granularity.cols:
        bn, bk = block
        if bk < 16 or bk & (bk - 1):
            raise ValueError(f"{prefix}.weight_scale: W8A8 block K size must be a power of two >= 16, found {bk}")
        want = (-(-n // bn), -(-k // bk))
        if tuple(scale.shape) != want:
            raise ValueError(f"{prefix}.weight_scale: expected block scales {want}, found {tuple(scale.shape)}")
    elif scale.numel() not in (1, n):
        raise ValueError(f"{prefix}.weight_scale: expected 1 or N={n} scales, found shape {tuple(scale.shape)}")
    if static:
        _set_static_input_scale(layer, prefix)


def _set_static_input_scale(layer: torch.nn.Module, prefix: str) -> None:
    s = getattr(layer, "input_scale", None)
    if s is None:
        raise ValueError(f"{prefix}.input_scale: static activations need an input scale")
    # fused layers carry one input scale per shard; one activation tensor needs one scale
    layer.fp8_input_scale = s.data.float().max().reshape(1)


def fake_quant_activations(x: torch.Tensor, act: ActivationQuant,
                           input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x rounded to the FP8 grid as the W8A8 path quantizes it (numerics.py), for emulation.

    Static: returns the FP8 values themselves (exact in bf16/fp16) and the scale to fold into the
    weight scale, so the result is W8A8's up to fp32 summation order. Dynamic scales (per token,
    per 1 x k group) differ per row / group and cannot be folded: the dequantized activations are
    returned in x.dtype, which adds one rounding (at most 2^-9 relative for bf16) per activation.
    """
    from .. import numerics

    if act.static:
        q, s = numerics.quantize_per_tensor(x, scale=input_scale)
        return q.to(x.dtype), s.reshape(1)
    return act.fake_quantize(x), None


def apply_linear(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Run the op chosen by :func:`prepare_layer`.

    Called once per linear layer and token: in eager mode its Python cost adds up (120 calls per
    token on a 30-layer model), so the CPU path reads plain attributes from ``__dict__`` (no
    ``nn.Module.__getattr__`` miss, which raises and catches) and calls the op overload directly:
    ~8 us less per call than through the generic helpers."""
    d = layer.__dict__
    path = d["fp8_path"]
    if path.kernel == CPU_W8A16:
        params = layer._parameters
        block = d.get("block_size")
        scale = params["weight_scale"]
        if path.act is not None:  # W8A8 emulation
            x, x_scale = fake_quant_activations(x, path.act, d.get("fp8_input_scale"))
            if x_scale is not None:
                scale = scale * x_scale
        return _cpu_w8a16_linear(x, params["weight"], scale, bias, block)
    from ..kernels import gpu_ops  # noqa: F401  (registers the custom ops)

    if path.kernel == GPU_MARLIN_W8A16:
        n, k, group = layer.fp8_shape
        return torch.ops.fp8_backend.triton_w8a16_linear(x, layer.weight, layer.weight_scale, bias, n, k, group)
    return torch.ops.fp8_backend.triton_w8a8_linear(x, layer.weight, layer.weight_scale, bias,
                                                    getattr(layer, "fp8_input_scale", None),
                                                    getattr(layer, "block_size", None))
