"""Linear method for FP8 checkpoints (AutoFP8 / vLLM "fp8" format): FP8 weights and their
scales are loaded as stored, then served by the W8A16 kernel.

Fused layers (q/k/v, gate/up) arrive as separate checkpoint tensors with one scale each. vLLM's
own method re-quantizes every shard to the largest scale, which rounds again; here each shard
keeps its own scale, exactly, as a per-output-channel vector.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BlockQuantScaleParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from .. import kernels
from ..formats.checkpoint import CheckpointFormat, CheckpointFormatError
from ..formats.scheme import PER_ROW, PER_TENSOR
from ..formats.layer_tensors import (
    check_fp8_weight,
    check_scalar_scale,
    check_scale,
    check_weight_scale,
    check_weight_shape,
    check_zero_point,
    first_unfilled,
    unfilled_scales,
)
from .layer_owner import check_activation_dtype
from .linear_paths import apply_linear, path_for_device, prepare_layer

logger = logging.getLogger("vllm.fp8_backend")

_NAN_CODE = 0x7F  # e4m3fn NaN: weights start as NaN so a tensor the checkpoint lacks is caught
_static_logged = False


def _shard_index(args, kwargs) -> int | None:
    """The shard a fused layer's loader is called for (q/k/v or 0, 1, ...), None for a whole layer."""
    shard_id = args[0] if args else kwargs.get("loaded_shard_id")
    if shard_id is None:
        return None
    return _QKV[shard_id] if isinstance(shard_id, str) else int(shard_id)


class _Tensors:
    """What one layer's loaders check each checkpoint tensor against (formats' rules): the
    scheme, and each shard's full [N, K] in the checkpoint (before tensor-parallel slicing)."""

    def __init__(self, prefix: str, checkpoint: CheckpointFormat, shard_rows: tuple[int, ...], k_full: int):
        self.prefix, self.checkpoint = prefix, checkpoint
        self.shard_rows, self.k_full = shard_rows, k_full

    def scale_name(self, name: str, shard: int | None) -> str:
        """"<prefix>.<name>", with "(shard i of n)" for a fused layer."""
        full = f"{self.prefix}.{name}"
        n = len(self.shard_rows)
        return f"{full} (shard {shard} of {n})" if n > 1 and shard is not None else full

    def check(self, role: str, t: torch.Tensor, shard: int | None, *, values: bool) -> None:
        """Before vLLM's loader (``values``): dtype, values, a weight's rank; after it, the
        scale's shape by strategy: formats' rule decides whatever vLLM's loader lets through
        (its own shape errors come first, wrapped with the layer's sizes)."""
        if role == "weight":
            if values:
                name = f"{self.prefix}.weight"
                check_weight_shape(name, check_fp8_weight(name, t, self.checkpoint.fp8_dtype))
            return
        name = self.scale_name(self.checkpoint.weight_scale_name if role == "weight_scale" else role, shard)
        if values:
            check_scale(name, t)
        elif role == "weight_scale":
            n = self.shard_rows[shard or 0]
            check_weight_scale(name, t, self.checkpoint, n, self.k_full, check_values=False)
        else:
            check_scalar_scale(name, t, "per-tensor input")


