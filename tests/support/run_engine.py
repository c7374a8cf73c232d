"""Run one vLLM engine in a fresh process and print a JSON result on the last stdout line.

Used by the tests: every engine gets its own process (vLLM keeps global state per process, and
the default mode spawns engine-core and worker processes that must load the plugin themselves).
"""

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--llm-kwargs", default="{}", help="JSON kwargs for vllm.LLM")
    ap.add_argument("--prompts", default="[]", help="JSON list of prompt strings")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from fp8_backend.vllm_adapter.evaluate import layer_report, prompt_logprobs

    kwargs = dict(dtype="bfloat16", kv_cache_memory_bytes=64 << 20, seed=0)
    kwargs.update(json.loads(args.llm_kwargs))
    prompts = json.loads(args.prompts)
    llm = LLM(model=args.model, **kwargs)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in prompts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0), use_tqdm=False)
    result = {
        "texts": [o.outputs[0].text for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_logprobs": prompt_logprobs(llm, ids),
        "report": layer_report(llm),
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    # The default (multi-process) engine leaves children behind if not shut down.
    del llm


if __name__ == "__main__":
    main()
