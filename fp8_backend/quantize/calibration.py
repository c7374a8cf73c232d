"""Calibration: run the 16-bit model on CPU with forward hooks and record activation ranges.

Recorded per run: amax of every quantized linear layer's INPUT (static input_scale) and amax of
every attention layer's k_proj / v_proj OUTPUT (k_scale / v_scale, as AutoFP8 and llm-compressor
calibrate them; note these are pre-RoPE keys). For mixture-of-experts layers, the input amax of
each expert's gate / up projection (the tokens routed to it) and down projection (SiLU(gate) * up
of those tokens), for the experts that get tokens; experts the calibration text never reaches
have no entry (the caller decides their scale). Compute is fp32 (the checkpoint's bf16 weights
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
from .experts import MoeLayer
from .options import QuantizeError, QuantizeOptions


def calibrate(model_dir: Path, quantized: list[str], attention: list[str], opts: QuantizeOptions,
              progress: bool = True, moe: dict[str, MoeLayer] | None = None
              ) -> tuple[dict[str, float], dict[str, float]]:
    """(input amax per quantized linear layer and per routed expert projection of the ``moe``
    layers, output amax per "<attn>.k_proj" / "<attn>.v_proj")."""
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
        for layer in (moe or {}).values():
            handles += _expert_hooks(modules, layer, lambda n, t: track(inputs, n, t))
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


def _expert_hooks(modules: dict, layer: MoeLayer, track) -> list:
    """Hooks recording the input amax of each expert projection of ``layer`` over the tokens
    routed to that expert. Experts as a ModuleList of MLPs: a hook on each projection (it runs
    only for routed tokens). Experts fused into 3-D weights (transformers' ``gate_up_proj``
    [E, 2I, H] with gate rows first, ``down_proj`` [E, H, I], ``act_fn``; called as
    ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights)``): one hook on the module
    that recomputes SiLU(gate) * up for each routed expert's tokens (the down projection's input)."""
    m = modules.get(layer.name)
    if m is None:
        found = [n for n in modules if n.endswith(".experts")][:3]
        raise QuantizeError(
            f"calibration: expected the transformers model to have the MoE module {layer.name} (named as "
            f"in the checkpoint), found none (its experts modules: {found}); use scheme 'dynamic' or 'block'"
        )
    if isinstance(m, torch.nn.ModuleList):
        handles = []
        for name in layer.projections:
            proj = modules.get(name)
            if not isinstance(proj, torch.nn.Linear):
                raise QuantizeError(f"calibration: expected expert projection {name} to be a Linear module, "
                                    f"found {type(proj).__name__}")
            handles.append(proj.register_forward_hook(
                lambda mod, args, kwargs, out, name=name: track(name, args[0] if args else kwargs["input"]),
                with_kwargs=True))
        return handles
    gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    e, i2 = layer.num_experts, None
    ok = (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
          and down.dim() == 3 and gate_up.shape[0] == e == down.shape[0] and callable(getattr(m, "act_fn", None))
          and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1])
    if not ok:
        raise QuantizeError(
            f"calibration: cannot compute the expert inputs of MoE layer {layer.name} ({type(m).__name__}): "
            f"expected gate_up_proj [{e}, 2I, H], down_proj [{e}, H, I] and act_fn; found "
            f"{[tuple(getattr(t, 'shape', ())) for t in (gate_up, down)]}; use scheme 'dynamic' or 'block'"
        )
    i2 = gate_up.shape[1]
    gate_bias, h = getattr(m, "gate_up_proj_bias", None), gate_up.shape[2]
    names = {(ex, role): n for n, (ex, role) in layer.projections.items()}

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = x.reshape(-1, h)
        idx = idx.reshape(x.shape[0], -1)
        for ex in torch.unique(idx).tolist():
            if not 0 <= ex < e:
                continue  # transformers marks tokens of experts on other ranks with index E
            xe = x[(idx == ex).any(dim=-1)]
            track(names[(ex, "gate")], xe)
            track(names[(ex, "up")], xe)
            gu = torch.nn.functional.linear(xe, gate_up[ex], None if gate_bias is None else gate_bias[ex])
            g, u = gu[:, : i2 // 2], gu[:, i2 // 2:]
            track(names[(ex, "down")], mod.act_fn(g) * u)

    return [m.register_forward_hook(hook, with_kwargs=True)]
