"""Calibration: run the 16-bit model on CPU with forward hooks and record activation ranges.

Recorded per run: amax of every quantized linear layer's INPUT (static input_scale) and amax of
every attention layer's k_proj / v_proj OUTPUT (k_scale / v_scale, as AutoFP8 and llm-compressor
calibrate them; note these are pre-RoPE keys). Compute is fp32 (the checkpoint's bf16 weights
upcast exactly), under torch.no_grad, one window at a time.

Memory: calibration needs the whole model (fp32: 4 bytes per parameter) plus one window's
activations; it runs BEFORE the streaming conversion and the model is freed before any shard is
converted, so the two peaks never add up.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .corpus import load_texts, token_windows
from .options import QuantizeOptions


def calibrate(model_dir: Path, quantized: list[str], attention: list[str], opts: QuantizeOptions,
              progress: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """(input amax per quantized linear layer, output amax per "<attn>.k_proj" / "<attn>.v_proj")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = load_texts(opts.calib)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tokenizer, text, opts.num_samples, opts.seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    inputs: dict[str, float] = {}
    outputs: dict[str, float] = {}
    modules = dict(model.named_modules())
    handles = []

    def track(store: dict[str, float], name: str, t: torch.Tensor) -> None:
        store[name] = max(store.get(name, 0.0), float(t.detach().abs().amax()))

    def linear_input(args, kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["input"]

    if opts.scheme == "static":
        for n in quantized:
            handles.append(modules[n].register_forward_hook(
                lambda m, args, kwargs, out, n=n: track(inputs, n, linear_input(args, kwargs)),
                with_kwargs=True))
    if opts.kv_cache:
        for a in attention:
            for proj in ("k_proj", "v_proj"):
                n = f"{a}.{proj}"
                handles.append(modules[n].register_forward_hook(
                    lambda m, args, out, n=n: track(outputs, n, out)))
    try:
        with torch.no_grad():
            for w in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
                model(torch.tensor([w]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        del model, modules
        gc.collect()
    for store, what in ((inputs, "input"), (outputs, "output")):
        for n, v in store.items():
            if not torch.isfinite(torch.tensor(v)):
                raise ValueError(f"calibration: {n} {what} amax is {v}; the model produced non-finite activations")
    return inputs, outputs