def _checked_loader(loader, role: str, tensors: _Tensors, layer_shape: str):
    """Wrap vLLM's weight loader with formats' checks: a copy into our parameter would silently
    convert any dtype, and a tensor of the wrong shape fails inside vLLM's loader without its
    name (or, for a scale, may be broadcast)."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        shard = _shard_index(args, kwargs)
        tensors.check(role, loaded_weight, shard, values=True)
        if role == "weight_scale" and tensors.checkpoint.scheme.weight == PER_ROW and loaded_weight.dim() == 1:
            loaded_weight = loaded_weight.reshape(-1, 1)  # [N] is the same per-channel scale as [N, 1]
        try:
            out = loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError, ValueError, IndexError) as e:
            name = f"{tensors.prefix}.{role if role != 'weight_scale' else tensors.checkpoint.weight_scale_name}"
            sid = args[0] if args else kwargs.get("loaded_shard_id")
            where = f" (shard {sid})" if sid is not None else ""
            raise CheckpointFormatError(
                f"{name}{where}: expected a tensor that fits this layer's parameter "
                f"{list(param.shape)} ({layer_shape}), found shape {list(loaded_weight.shape)}"
                + (f"; vLLM's loader said: {e}" if str(e) else "")
            ) from e
        tensors.check(role, loaded_weight, shard, values=False)
        return out

    return load


@register_weight_loader_v2_supported_method
class Fp8CheckpointLinearMethod(LinearMethodBase):
    """FP8 weights stored in the checkpoint; per-tensor, per-channel or block weight scales."""

    def __init__(self, checkpoint: CheckpointFormat, prefix: str = "", zero_points: tuple[str, ...] = ()) -> None:
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.zero_points = zero_points  # zero-point tensor names the checkpoint stores (checked, dropped)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        check_activation_dtype(self.prefix, params_dtype)
        loader = extra_weight_attrs.get("weight_loader")
        n, k = sum(output_partition_sizes), input_size_per_partition
        what = self.checkpoint.scheme.weight.words()
        shapes = f"{what} scales, output widths {list(output_partition_sizes)}, input size {k} per rank, from config.json"
        layer.logical_widths = list(output_partition_sizes)
        layer.orig_dtype = params_dtype
        rows = _block_tp_layout(layer, output_partition_sizes, output_size, k, input_size, 1, 1)
        tensors = _Tensors(self.prefix, self.checkpoint, rows.full_rows, input_size)
        weight = ModelWeightParameter(
            data=torch.full((n, k), _NAN_CODE, dtype=torch.uint8).view(torch.float8_e4m3fn),
            input_dim=1,
            output_dim=0,
            weight_loader=_checked_loader(loader, "weight", tensors, shapes),
        )
        layer.register_parameter("weight", weight)
        g = self.checkpoint.scheme.weight
        # vLLM's own parameter classes (their loaders know how each granularity is sharded)
        if g == PER_TENSOR:
            scale = PerTensorScaleParameter(
                data=unfilled_scales(len(output_partition_sizes)),
                weight_loader=_checked_loader(loader, "weight_scale", tensors, shapes),
            )
        elif g == PER_ROW:
            scale = ChannelQuantScaleParameter(
                data=unfilled_scales(n, 1),
                output_dim=0,
                weight_loader=_checked_loader(loader, "weight_scale", tensors, shapes),
            )
        else:
            bn, bk = g.rows, g.cols
            tp = _block_tp_layout(layer, output_partition_sizes, output_size, k, input_size, bn, bk)
            layer.block_tp = tp
            scale = BlockQuantScaleParameter(
                data=unfilled_scales(sum(tp.rows), tp.k_blocks),
                input_dim=1,
                output_dim=0,
                weight_loader=_block_scale_loader(tensors, tp),
            )
        layer.register_parameter(self.checkpoint.weight_scale_name, scale)
        if self.checkpoint.input_scale_name is not None:
            input_scale = PerTensorScaleParameter(
                data=unfilled_scales(len(output_partition_sizes)),
                weight_loader=_checked_loader(loader, "input_scale", tensors, shapes),
            )
            layer.register_parameter("input_scale", input_scale)
        for zp in self.zero_points:
            layer.register_parameter(zp, torch.nn.Parameter(torch.empty(0), requires_grad=False))
            getattr(layer, zp).weight_loader = _zero_point_loader(zp, tensors)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_fp8_backend_ready", False):
            return
        w = layer.weight.data
        if bool(((w.view(torch.uint8) & 0x7F) == _NAN_CODE).all(dim=1).any()):
            rows = ((w.view(torch.uint8) & 0x7F) == _NAN_CODE).all(dim=1).nonzero().flatten()
            raise CheckpointFormatError(
                f"{self.prefix}.weight: expected an F8_E4M3 tensor for every shard of "
                f"{layer.logical_widths} output rows, found rows {int(rows[0])}..{int(rows[-1])} "
                f"missing from the checkpoint"
            )
        w = kernels.w8a16_prepack(w, f"{self.prefix}.weight")
        raw = getattr(layer, self.checkpoint.weight_scale_name).data  # fp32: created so, loaded by copy
        scale = self._check_filled(raw, self.checkpoint.weight_scale_name, layer)
        g = self.checkpoint.scheme.weight
        if g == PER_TENSOR and len(layer.logical_widths) > 1:
            # One exact scale per shard, expanded to one per output row.
            scale = torch.cat([s.expand(width) for s, width in zip(scale, layer.logical_widths)])
        block = None
        if g.cols:
            scale, block = self._block_layout(scale, layer)
        else:
            scale = scale.reshape(-1).contiguous()
        layer.block_size = block
        delattr(layer, self.checkpoint.weight_scale_name)
        for zp in self.zero_points:
            delattr(layer, zp)
        if self.checkpoint.input_scale_name is not None:
            self._check_filled(layer.input_scale.data, "input_scale", layer)
            _log_static_once()
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        layer._fp8_backend_ready = True
        path = path_for_device(w.device, self.checkpoint.scheme)
        prepare_layer(layer, path, self.prefix)  # CPU: unchanged; GPU: W8A8 or repacked W8A16

    def _block_layout(self, scale: torch.Tensor, layer) -> tuple[torch.Tensor, list[int]]:
        """Block grid for the kernel, which maps local row n to scale row n // bn and local column
        k to scale column k // bk.

        Exact as loaded when every shard but the last is a multiple of bn and this rank's rows
        and columns start on block boundaries (TP=1, or 128-aligned tensor-parallel shards).
        Otherwise the grid is re-indexed so that each weight element keeps its own checkpoint
        block's scale: rows expanded to one scale row per output row (block [1, bk]) when a
        shard or this rank's part of it starts inside a block; when this rank's input columns
        start inside a block (row-parallel K split at an offset off_k that is not a multiple of
        bk), columns in blocks of g = gcd(off_k, bk), each of which lies inside one checkpoint
        block."""
        bn, bk = self.checkpoint.scheme.weight.block(layer.weight.shape)
        tp: _BlockTp = layer.block_tp
        widths = layer.logical_widths
        k_local = layer.weight.shape[1]
        k_out = bk
        if tp.k_offset % bk:
            k_out = math.gcd(tp.k_offset, bk)
            if layer.weight.device.type != "cpu":
                raise CheckpointFormatError(
                    f"{self.prefix}.{self.checkpoint.weight_scale_name}: this tensor-parallel rank holds input "
                    f"columns [{tp.k_offset}, {tp.k_offset + k_local}) of K={tp.k_full}, which splits "
                    f"{bn}x{bk} scale block {tp.k_offset // bk}; fp8-backend serves such shards exactly on "
                    f"CPU only (GPU kernels need shard boundaries on multiples of {bk}: choose a "
                    f"tensor_parallel_size that divides {tp.k_full // bk} blocks)"
                )
            first = tp.k_offset // bk
            cols = [(tp.k_offset + j * k_out) // bk - first for j in range(-(-k_local // k_out))]
            scale = scale[:, torch.tensor(cols)]
        if all(p == 0 for p in tp.phases) and all(w % bn == 0 for w in widths[:-1]):
            return scale.contiguous(), [bn, k_out]
        index = []
        start = 0
        for width, rows, phase in zip(widths, tp.rows, tp.phases):
            index += [start + (phase + r) // bn for r in range(width)]
            start += rows
        return scale[torch.tensor(index)].contiguous(), [1, k_out]

    def _check_filled(self, s: torch.Tensor, name: str, layer) -> torch.Tensor:
        """Every slot of a scale parameter came from the checkpoint (the loaders checked each
        tensor's values as it arrived)."""
        idx = first_unfilled(s)
        if idx is not None:
            i = idx[0]
            where = f" (shard {i} of {len(layer.logical_widths)})" if s.numel() == len(layer.logical_widths) > 1 else ""
            raise CheckpointFormatError(
                f"{self.prefix}.{name}{where}: expected a finite scale > 0, found missing from the checkpoint"
            )
        return s

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_linear(layer, x, bias)


_QKV = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class _BlockTp:
    """Which part of each checkpoint block-scale grid this tensor-parallel rank keeps.

    Shard i (one of q/k/v or gate/up, or the whole layer) covers global output rows
    [offsets[i], offsets[i] + widths[i]) of a checkpoint grid with full_rows[i] block rows; the
    rank keeps block rows first_rows[i] .. + rows[i] (every block its rows touch, so a block a
    shard boundary splits is kept on both sides), and phases[i] = offsets[i] - first_rows[i] * bn
    of them precede its first row. Columns likewise: input columns [k_offset, k_offset + K_local)
    of k_full, block columns k_first .. + k_blocks."""

    rows: tuple[int, ...]
    first_rows: tuple[int, ...]
    phases: tuple[int, ...]
    full_rows: tuple[int, ...]
    k_offset: int
    k_first: int
    k_blocks: int
    k_full: int
    full_k_blocks: int


def _tp_rank_size() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no model-parallel group: a single process
        return 0, 1


def _block_tp_layout(layer, widths: list[int], output_size: int, k: int, input_size: int,
                     bn: int, bk: int) -> _BlockTp:
    """This rank's share of the block grids: output rows split by a column-parallel layer
    (its per-rank widths sum to less than output_size), input columns by a row-parallel one
    (input_size_per_partition < input_size). A QKV layer whose KV heads are replicated on
    several ranks (num_kv_head_replicas) gives its k/v shards to rank // replicas."""
    rank, size = _tp_rank_size()
    col_split = size > 1 and sum(widths) != output_size
    row_split = size > 1 and k != input_size
    rows, first, phases, full = [], [], [], []
    for i, width in enumerate(widths):
        replicas = int(getattr(layer, "num_kv_head_replicas", 1)) if i > 0 else 1
        r = rank // replicas if col_split else 0
        parts = size // replicas if col_split else 1
        offset = r * width
        f = offset // bn
        rows.append(-(-(offset + width) // bn) - f)
        first.append(f)
        phases.append(offset - f * bn)
        full.append(-(-(width * parts) // bn))
    k_offset = rank * k if row_split else 0
    k_first = k_offset // bk
    return _BlockTp(tuple(rows), tuple(first), tuple(phases), tuple(full), k_offset, k_first,
                    -(-(k_offset + k) // bk) - k_first, input_size, -(-input_size // bk))


def _zero_point_loader(name: str, tensors: _Tensors):
    """A symmetric scheme's zero point: checked to be all zeros, then dropped."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        check_zero_point(tensors.scale_name(name, _shard_index(args, kwargs)), loaded_weight)

    return load


def _block_scale_loader(tensors: _Tensors, tp: _BlockTp):
    """Copy this rank's block rows / columns of one shard's checkpoint grid (the full
    [ceil(rows / bn), ceil(K / bk)] grid of that shard) to rows [sum(rows[:i]), +rows[i])."""

    def load(param, loaded_weight: torch.Tensor, shard_id=None, *args, **kwargs):
        i = _shard_index((shard_id,), {}) or 0
        tensors.check("weight_scale", loaded_weight, i, values=True)
        tensors.check("weight_scale", loaded_weight, i, values=False)
        start = sum(tp.rows[:i])
        part = loaded_weight[tp.first_rows[i] : tp.first_rows[i] + tp.rows[i], tp.k_first : tp.k_first + tp.k_blocks]
        param.data[start : start + tp.rows[i]].copy_(part)

    return load


def _log_static_once() -> None:
    global _static_logged
    if not _static_logged:
        _static_logged = True
        logger.info(
            "fp8-backend: static input scales loaded and checked; this CPU has no FP8 arithmetic, "
            "so activations stay 16-bit (W8A16), as vLLM's Marlin path does on GPUs without FP8"
        )
