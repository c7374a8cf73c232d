"""Load checkpoints through vLLM's own model loader, many in one process, no engine.

Each checkpoint goes through what an engine does before serving — the plugin's config
(from_config / override), model construction (get_quant_method), weight loading (the loaders
and their checks) and process_weights_after_loading — without the scheduler, KV cache or
server, so a whole suite of damaged checkpoints takes seconds per case instead of an engine
start each. Prints one JSON line per checkpoint: {"dir", "ok", "error", "warnings"} (the
plugin's warnings while loading it).

Usage: python load_worker.py SPEC_JSON   (a list of {"dir": ..., "kwargs": {engine args},
"dump": optional path: torch.save of the loaded model's FP8 layers, see _dump})
"""

import json
import os
import sys
import traceback


def main(specs: list[dict]) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model
    from vllm.plugins import load_general_plugins

    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    _set_torch_accelerator_to_noop()  # what vLLM's CPU model runner does before loading
    load_general_plugins()
    import logging

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    collect = Collect()
    initialized = False
    for spec in specs:
        d = spec["dir"]
        warnings.clear()
        result = {"dir": d, "ok": False, "error": None}
        try:
            kwargs = dict(dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=16 << 20, max_model_len=256)
            kwargs.update(spec.get("kwargs", {}))
            args = EngineArgs(model=d, **kwargs)
            vllm_config = args.create_engine_config()
            # vLLM (re)configures logging, which resets the handlers of "vllm.*" loggers.
            plugin_logger = logging.getLogger("vllm.fp8_backend")
            if collect not in plugin_logger.handlers:
                plugin_logger.addHandler(collect)
            with set_current_vllm_config(vllm_config):
                if not initialized:
                    init_distributed_environment(1, 0, "tcp://127.0.0.1:%d" % _free_port(), 0, "gloo")
                    ensure_model_parallel_initialized(1, 1)
                    initialized = True
                model = get_model(vllm_config=vllm_config)
                result["digest"] = _digest(model)
                if spec.get("dump"):
                    _dump(model, spec["dump"])
                del model
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - every refusal is reported, whatever its type
            result["error"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()[-2000:]
        result["warnings"] = list(warnings)
        sys.stdout.write("CASE " + json.dumps(result) + "\n")
        sys.stdout.flush()


def _digest(model) -> float:
    """A checksum of every parameter and buffer as served (FP8 bytes as integers)."""
    import torch

    total = 0.0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.view(torch.uint8)
        total += float(t.double().sum()) if t.numel() else 0.0
    return total


def _dump(model, path: str) -> None:
    """torch.save {module name: {tensor: value}} of what serving holds: each FP8 linear layer's
    weight (as uint8 bytes), weight_scale, block_size, logical_widths, input_scale, and each
    attention layer's k/v scales."""
    import torch

    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype == torch.float8_e4m3fn and hasattr(m, "weight_scale"):
            entry = {"weight": w.detach().view(torch.uint8).clone(), "weight_scale": m.weight_scale.detach().clone(),
                     "block_size": getattr(m, "block_size", None), "logical_widths": list(m.logical_widths)}
            if getattr(m, "input_scale", None) is not None:
                entry["input_scale"] = m.input_scale.detach().clone()
            out[name] = entry
        if hasattr(m, "_k_scale_float") and hasattr(m, "kv_cache_dtype"):
            out[name] = {"k_scale": float(m._k_scale_float), "v_scale": float(m._v_scale_float),
                         "kv_cache_dtype": str(m.kv_cache_dtype)}
    torch.save(out, path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main(json.loads(open(sys.argv[1]).read()))
