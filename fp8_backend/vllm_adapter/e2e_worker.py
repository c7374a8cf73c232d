"""One engine in one process: load it, generate, time batch-1 decode (and optionally batched
decode and a long prefill), score text.

Prints one JSON line "RESULT {...}". Run as ``python -m fp8_backend.vllm_adapter.e2e_worker`` by
fp8_backend.eval.e2e.run_e2e (scripts/demo.py, benchmarks/bench_e2e.py), one worker per configuration, so that peak memory and timings are not mixed.
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
    # The batched rows default from the environment too, so that callers that build the argument
    # list themselves (fp8_backend.eval.e2e.run_e2e) can ask for them through its env= parameter.
    ap.add_argument("--batch-decode", type=int, default=int(os.environ.get("E2E_WORKER_BATCH_DECODE", "0")),
                    help="also time decode of this many sequences at once (0: skip)")
    ap.add_argument("--batch-decode-tokens", type=int,
                    default=int(os.environ.get("E2E_WORKER_BATCH_DECODE_TOKENS", "64")))
    ap.add_argument("--prefill-tokens", type=int, default=int(os.environ.get("E2E_WORKER_PREFILL_TOKENS", "0")),
                    help="also time the prefill of one prompt of this many tokens (0: skip)")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from fp8_backend.eval.metrics import linear_summary
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

    # Random token ids (seeded) as prompts: every timed prompt is new, so vLLM's prefix cache
    # never serves a prefill from an earlier run.
    import random
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    def new_prompt(n):
        return {"prompt_token_ids": [rng.randrange(256, vocab) for _ in range(n)]}

    # Batch-B decode: B sequences of 8-token prompts generating N tokens each;
    # tokens/s = B (N - 1) / (t_N - t_1), the same cancellation as batch 1.
    batch_decode = None
    if args.batch_decode > 0 and args.batch_decode_tokens > 1:
        def timed_batch(n):
            sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
            prompts = [new_prompt(8) for _ in range(args.batch_decode)]
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            return time.perf_counter() - t
        timed_batch(8)  # warm-up
        best = []
        for _ in range(args.decode_repeats):
            t1, tn = timed_batch(1), timed_batch(args.batch_decode_tokens)
            best.append(args.batch_decode * (args.batch_decode_tokens - 1) / max(tn - t1, 1e-9))
        batch_decode = max(best)

    # Prefill: one P-token prompt, one output token, against a 1-token prompt:
    # tokens/s = (P - 1) / (t_P - t_1) (per-request overhead and the one decode step cancel).
    prefill = None
    if args.prefill_tokens > 1:
        def timed_prefill(n):
            sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            prompt = new_prompt(n)
            t = time.perf_counter()
            llm.generate([prompt], sp, use_tqdm=False)
            return time.perf_counter() - t
        timed_prefill(args.prefill_tokens)  # warm-up
        best = []
        for _ in range(args.decode_repeats):
            t1, tp = timed_prefill(1), timed_prefill(args.prefill_tokens)
            best.append((args.prefill_tokens - 1) / max(tp - t1, 1e-9))
        prefill = max(best)

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
        "linear": linear_summary(rep),
        "texts": texts,
        "decode_tok_s": decode,
        "batch_decode": args.batch_decode if batch_decode is not None else None,
        "batch_decode_tokens": args.batch_decode_tokens,
        "batch_decode_tok_s": batch_decode,
        "prefill_tokens": args.prefill_tokens if prefill is not None else None,
        "prefill_tok_s": prefill,
        "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
        "logprobs": scored,
        "score_s": score_s if scored is not None else None,
    }
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the engine


if __name__ == "__main__":
    main()
