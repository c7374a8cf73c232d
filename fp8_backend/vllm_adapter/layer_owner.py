"""Who serves each layer of a model run with fp8-backend's "fp8" configs: one pure rule.

fp8-backend replaces vLLM's "fp8" quantization config, so every layer type that vLLM's own
``fp8`` / ``compressed-tensors`` configs quantize must get an answer here, or installing the
plugin would break a model vLLM alone serves. :func:`layer_owner` is that answer, as a pure
function of what is known before any tensor is loaded; the adapter's configs only carry it out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..formats.scheme import Granularity, blocks

#: Owners: fp8-backend's own method, vLLM's own method for the same checkpoint config, a 16-bit
#: layer (vLLM's unquantized method), no quantization method at all, or a refusal at load.
OWNERS = ("plugin", "vllm", "unquantized", "none", "refuse")

#: vLLM 0.32's CPU FP8 MoE kernel (CPUExpertsFp8): W8A16 with 128x128 block weights, AMX tiles,
#: SiLU-and-mul experts only.
VLLM_CPU_MOE_BLOCK = (128, 128)
VLLM_CPU_MOE_ACTIVATIONS = ("silu",)

#: Last name components of mixture-of-experts routers among linear layers (Qwen-MoE, Mixtral,
#: DeepSeek "mlp.gate"; Qwen2-MoE "shared_expert_gate"; others "router").
ROUTER_NAMES = ("gate", "shared_expert_gate", "router")


def linear_kind(prefix: str) -> str:
    """"router" for a mixture-of-experts router, else "linear"."""
    return "router" if prefix.rsplit(".", 1)[-1] in ROUTER_NAMES else "linear"


def check_activation_dtype(prefix: str, dtype) -> None:
    """fp8-backend's layer methods run W8A16 with 16-bit activations: a model dtype other than
    bf16 / fp16 is refused when the layer is created, naming it."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"{prefix}: fp8-backend runs W8A16 with bf16 or fp16 activations; found model dtype {dtype}"
        )


class UnsupportedLayerError(ValueError):
    """A layer (or a whole checkpoint scheme) that neither fp8-backend nor vLLM can serve in this
    format on this platform. The message names the layer or field, the format and what is
    missing."""


@dataclass(frozen=True)
class LayerOwner:
    owner: str  # one of OWNERS
    reason: str  # a sentence for the log or the refusal

    def __post_init__(self) -> None:
        if self.owner not in OWNERS:
            raise ValueError(f"LayerOwner.owner: expected one of {OWNERS}, found {self.owner!r}")


def describe_cpu(features: frozenset[str]) -> str:
    """'AVX-512 with AMX', 'AVX-512 without AMX', 'AVX2 without AVX-512 or AMX', ..."""
    if "amx" in features:
        return "AVX-512 with AMX"
    if "avx512" in features:
        return "AVX-512" + (" BF16" if "avx512_bf16" in features else "") + " without AMX"
    if "avx2" in features:
        return "AVX2 without AVX-512 or AMX"
    return "neither AVX2, AVX-512 nor AMX"


def _scheme_words(fmt: str, weight: Granularity | None) -> str:
    what = "per-tensor FP8" if weight is None else f"{weight.words()}{'-' if weight.cols else ' '}FP8"
    return f"{what} ({fmt} format)"


#: Values of the adapter's ``FP8_BACKEND_MOE`` choice (None: the rule's default).
MOE_CHOICES = ("plugin", "vllm")


