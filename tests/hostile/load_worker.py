"""Load checkpoints through vLLM's own model loader, many in one process, no engine.

Each checkpoint goes through what an engine does before serving — the plugin's config
(from_config / override), model construction (get_quant_method), weight loading (the loaders
and their checks) and process_weights_after_loading — without the scheduler, KV cache or
server, so a whole suite of damaged checkpoints takes seconds per case instead of an engine
start each. Prints one JSON line per checkpoint: {"dir", "ok", "error"}.

Usage: python load_worker.py SPEC_JSON   (a list of {"dir": ..., "kwargs": {engine args}})
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
    initialized = False
    for spec in specs:
        d = spec["dir"]
        result = {"dir": d, "ok": False, "error": None}
        try:
            kwargs = dict(dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=16 << 20, max_model_len=256)
            kwargs.update(spec.get("kwargs", {}))
            args = EngineArgs(model=d, **kwargs)
            vllm_config = args.create_engine_config()
            with set_current_vllm_config(vllm_config):
                if not initialized:
                    init_distributed_environment(1, 0, "tcp://127.0.0.1:%d" % _free_port(), 0, "gloo")
                    ensure_model_parallel_initialized(1, 1)
                    initialized = True
                model = get_model(vllm_config=vllm_config)
                result["digest"] = _digest(model)
                del model
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - every refusal is reported, whatever its type
            result["error"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()[-2000:]
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main(json.loads(open(sys.argv[1]).read()))
