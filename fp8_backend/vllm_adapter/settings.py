"""Every environment variable fp8-backend reads, parsed and checked in one place.

They are read when layers and attention load (vLLM's engine processes inherit them), so a bad
value fails the load, naming the variable, what it accepts and what it found. Importable
without vLLM.

- ``FP8_BACKEND_ATTENTION``: ``auto`` (default), ``all`` or ``vllm``: who runs decoder attention.
- ``FP8_BACKEND_MOE``: ``plugin`` or ``vllm``: who serves FP8 mixture-of-experts layers on CPU
  where both could (unset: layer_owner's default).
- ``FP8_BACKEND_GPU_KERNELS``: ``1`` selects fp8-backend's own GPU kernels for linear layers on
  CUDA instead of vLLM's FP8 linear method.
- ``FP8_BACKEND_EMULATE_W8A8``: ``1`` fake-quantizes activations on CPU as the GPU's W8A8 path
  quantizes them, to measure a GPU deployment's accuracy here.
- ``FP8_BACKEND_KV_CACHE_SCALES``: a kv_cache_scales.json to read K/V scales from.
- ``FP8_BACKEND_CPU_ISA``: the CPU kernel path (read by the kernels' one registry,
  csrc/cpu/isa.cpp, through ``fp8_backend.kernels.cpu_isa``).
"""

from __future__ import annotations

import os
from typing import Mapping

from .layer_owner import MOE_CHOICES

ATTENTION_ENV = "FP8_BACKEND_ATTENTION"
ATTENTION_MODES = ("auto", "all", "vllm")
MOE_ENV = "FP8_BACKEND_MOE"
GPU_KERNELS_ENV = "FP8_BACKEND_GPU_KERNELS"
EMULATE_ENV = "FP8_BACKEND_EMULATE_W8A8"
KV_SCALES_ENV = "FP8_BACKEND_KV_CACHE_SCALES"


def _read(name: str, env: Mapping[str, str] | None = None) -> str:
    return str((os.environ if env is None else env).get(name, "")).strip().lower()


def attention_mode(env: Mapping[str, str] | None = None) -> str:
    """``FP8_BACKEND_ATTENTION`` (of ``env``, default this process's environment): "auto" when
    unset or empty."""
    mode = _read(ATTENTION_ENV, env) or "auto"
    if mode not in ATTENTION_MODES:
        raise ValueError(f"{ATTENTION_ENV}={mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
    return mode


def moe_choice() -> str | None:
    """``FP8_BACKEND_MOE``: "plugin", "vllm", or None when unset or empty."""
    v = _read(MOE_ENV)
    if not v:
        return None
    if v not in MOE_CHOICES:
        raise ValueError(f"{MOE_ENV}: expected one of {list(MOE_CHOICES)} (or unset), found {v!r}")
    return v


def _flag(name: str, accepted: tuple[str, ...], env: Mapping[str, str] | None = None) -> bool:
    v = _read(name, env)
    if v not in accepted:
        raise ValueError(f"{name}: expected 1, 0 or unset, found {v!r}")
    return v in ("1", "true")


def gpu_kernels() -> bool:
    """``FP8_BACKEND_GPU_KERNELS=1``."""
    return _flag(GPU_KERNELS_ENV, ("", "0", "1"))


def emulate_w8a8(env: Mapping[str, str] | None = None) -> bool:
    """``FP8_BACKEND_EMULATE_W8A8=1`` (also "true") in ``env`` (default this process's)."""
    return _flag(EMULATE_ENV, ("", "0", "1", "false", "true"), env)


def kv_scales_file() -> str | None:
    """``FP8_BACKEND_KV_CACHE_SCALES``: a path (not lower-cased), or None when unset."""
    return os.environ.get(KV_SCALES_ENV, "").strip() or None
