"""fp8-backend: FP8 quantization for vLLM, fast on x86 CPUs.

vLLM finds this package through the ``vllm.general_plugins`` entry point and calls
:func:`register` in every process it starts (main, engine core, workers).
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin entry point: install this package's "fp8" quantization config."""
    from .vllm_adapter.registration import register as _register

    _register()
