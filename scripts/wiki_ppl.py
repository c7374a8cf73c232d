#!/usr/bin/env python3
"""Perplexity of a vLLM model on real Wikipedia text, via prompt_logprobs.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/wiki_ppl.py \\
        --model models/SmolLM2-135M-Instruct --data data/wiki.txt [--windows 40 --window-len 512]
        [--quantization NAME] [--kv-cache-dtype fp8] [--no-generate] [--json out.json]

Windowing (``wiki_windows``): the articles of --data (blocks split on blank lines, see
scripts/get_wikitext.py) are tokenized with the model's tokenizer WITHOUT special tokens (SmolLM2
adds no BOS: add_bos_token is false in its GGUF; pass --bos for models that need one, e.g. Gemma);
every article with at least ``window_len`` tokens gives ONE window, its first ``window_len``
tokens; the first ``n_windows`` such articles in file order are used. Perplexity =
exp(sum of -log p(token) / count) over every token of every window except each window's first
(no context), i.e. n_windows * (window_len - 1) tokens (40 x 511 = 20,440 by default).

Import it:  ``from wiki_ppl import perplexity, wiki_windows`` (run from scripts/) and call
``perplexity(llm, token_windows)`` with a ``vllm.LLM`` and lists of token ids.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from fp8_backend.eval import text_windows


def wiki_windows(tokenizer, data_path, n_windows: int = 40, window_len: int = 512, bos: bool = False,
                 per_article: int = 1, groups: list | None = None) -> list[list[int]]:
    """Token windows of data/wiki.txt (fp8_backend.eval.text_windows)."""
    return text_windows(tokenizer, data_path, n_windows, window_len, bos, per_article, groups)


def nll_from_prompt_logprobs(prompt_token_ids, prompt_logprobs) -> tuple[float, int]:
    """Sum of -log p over positions 1.. of one prompt (position 0 has no logprob)."""
    total, n = 0.0, 0
    for pos in range(1, len(prompt_token_ids)):
        lp = prompt_logprobs[pos][prompt_token_ids[pos]].logprob
        if not math.isfinite(lp):
            raise ValueError(f"non-finite logprob {lp} at position {pos}")
        total -= lp
        n += 1
    return total, n


def perplexity(llm, token_windows, batch_size: int | None = None) -> dict:
    """Perplexity of ``llm`` (a vllm.LLM) on ``token_windows`` (lists of token ids).

    Returns {"ppl", "nll", "tokens", "windows", "window_ppl": [...], "seconds"}: ppl over all
    scored tokens together (not a mean of per-window ppls)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    windows = [list(map(int, w)) for w in token_windows]
    t0 = time.time()
    bs = batch_size or len(windows)
    total, n, per = 0.0, 0, []
    for i in range(0, len(windows), bs):
        chunk = windows[i : i + bs]
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in chunk], sp, use_tqdm=False)
        for w, o in zip(chunk, outs):
            s, k = nll_from_prompt_logprobs(w, o.prompt_logprobs)
            total += s
            n += k
            per.append(math.exp(s / k))
    return {"ppl": math.exp(total / n), "nll": total / n, "tokens": n, "windows": len(windows),
            "window_ppl": per, "seconds": time.time() - t0}


def _generate_checks(llm, max_tokens: int = 48) -> list[tuple[str, str]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    chat = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], sp,
                    use_tqdm=False)
    plain = llm.generate(["The history of the Roman Empire began when"], sp, use_tqdm=False)
    return [("chat", chat[0].outputs[0].text), ("plain", plain[0].outputs[0].text)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--data", default="data/wiki.txt")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--bos", action="store_true", help="prepend BOS to every window (counted in window-len)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    torch.set_num_threads(args.threads)
    from vllm import LLM

    t0 = time.time()
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              max_model_len=max(2048, args.window_len), seed=0)
    t_load = time.time() - t0
    print(f"engine ready in {t_load:.1f}s", flush=True)
    result = {"model": args.model, "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
              "engine_s": t_load}
    if not args.no_generate:
        t1 = time.time()
        for kind, text in _generate_checks(llm):
            print(f"[{kind}] {text!r}", flush=True)
            result[f"gen_{kind}"] = text
        print(f"generation in {time.time() - t1:.1f}s", flush=True)
    tok = llm.get_tokenizer()
    windows = wiki_windows(tok, args.data, args.windows, args.window_len, args.bos)
    r = perplexity(llm, windows)
    result.update({k: v for k, v in r.items()})
    print(f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens ({r['windows']} windows x {args.window_len}, "
          f"first token of each unscored) in {r['seconds']:.1f}s; per-window min "
          f"{min(r['window_ppl']):.2f} max {max(r['window_ppl']):.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
