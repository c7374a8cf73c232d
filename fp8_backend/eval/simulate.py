"""Engine vs simulation: does the engine compute what numerics.py says?

The simulation scores the same token windows as the engine with Hugging Face transformers alone
(no vLLM, no fp8-backend kernel):

- weights: each FP8 checkpoint's weights dequantized by :func:`fp8_backend.numerics.dequantize`
  (one scale per tensor, per output channel, or per block, as stored); online FP8
  (``quantization="fp8"`` on a 16-bit model) quantizes every linear layer but lm_head with
  numerics' per-tensor (or per-channel) quantization, as the plugin does while loading (each of
  q/k/v and gate/up its own scale, which is what the plugin keeps for fused layers);
- W8A8 emulation (``FP8_BACKEND_EMULATE_W8A8=1``): every quantized linear's input fake-quantized
  as the emulation does (static per-tensor with the checkpoint's ``input_scale``, dynamic per
  token, or 1 x block-K groups for block checkpoints);
- FP8 KV cache (this plugin's attention kernels): :mod:`fp8_backend.eval.kv_sim` fake-quantizes the
  post-RoPE keys and values with ``numerics.quantize_kv`` and the checkpoint's k/v scales (1.0
  without) and attends in fp32.

Like-for-like rule (:func:`like_for_like`): the engine computes activations, keys and values in
bf16. A configuration that rounds such values to FP8 (W8A8 emulation, FP8 KV cache) is simulated
in bfloat16, because 3 mantissa bits turn the ~2^-9 bf16-vs-fp32 difference into different FP8
values; every other configuration in float32 (the exact math).

Verdict (:func:`verdict`), per FP8 configuration: the engine's perplexity relative to its
simulation's, each first divided by its 16-bit reference's (the reference engine, and the
reference simulated in the same dtype): (ppl_engine / ppl_engine_ref) / (ppl_sim / ppl_sim_ref) - 1,
the accuracy report's "each vs its bf16" column. Dividing by the reference cancels what the
engine's bf16 activations alone do, an offset every configuration shares (0.05% on
SmolLM2-135M, 0.4% on the tiny random test llama); the direct comparison and the reference's
offset are reported beside it. "yes" when that difference is within :data:`TARGET_PCT` percent
and "no" when it is not, provided two standard errors (over windows) fit in the target; with less
text a difference counts as "no" only when it exceeds the target by more than two standard
errors, and is "undecided" otherwise (score more text).

transformers is imported lazily; this module never imports vLLM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..formats.scheme import PER_ROW, PER_TENSOR, ActivationQuant, Fp8Scheme, Granularity
from ..vllm_adapter import settings
from .metrics import logprob_agreement, perplexity, ppl_diff_se

#: engine vs like-for-like simulation: largest |perplexity difference| in percent that passes
TARGET_PCT = 0.2

#: vLLM's online-quantization names that the plugin serves, and their weight granularity
ONLINE_WEIGHTS = {"fp8": PER_TENSOR, "fp8_per_tensor": PER_TENSOR, "fp8_per_channel": PER_ROW}


class SimulationError(ValueError):
    """The simulation cannot run: the message names the model, checkpoint or tensor."""


def like_for_like(kv_cache_dtype: str, env: dict) -> str:
    """Simulation dtype that computes what the engine rounds: the engine's activations, keys and
    values are bf16; the W8A8 emulation rounds bf16 activations and an FP8 KV cache rounds bf16
    keys/values to FP8, so for those configurations only a bfloat16 simulation rounds the same
    values (3 mantissa bits turn the ~2^-9 bf16-vs-fp32 difference into different FP8 values).
    Other configurations: float32, the exact math."""
    return "bfloat16" if kv_cache_dtype.startswith("fp8") or settings.emulate_w8a8(env) else "float32"


@dataclass(frozen=True)
class SimSpec:
    """One simulation: ``model`` (16-bit, loaded by transformers) with the FP8 weights of
    ``checkpoint`` or quantized ``online`` (a weight Granularity); ``activations``: the W8A8
    emulation's input fake-quantization (formats.scheme.ActivationQuant) or None;
    ``kv_cache_dtype``: "fp8" / "fp8_e4m3" / "fp8_e5m2" or None (16-bit cache); ``dtype``: the
    compute dtype ("float32" or "bfloat16")."""

    model: str
    checkpoint: str | None = None
    online: Granularity | None = None
    activations: ActivationQuant | None = None
    kv_cache_dtype: str | None = None
    dtype: str = "float32"


def quantization_config(model: str | os.PathLike) -> dict | None:
    """``quantization_config`` of a model directory's config.json, or None."""
    try:
        return json.loads((Path(model) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None


def plan(model: str, quantization: str | None, kv_cache_dtype: str, reference: str, env: dict,
         engine_own_kv_kernels: bool | None = None) -> SimSpec | str:
    """The simulation of one ``fp8-backend eval`` configuration (``model`` with ``quantization``
    and ``kv_cache_dtype``, engine environment ``env``), or a string saying why it is not
    simulated. ``reference``: the 16-bit model that transformers loads (for an FP8 checkpoint,
    the model it was made from). ``engine_own_kv_kernels``: whether the engine's attention ran on
    this plugin's FP8 KV kernels (it decides "auto" KV dtypes, which vLLM turns into "fp8" for
    checkpoints that declare KV scales)."""
    from ..formats.checkpoint import parse_quantization_config

    emulate = settings.emulate_w8a8(env)
    qcfg = quantization_config(model)
    checkpoint, online, act = None, None, None
    if qcfg is not None:
        scheme = parse_quantization_config(qcfg)
        checkpoint = str(model)
        if emulate:
            act = scheme.scheme.w8a8_activation()
    elif quantization is not None:
        if quantization not in ONLINE_WEIGHTS:
            return f"quantization {quantization!r} is not simulated (expected one of {sorted(ONLINE_WEIGHTS)})"
        online = ONLINE_WEIGHTS[quantization]
        act = Fp8Scheme(PER_TENSOR).w8a8_activation() if emulate else None
    kv = kv_cache_dtype
    if kv in ("auto", "bfloat16", "float16", "float32"):
        kv = "fp8" if engine_own_kv_kernels else None
    elif kv.startswith("fp8"):
        if settings.attention_mode(env) == "vllm" or engine_own_kv_kernels is False:
            return ("FP8 KV cache on vLLM's attention kernels is not simulated (vLLM's FP8 cache write "
                    "rounds toward zero, numerics.py to nearest even)")
    else:
        return f"kv_cache_dtype {kv_cache_dtype!r} is not simulated"
    dtype = "bfloat16" if kv is not None or act is not None else "float32"
    return SimSpec(str(reference), checkpoint, online, act, kv, dtype)


def kv_scales(tensors: dict, n_layers: int) -> tuple[dict[int, object], dict[int, object]]:
    """Per layer index, the k and v scales a checkpoint stores (self_attn.k_scale / v_scale, or
    k_proj / v_proj.output_scale, or the deprecated single kv_scale); absent layers are left out
    (1.0, as the plugin defaults)."""
    ks, vs = {}, {}
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn"
        for out, short, proj in ((ks, "k_scale", "k_proj"), (vs, "v_scale", "v_proj")):
            for name in (f"{p}.{short}", f"{p}.{proj}.output_scale", f"{p}.kv_scale"):
                if name in tensors:
                    out[i] = tensors[name].float()
                    break
    return ks, vs


def load_tensors(checkpoint: str | os.PathLike) -> dict:
    """Every tensor of a checkpoint directory's *.safetensors files."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise SimulationError(f"{checkpoint}: expected *.safetensors files, found none")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def checkpoint_weights(model, checkpoint: str | os.PathLike, tensors: dict | None = None) -> dict:
    """Linear layer name -> fp32 weight that the FP8 checkpoint stores for it, dequantized by
    numerics.py with the scale layout its quantization_config declares (per tensor, per channel,
    or blocks with a partial last block); only layers of ``model`` (a torch module) whose weight
    is FP8 in the checkpoint. Raises SimulationError naming the layer on a missing scale or a
    shape that does not match the model."""
    import torch

    from .. import numerics
    from ..formats.checkpoint import parse_quantization_config

    qcfg = quantization_config(checkpoint)
    if qcfg is None:
        raise SimulationError(f"{checkpoint}: expected a quantization_config in config.json, found none")
    scheme = parse_quantization_config(qcfg)
    tensors = load_tensors(checkpoint) if tensors is None else tensors
    out = {}
    for name, mod in model.named_modules():
        q = tensors.get(f"{name}.weight")
        if not isinstance(mod, torch.nn.Linear) or q is None or q.dtype not in (numerics.E4M3, numerics.E5M2):
            continue
        scale = tensors.get(f"{name}.{scheme.weight_scale_name}")
        if scale is None:
            raise SimulationError(f"{checkpoint}: expected {name}.{scheme.weight_scale_name}, found none")
        g = scheme.scheme.weight  # stored scales: the granularity's grid (scalars for one scale)
        w = numerics.dequantize(q, scale.float().reshape(g.grid(q.shape)), g.block(q.shape))
        if tuple(w.shape) != tuple(mod.weight.shape):
            raise SimulationError(f"{checkpoint}: {name}.weight expected shape {tuple(mod.weight.shape)}, "
                                  f"found {tuple(w.shape)}")
        out[name] = w
    if not out:
        raise SimulationError(f"{checkpoint}: expected FP8 linear weights that match the model's layers, found none")
    return out


def online_weights(model, weight: Granularity = PER_TENSOR) -> dict:
    """Linear layer name -> fp32 weight as online FP8 stores it: every nn.Linear but lm_head
    quantized with ``weight``'s scales (per tensor: q, k, v, gate and up are separate layers
    here, so each gets its own scale, as the plugin keeps per shard), then dequantized."""
    import torch

    from .. import numerics

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
            w = mod.weight.detach()
            q, s = numerics.quantize_block(w, block_size=weight.block(w.shape))
            out[name] = numerics.dequantize(q, s, weight.block(w.shape))
    return out


def fake_quant_activations(x, act: ActivationQuant, input_scale=None):
    """What the W8A8 emulation makes of a linear input ``x``: FP8-rounded and scaled back
    (numerics.fake_quantize), in ``x.dtype``: the static ``input_scale``, or dynamic scales by
    the activation granularity's block shape (per token, 1 x k groups)."""
    return act.fake_quantize(x, input_scale)


def check_loadable(model: str) -> None:
    """SimulationError naming ``model`` unless transformers knows its config as a causal LM
    (cheap: reads config.json only, so a run fails before any engine starts)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    transformers.logging.set_verbosity_error()
    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 -- any config failure is reported with the model named
        raise SimulationError(f"transformers cannot read the config of {model!r}: {type(e).__name__}: "
                              f"{str(e)[:300]}") from None
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SimulationError(f"transformers has no causal LM for {model!r} (model_type "
                              f"{getattr(cfg, 'model_type', None)!r}); the simulation needs one")


def load_model(model: str, dtype: str):
    """transformers' causal LM of ``model`` in ``dtype``, eval mode; SimulationError naming the
    model if transformers cannot load it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    except Exception as e:  # noqa: BLE001 -- any loader failure is reported with the model named
        raise SimulationError(f"simulation: transformers cannot load {model!r} as a causal LM: "
                              f"{type(e).__name__}: {str(e)[:500]}") from None


def simulate(spec: SimSpec, windows: list[list[int]], threads: int = 1) -> list[list[float]]:
    """Log-probs of ``windows`` (every token but each window's first) under ``spec``."""
    import torch

    from . import kv_sim

    torch.set_num_threads(threads)
    m = load_model(spec.model, spec.dtype)
    tensors = load_tensors(spec.checkpoint) if spec.checkpoint else {}
    if spec.kv_cache_dtype is not None:
        n_layers = m.config.num_hidden_layers
        ks, vs = kv_scales(tensors, n_layers)
        kv_sim.install(m, ks, vs, spec.kv_cache_dtype)
    weights = {}
    if spec.checkpoint:
        weights = checkpoint_weights(m, spec.checkpoint, tensors)
    elif spec.online:
        weights = online_weights(m, spec.online)
    modules = dict(m.named_modules())
    for name, w in weights.items():
        mod = modules[name]
        mod.weight.data = w.to(mod.weight.dtype)
        if spec.activations is None:
            continue
        s_in = static_input_scale(tensors, name, spec.checkpoint) if spec.activations.static else None

        def pre_hook(_mod, args, s=s_in):
            return (fake_quant_activations(args[0], spec.activations, s),) + args[1:]

        mod.register_forward_pre_hook(pre_hook)
    return score_windows(m, windows)


#: layers vLLM fuses into one (q/k/v, gate/up): they read the same activation tensor
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def static_input_scale(tensors: dict, name: str, checkpoint) -> object:
    """The static input scale the W8A8 emulation uses for linear layer ``name``: its own
    ``input_scale``, or for a layer vLLM fuses with its siblings (q/k/v, gate/up) the largest of
    theirs, as the engine keeps one scale per fused layer (one activation tensor, one scale)."""
    prefix, _, short = name.rpartition(".")
    names = next((tuple(f"{prefix}.{n}" for n in group) for group in FUSED_SIBLINGS if short in group), (name,))
    scales = [tensors.get(f"{n}.input_scale") for n in names if f"{n}.weight" in tensors]
    if not scales or any(s is None for s in scales):
        raise SimulationError(f"{checkpoint}: W8A8 simulation expected input_scale for {', '.join(names)}, "
                              "found none for some")
    return max(s.float().max() for s in scales)


def score_windows(model, windows: list[list[int]]) -> list[list[float]]:
    """Log-prob of each window token given the ones before it (the first token has none)."""
    import torch

    out = []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            lp = torch.log_softmax(model(ids).logits.float()[0, :-1], -1)
            out.append(lp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def verdict(engine: list[list[float]], sim: list[list[float]], target_pct: float = TARGET_PCT,
            engine_ref: list[list[float]] | None = None, sim_ref: list[list[float]] | None = None) -> dict:
    """Engine against its simulation on the same windows. ``diff_pct`` / ``se_pct``: the engine's
    perplexity relative to the simulation's in percent and its standard error over windows
    (:func:`~fp8_backend.eval.metrics.ppl_diff_se`); with the 16-bit reference's engine and
    simulation log-probs, ``rel_pct`` / ``rel_se_pct``: the same after dividing each perplexity by
    its reference's (token by token, so the standard error is that of the offset-cancelled
    difference). The judged difference (``rel_pct`` when given, else ``diff_pct``) gives
    ``verdict``: "yes" / "no" by |difference| <= ``target_pct`` when 2 s.e. <= ``target_pct``;
    otherwise "no" only if |difference| - 2 s.e. > ``target_pct``, else "undecided". Also both
    perplexities and the per-token |delta log-prob| statistics."""
    a = logprob_agreement(sim, engine)
    diff, se = ppl_diff_se(sim, engine)
    out = {"ppl_sim": perplexity(sim), "ppl_engine": perplexity(engine), "diff_pct": diff, "se_pct": se,
           "mean_abs": a["mean_abs"], "p99_abs": a["p99_abs"], "max_abs": a["max_abs"], "target_pct": target_pct}
    judged, judged_se = diff, se
    if engine_ref is not None and sim_ref is not None:
        # token by token: (engine - sim) - (engine_ref - sim_ref), as ppl_diff_se's b - a
        lhs = [[s + e for s, e in zip(ws, we, strict=True)] for ws, we in zip(sim, engine_ref, strict=True)]
        rhs = [[e + s for e, s in zip(we, ws, strict=True)] for we, ws in zip(engine, sim_ref, strict=True)]
        judged, judged_se = ppl_diff_se(lhs, rhs)
        out.update(rel_pct=judged, rel_se_pct=judged_se)
    two_se = 2 * judged_se if judged_se == judged_se else float("inf")  # NaN (one window): no spread known
    if two_se <= target_pct:
        out["verdict"] = "yes" if abs(judged) <= target_pct else "no"
    else:
        out["verdict"] = "no" if abs(judged) - two_se > target_pct else "undecided"
    return out
