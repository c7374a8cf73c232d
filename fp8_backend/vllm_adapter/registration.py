"""Install fp8-backend's classes into vLLM's registries (idempotent, every process)."""

from __future__ import annotations

import logging

# A child of vLLM's logger: vLLM configures "vllm" (handler, level, format) in every process.
logger = logging.getLogger("vllm.fp8_backend")

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import Fp8CompressedTensorsConfig, Fp8Config

    # "fp8" already names vLLM's own config; registering the same name replaces it (vLLM logs
    # that only at debug level, so say it here).
    register_quantization_config("fp8")(Fp8Config)
    # A custom name, so vLLM lets it claim FP8 compressed-tensors checkpoints (see the class).
    register_quantization_config("fp8_backend")(Fp8CompressedTensorsConfig)
    _done = True
    logger.info("fp8-backend: quantization='fp8' now served by %s", Fp8Config.__qualname__)
