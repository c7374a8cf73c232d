"""One engine in one process: load it, generate, time batch-1 decode, score text.

Prints one JSON line "RESULT {...}". Used by scripts/demo.py and benchmarks/bench_e2e.py, which
start one worker per configuration so that peak memory and timings are not mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--prompts", default="[]", help="JSON list of prompts to generate from")
    ap.add_argument("--chat", action="store_true", help="apply the chat template to prompts")
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--decode-tokens", type=int, default=128, help="batch-1 decode length to time")
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--score-file", default=None, help="JSON list of token-id windows to score")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from fp8_backend.vllm_adapter.evaluate import layer_report, prompt_logprobs

    rss_before = rss_mib()
    t0 = time.perf_counter()
    kwargs = dict(
        model=args.model,
        dtype="bfloat16",
        kv_cache_memory_bytes=512 << 20,
        max_model_len=2048,
        enforce_eager=args.eager,
        seed=0,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if args.quantization:
        kwargs["quantization"] = args.quantization
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    # ru_maxrss: the high-water mark of this process, which (single-process mode) holds the
    # model while it loads.
    peak_load_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    single_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"

    prompts = json.loads(args.prompts)
    texts = []
    if prompts:
        sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0)
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], sp, use_tqdm=False)
        else:
            outs = llm.generate(prompts, sp, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]

    # Batch-1 decode: time N new tokens after a short prompt; subtract a 1-token run so prefill
    # and per-request overhead cancel: tokens/s = (N - 1) / (t_N - t_1).
    decode = None
    if args.decode_tokens > 1:
        prompt = "Once upon a time"
        def timed(n):
            sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            llm.generate([prompt], sp, use_tqdm=False)
            return time.perf_counter() - t
        timed(8)  # warm-up
        best = []
        for _ in range(args.decode_repeats):
            t1, tn = timed(1), timed(args.decode_tokens)
            best.append((args.decode_tokens - 1) / max(tn - t1, 1e-9))
        decode = max(best)

    scored = None
    if args.score_file:
        windows = json.load(open(args.score_file))
        t = time.perf_counter()
        scored = prompt_logprobs(llm, windows)
        score_s = time.perf_counter() - t
    rep = layer_report(llm)
    result = {
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "eager": args.eager,
        "single_process": single_process,
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        "rss_before_mib": rss_before,
        "peak_load_rss_mib": peak_load_mib,
        "param_bytes": rep["param_bytes"],
        "linear_dtypes": sorted({v["weight_dtype"] for v in rep["linear"].values()}),
        "texts": texts,
        "decode_tok_s": decode,
        "logprobs": scored,
        "score_s": score_s if scored is not None else None,
    }
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the engine


if __name__ == "__main__":
    main()
