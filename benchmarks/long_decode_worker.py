"""One engine in one process: long-context batch-1 decode speed and the KV-cache block count.

Prints one JSON line "RESULT {...}". Started by benchmarks/bench_long_decode.py, one process per
configuration (kv_cache_dtype x weights), so that engines do not share caches or memory.

Timing: a prompt of --prompt-tokens token ids (real text, repeated), prefix caching off so every
request prefills again; one request at a time generating --new-tokens + 1 tokens (greedy,
ignore_eos) through LLMEngine.step(), every step timed: the first is the prefill, each later one a
decode step attending over the long prompt. Reported: the median decode step (robust to bursts of
load from other processes on a shared machine) and the mean rate; the run with the lowest median
of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        dtype="bfloat16",
        kv_cache_memory_bytes=args.kv_cache_mib << 20,
        max_model_len=args.prompt_tokens + args.new_tokens + 16,
        max_num_batched_tokens=args.prompt_tokens + args.new_tokens + 16,
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        kv_cache_dtype=args.kv_cache_dtype,
        **({"quantization": args.quantization} if args.quantization else {}),
    )
    cfg = llm.llm_engine.vllm_config.cache_config
    text = ("The history of the city begins with a small settlement on the river, where traders met "
            "to exchange grain, salt and cloth. Over the following centuries it grew into a market "
            "town, then a regional capital with a cathedral, a university and a busy port. ")
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    prompt = TokensPrompt(prompt_token_ids=(ids * (args.prompt_tokens // len(ids) + 1))[: args.prompt_tokens])

    def run(n: int, rid: str) -> list[float]:
        """Wall time of every engine step of one request generating n tokens (the first step is
        the prefill and the first token, each later one a decode step over the long context)."""
        sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
        engine = llm.llm_engine
        engine.add_request(rid, prompt, sp)
        steps, ntok = [], 0
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            steps.append(time.perf_counter() - t)
            for o in outs:
                ntok = len(o.outputs[0].token_ids)
        assert ntok == n, (ntok, n)
        return steps

    run(2, "warmup")
    runs = []
    for i in range(args.repeats):
        steps = run(args.new_tokens + 1, f"r{i}")
        dec = sorted(steps[1:])
        runs.append({"prefill_s": steps[0], "decode_tok_s": len(dec) / sum(dec),
                     "median_step_ms": 1e3 * dec[len(dec) // 2]})
    # Per step medians are robust to bursts of load from other processes; the mean rate is
    # reported beside it.
    best = min(runs, key=lambda r: r["median_step_ms"])
    result = {
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "num_kv_blocks": cfg.num_gpu_blocks,
        "block_size": cfg.block_size,
        "kv_cache_mib": args.kv_cache_mib,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "decode_tok_s": best["decode_tok_s"],
        "median_step_ms": best["median_step_ms"],
        "median_tok_s": 1e3 / best["median_step_ms"],
        "prefill_s": best["prefill_s"],
        "runs": runs,
        "attention_env": os.environ.get("FP8_BACKEND_ATTENTION", "auto"),
    }
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the engine


if __name__ == "__main__":
    main()