def layer_owner(
    layer_kind: str,
    fmt: str,
    *,
    weight: Granularity | None = None,
    platform: str = "cpu",
    cpu_features: frozenset[str] = frozenset(),
    activation: str | None = None,
    has_bias: bool = False,
    router_weight_on_input: bool = False,
    moe_choice: str | None = None,
    gpu_kernels: bool = False,
) -> LayerOwner:
    """Who serves a layer, and why.

    layer_kind: "linear", "router" (see :func:`linear_kind`), "attention", "moe" (vLLM's
        FusedMoE / RoutedExperts) or "other".
    fmt: "online" (a 16-bit checkpoint quantized while loading), "fp8" (AutoFP8 / vLLM / Qwen3-FP8
        style) or "compressed-tensors".
    weight: the checkpoint's weight scale granularity (formats.scheme: per-tensor, per-channel, blocks).
    platform: "cpu", "cuda" or another vLLM platform name.
    cpu_features: {"avx2", "avx512", "avx512_bf16", "amx"} present on this CPU.
    activation / has_bias / router_weight_on_input: the MoE layer's expert activation ("silu",
        "gelu", "swigluoai", ...), whether its experts have biases, and whether the router weight
        is applied to the expert input instead of its output.
    moe_choice: None (the default below), or "plugin" / "vllm" to force the owner of FP8
        mixture-of-experts layers on CPU where both could serve them (the adapter reads it from
        the environment variable ``FP8_BACKEND_MOE``).
    gpu_kernels: the adapter's ``FP8_BACKEND_GPU_KERNELS=1``: fp8-backend's own GPU kernels for
        linear layers on CUDA instead of vLLM's FP8 linear method.
    The layer being in the checkpoint's ignore list is decided before this rule (it is then
    16-bit whatever its kind).
    """
    if moe_choice not in (None,) + MOE_CHOICES:
        raise ValueError(f"layer_owner.moe_choice: expected one of {MOE_CHOICES} or None, found {moe_choice!r}")
    if layer_kind == "router" and fmt == "online":
        return LayerOwner(
            "unquantized",
            "mixture-of-experts routers stay 16-bit, as published FP8 checkpoints keep them: "
            "expert choice is sensitive to small logit changes",
        )
    if layer_kind in ("linear", "router"):  # a checkpoint's router is served as it is stored
        if platform != "cpu" and not gpu_kernels:
            return LayerOwner(
                "vllm",
                f"FP8 linear layers on {platform}: vLLM's own FP8 linear method (fp8-backend's GPU "
                f"kernels have not run on hardware yet; FP8_BACKEND_GPU_KERNELS=1 selects them)",
            )
        return LayerOwner("plugin", "fp8-backend's FP8 linear method")
    if layer_kind == "attention":
        return LayerOwner("plugin", "fp8-backend's KV-cache scale method")
    if layer_kind != "moe":
        return LayerOwner("none", "not a layer FP8 quantizes (stays as vLLM builds it)")

    scheme = "online FP8" if fmt == "online" else _scheme_words(fmt, weight)
    if platform != "cpu":
        return LayerOwner("vllm", f"{scheme} mixture-of-experts on {platform}: vLLM's own FP8 MoE method")
    unsupported = []
    if activation is not None and activation.lower() not in VLLM_CPU_MOE_ACTIVATIONS:
        unsupported.append(f"activation {activation} (SiLU-and-mul experts only)")
    if has_bias:
        unsupported.append("expert biases")
    if router_weight_on_input:
        unsupported.append("router weights applied to the expert input (apply_router_weight_on_input)")
    if unsupported:
        # vLLM's CPU FP8 MoE kernel (CPUExpertsFp8) takes none of these either.
        return LayerOwner(
            "refuse",
            f"{scheme} mixture-of-experts cannot run on this CPU: neither fp8-backend's FP8 MoE "
            f"kernel nor vLLM's CPU FP8 MoE supports " + "; ".join(unsupported),
        )
    if fmt == "online":
        return LayerOwner("plugin", "online FP8 mixture-of-experts: fp8-backend's FP8 MoE method (W8A16)")
    vllm_missing = []
    if weight != blocks(*VLLM_CPU_MOE_BLOCK):
        vllm_missing.append(
            f"vllm-cpu 0.32's CPU FP8 MoE kernel takes {VLLM_CPU_MOE_BLOCK[0]}x{VLLM_CPU_MOE_BLOCK[1]} "
            f"block-FP8 experts only"
        )
    if "amx" not in cpu_features:
        vllm_missing.append(f"it runs on CPUs with AMX only, and this CPU has {describe_cpu(cpu_features)}")
    if moe_choice == "vllm":
        if vllm_missing:
            return LayerOwner(
                "refuse",
                f"FP8_BACKEND_MOE=vllm: {scheme} mixture-of-experts cannot run on vLLM's CPU FP8 MoE: "
                + "; ".join(vllm_missing),
            )
        return LayerOwner("vllm", f"{scheme} mixture-of-experts: vLLM's CPU FP8 MoE (CPUExpertsFp8, AMX), forced by FP8_BACKEND_MOE=vllm")
    if moe_choice == "plugin" or vllm_missing:
        why = ("forced by FP8_BACKEND_MOE=plugin" if moe_choice == "plugin"
               else "vLLM's CPU FP8 MoE cannot serve it: " + "; ".join(vllm_missing))
        return LayerOwner("plugin", f"{scheme} mixture-of-experts: fp8-backend's FP8 MoE method (W8A16; {why})")
    # Both could serve it: vLLM's AMX kernel stays the default until the two are measured on AMX.
    return LayerOwner(
        "vllm",
        f"{scheme} mixture-of-experts: vLLM's CPU FP8 MoE (CPUExpertsFp8, AMX); "
        f"FP8_BACKEND_MOE=plugin selects fp8-backend's",
    )


def non_fp8_scheme_owner(weight_kinds: tuple[str, ...], platform: str = "cpu") -> LayerOwner:
    """Who serves a quantized checkpoint that is valid but not FP8 (``weight_kinds`` as the
    format parser reports them: "int8", "int4", "float4", "MXFP8", ...). vLLM, except for
    float schemes on CPU: vllm-cpu 0.32 has no CPU kernels for them and would fail at the first
    forward inside a stub op, so they are refused at load with a sentence instead."""
    floats = sorted({k for k in weight_kinds if k.startswith("float") or k.startswith("MX")})
    if platform == "cpu" and floats:
        return LayerOwner(
            "refuse",
            f"expected an FP8 scheme (8-bit float, e4m3), found {', '.join(floats)} weights: "
            f"fp8-backend serves FP8 only, and vllm-cpu 0.32 has no CPU kernels for "
            f"{', '.join(floats)} (it would fail at the first forward in a stub op)",
        )
    return LayerOwner("vllm", "not FP8: vLLM's own quantization method for this scheme")


def this_cpu_features() -> frozenset[str]:
    """The features :func:`layer_owner` asks about, read from torch's CPU capability queries."""
    import torch

    probes = {
        "avx2": torch.cpu._is_avx2_supported,
        "avx512": torch.cpu._is_avx512_supported,
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported,
        "amx": torch.cpu._is_amx_tile_supported,
    }
    return frozenset(name for name, probe in probes.items() if probe())
