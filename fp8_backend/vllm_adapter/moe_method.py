"""fp8-backend's own FusedMoE method: FP8 experts served by ``kernels.fused_moe_w8a16`` (W8A16).

vLLM's FusedMoE layer (RoutedExperts) owns the expert parameters and fills them through its
``weight_loader``; its runner picks the experts of each token (the model's router: softmax or
grouped top-k, renormalization, correction bias, exactly as for 16-bit experts) and calls
:meth:`Fp8FusedMoEMethod.apply` with ``topk_weights`` / ``topk_ids``. Shared experts (Qwen2-MoE,
DeepSeek) are ordinary linear layers, served by the dense method, and added by the runner.

Parameters, as vLLM's loader fills them (one slot per local expert, gate rows [0, I) and up rows
[I, 2I) of ``w13``):

* ``w13_weight`` [E, 2I, H] and ``w2_weight`` [E, H, I], float8_e4m3fn.
* Weight scales, under the checkpoint's tensor name (``weight_scale`` or, for the "fp8" format's
  blocks, ``weight_scale_inv``): per tensor [E, 2] (gate, up) and [E]; per channel [E, 2I, 1] and
  [E, H, 1]; blocks [bn, bk]: gate and up keep a grid each, [E, 2*ceil(I/bn), ceil(H/bk)] and
  [E, ceil(H/bn), ceil(I/bk)]. Stored bf16 / fp16 scales are converted to fp32 (exactly).
* Static checkpoints: ``w13_input_scale`` / ``w2_input_scale`` [E], checked and not used: this
  CPU has no FP8 arithmetic, activations stay 16-bit, as in the dense path.

After loading, the scales take the kernel's layout (numerics.moe_scale_shapes): per-tensor
scales become per-channel rows holding the gate's, the up projection's and the down
projection's own scale (exact: nothing is re-quantized), per-channel scales lose their last
dimension, block grids stay as loaded.

Online FP8 (a 16-bit checkpoint with ``quantization="fp8"``): the same FP8 parameters are created
and each expert's 16-bit tensor is quantized inside the weight loader the moment it arrives
(per tensor by default: one scale for each expert's gate, up and down projection, kept as
per-channel rows; or per channel), then copied into its slot. Only the one expert tensor being
loaded (and the fp32 temporaries of one block of its rows) is ever held in 16-bit, never the
layer: peak memory stays near the FP8 model's.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

from .. import kernels
from ..kernels.huge_pages import huge_page_empty
from ..formats.checkpoint import CheckpointFormat, CheckpointFormatError
from ..formats.layer_tensors import first_unfilled, stored_scale_shapes, unfilled_scales
from ..formats.scheme import PER_ROW, PER_TENSOR, Granularity
from .linear import quantize_linear_weight
from .layer_owner import check_activation_dtype
from .moe import checkpoint_tensor_name

logger = logging.getLogger("vllm.fp8_backend")

_E4M3 = torch.float8_e4m3fn
# Scales start unfilled (formats.layer_tensors.unfilled_scales), so a slot no checkpoint tensor
# filled can never pass for a scale (the completeness check names it first).
_missing = unfilled_scales


class Fp8FusedMoEMethod(FusedMoEMethodBase):
    """FP8 experts (SiLU-and-mul, no biases) on CPU: from an FP8 checkpoint (``checkpoint``) or
    quantized online from 16-bit weights (``online_weight`` per-tensor or per-channel)."""

    def __init__(
        self,
        moe_config,
        prefix: str,
        *,
        checkpoint: CheckpointFormat | None = None,
        online_weight: Granularity | None = None,
    ) -> None:
        super().__init__(moe_config)
        if (checkpoint is None) == (online_weight is None):
            raise ValueError("Fp8FusedMoEMethod: give exactly one of checkpoint and online_weight")
        if online_weight is not None and not online_weight.whole_rows:
            raise ValueError(f"{prefix}: online FP8 MoE: expected per-tensor or per-channel weights, "
                             f"found {online_weight.words()}")
        self.prefix = prefix
        self.checkpoint = checkpoint
        self.online_weight = online_weight
        if checkpoint is not None:
            self.weight = checkpoint.scheme.weight
            self.scale_name = checkpoint.weight_scale_name
            self.static_inputs = checkpoint.input_scale_name is not None
        else:
            self.weight = PER_ROW  # online per-tensor scales are stored as equal rows
            self.scale_name = "weight_scale"
            self.static_inputs = False
        self.block_size = (self.weight.rows, self.weight.cols) if self.weight.cols else None
        self._seen: dict[int, dict[tuple[int, str], str]] = {}  # online: what each expert brought

    # -- vLLM's FusedMoEMethodBase interface ---------------------------------------------------

    @property
    def supports_eplb(self) -> bool:
        return False

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        # Read by vLLM's modular kernels only; this method runs its own kernel.
        return FusedMoEQuantConfig.make()

    def create_weights(
        self,
        layer,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        check_activation_dtype(self.prefix, params_dtype)
        e, h, i = num_experts, hidden_size, intermediate_size_per_partition
        moe = layer.moe_config
        tp = moe.moe_parallel_config.tp_size
        if self.block_size is not None and tp > 1:
            bn, bk = self.block_size
            if i % bn or i % bk:
                raise NotImplementedError(
                    f"{self.prefix}: block-FP8 experts with tensor parallelism need an expert "
                    f"width per rank that is a multiple of the {bn}x{bk} block; found {i} "
                    f"(moe_intermediate_size {moe.intermediate_size} over {tp} ranks)"
                )
        layer.orig_dtype = params_dtype
        # config.json's sizes (a backend may pad the parameters; the checkpoint holds these)
        hidden = getattr(moe, "hidden_dim_unpadded", None) or h
        layer.fp8_moe_sizes = dict(hidden=hidden, intermediate=moe.intermediate_size, experts=e, tp=tp)
        loader = extra_weight_attrs["weight_loader"]
        loader = self._online_loader(layer, loader) if self.online_weight else self._shape_checked_loader(layer, loader)
        attrs = {"weight_loader": loader}

        def add(name: str, data: torch.Tensor, quant_method: str | None = None) -> None:
            p = torch.nn.Parameter(data, requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, attrs if quant_method is None else {**attrs, "quant_method": quant_method})

        add("w13_weight", _expert_weights(e, 2 * i, h))
        add("w2_weight", _expert_weights(e, h, i))
        s13, s2, how = self._loaded_scale_shapes(e, h, i)
        add(f"w13_{self.scale_name}", _missing(*s13), how)
        add(f"w2_{self.scale_name}", _missing(*s2), how)
        if self.static_inputs:
            add("w13_input_scale", _missing(e), FusedMoeWeightScaleSupported.TENSOR.value)
            add("w2_input_scale", _missing(e), FusedMoeWeightScaleSupported.TENSOR.value)
        else:
            layer.w13_input_scale = None
            layer.w2_input_scale = None

    def _loaded_scale_shapes(self, e: int, h: int, i: int):
        """The scale parameters vLLM's expert loader fills: per expert, gate and up each keep
        their own grid (stacked along rows), down its grid; per-tensor in vLLM's [E, 2] / [E]."""
        g = self.weight
        if g == PER_TENSOR:
            return (e, 2), (e,), FusedMoeWeightScaleSupported.TENSOR.value
        (gi, gh), (gh2, gi2) = g.grid((i, h)), g.grid((h, i))
        how = FusedMoeWeightScaleSupported.BLOCK if g.cols else FusedMoeWeightScaleSupported.CHANNEL
        return (e, 2 * gi, gh), (e, gh2, gi2), how.value

    # -- loading -------------------------------------------------------------------------------

    def _expected_shape(self, layer, weight_name: str, shard_id: str) -> tuple[tuple[int, ...], ...] | None:
        """Accepted shapes of one expert's checkpoint tensor (before tensor-parallel slicing),
        from config.json's sizes; None for tensors not checked here."""
        sz = layer.fp8_moe_sizes
        h, i = sz["hidden"], sz["intermediate"]
        n, k = (i, h) if shard_id in ("w1", "w3") else (h, i)
        if weight_name.endswith("input_scale"):
            return ((), (1,))
        if weight_name.endswith(("weight_scale", "weight_scale_inv")):
            return stored_scale_shapes(self.weight, (n, k))
        if weight_name.endswith("weight"):
            return ((n, k),)
        return None

    def _check_shape(self, layer, loaded: torch.Tensor, weight_name: str, shard_id: str, expert_id: int) -> None:
        accepted = self._expected_shape(layer, weight_name, shard_id)
        if accepted is None or tuple(loaded.shape) in accepted:
            return
        sz = layer.fp8_moe_sizes
        what = {"w1": "gate projection", "w3": "up projection", "w2": "down projection"}.get(shard_id, shard_id)
        raise CheckpointFormatError(
            f"{checkpoint_tensor_name(layer, weight_name, shard_id, expert_id)}: expected shape {list(accepted[0])} for one expert's {what} "
            f"(config.json: hidden_size {sz['hidden']}, expert intermediate size "
            f"{sz['intermediate']}{self._scheme_words()}), found {list(loaded.shape)}"
        )

    def _scheme_words(self) -> str:
        return f", {self.weight.words()} scales"

    def _shape_checked_loader(self, layer, loader):
        """vLLM's loader copies an expert tensor into its slot with broadcasting, so a tensor of
        the wrong shape can fail without its name or even load silently: check it first."""

        def load(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs):
            self._check_shape(layer, loaded_weight, weight_name, shard_id, expert_id)
            if self.weight == PER_ROW and "weight_scale" in weight_name and loaded_weight.dim() == 1:
                loaded_weight = loaded_weight.reshape(-1, 1)
            return loader(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs)

        return load

    def _online_loader(self, layer, loader):
        """Quantize each 16-bit expert tensor as it arrives, then load the FP8 values and their
        scale rows through vLLM's loader (which places them, tensor-parallel slicing included)."""

        def load(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs):
            self._check_shape(layer, loaded_weight, weight_name, shard_id, expert_id)
            if not (weight_name.endswith("weight") and param.dtype == _E4M3):
                return loader(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs)
            name = checkpoint_tensor_name(layer, weight_name, shard_id, expert_id)
            if loaded_weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise CheckpointFormatError(
                    f"{name}: expected a 16-bit expert weight to quantize online, found {loaded_weight.dtype}"
                )
            stem = "w2" if shard_id == "w2" else "w13"
            scale = getattr(layer, f"{stem}_weight_scale")
            for p in (param, scale):
                self._seen.setdefault(id(p), {})[(int(expert_id), str(shard_id))] = name
            to_local = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
            if to_local is not None and to_local(int(expert_id)) == -1:
                # Expert parallelism: another rank's expert. vLLM's loader skips it untouched.
                return loader(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs)
            q, s = quantize_linear_weight(loaded_weight, self.online_weight, [loaded_weight.shape[0]], name)
            rows = s.reshape(-1, 1).expand(loaded_weight.shape[0], 1).contiguous()
            ok = loader(param, q, weight_name, shard_id, expert_id, *args, **kwargs)
            loader(scale, rows, f"{weight_name}_scale", shard_id, expert_id, *args, **kwargs)
            return ok

        return load

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_fp8_backend_ready", False):
            return
        if self.online_weight is not None:
            from .moe import _check_experts_complete

            _check_experts_complete(layer, self.prefix, self._seen)
        e = layer.w13_weight.shape[0]
        i = layer.w2_weight.shape[2]
        h = layer.w2_weight.shape[1]
        s13 = getattr(layer, f"w13_{self.scale_name}").data
        s2 = getattr(layer, f"w2_{self.scale_name}").data
        _check_loaded_scale(f"{self.prefix}.w13_{self.scale_name}", s13)
        _check_loaded_scale(f"{self.prefix}.w2_{self.scale_name}", s2)
        if self.weight == PER_TENSOR:
            # One exact scale per expert and projection, as per-channel rows.
            s13 = torch.cat([s13[:, 0:1].expand(e, i), s13[:, 1:2].expand(e, i)], dim=1)
            s2 = s2.reshape(e, 1).expand(e, h)
        elif self.weight == PER_ROW:
            s13, s2 = s13.reshape(e, 2 * i), s2.reshape(e, h)
        if self.static_inputs:
            from .checkpoint_linear import _log_static_once

            _check_loaded_scale(f"{self.prefix}.w13_input_scale", layer.w13_input_scale.data)
            _check_loaded_scale(f"{self.prefix}.w2_input_scale", layer.w2_input_scale.data)
            _log_static_once()
        for stem, s in (("w13", s13), ("w2", s2)):
            delattr(layer, f"{stem}_{self.scale_name}")
            layer.register_parameter(
                f"{stem}_weight_scale",
                torch.nn.Parameter(s.float().contiguous(), requires_grad=False),
            )
        layer.fp8_block_size = list(self.block_size) if self.block_size else None
        layer._fp8_backend_ready = True

    # -- forward -------------------------------------------------------------------------------

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        expert_map = layer.expert_map
        if expert_map is not None:
            # Expert parallelism: global ids -> this rank's slots; other ranks' experts count 0.
            local = expert_map[topk_ids.long()]
            keep = local >= 0
            topk_ids = torch.where(keep, local, torch.zeros_like(local))
            topk_weights = torch.where(keep, topk_weights, torch.zeros_like(topk_weights))
        return kernels.fused_moe_w8a16(
            x,
            layer.w13_weight,
            layer.w13_weight_scale,
            layer.w2_weight,
            layer.w2_weight_scale,
            topk_weights.float(),
            topk_ids,
            layer.fp8_block_size,
        )


def _expert_weights(*shape: int) -> torch.Tensor:
    """The FP8 expert weights, filled expert by expert by the loader: on CPU in huge pages, as
    dense FP8 weights are (kernels/huge_pages.py), because every decode step streams them."""
    if torch.empty(0).device.type == "cpu":
        return huge_page_empty(shape, _E4M3)
    return torch.empty(*shape, dtype=_E4M3)


def _check_loaded_scale(name: str, s: torch.Tensor) -> None:
    """Every slot of a loaded scale parameter filled (the loader checked each checkpoint tensor's
    values with formats' check_scale; this catches a slot no tensor filled that the completeness
    check cannot see)."""
    idx = first_unfilled(s)
    if idx is not None:
        raise CheckpointFormatError(
            f"{name}{list(idx)} (expert {idx[0]}): expected a finite scale > 0, found nothing: no "
            f"checkpoint tensor filled it"
        )
