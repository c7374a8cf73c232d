"""Quantize one weight tensor with numerics.py (amax scales, optionally MSE-searched clipping).

Returns the tensors a checkpoint stores for the layer: the FP8 weight and its scale, named and
shaped as the chosen format expects.
"""

from __future__ import annotations

import torch

from .. import numerics
from .options import QuantizeOptions

#: Clipping ratios tried by the MSE scale search; 1.0 (plain amax) is always among them.
MSE_GRID = tuple(round(0.70 + 0.01 * i, 2) for i in range(31))


def _group_sum(err: torch.Tensor, strategy: str, block_size: tuple[int, int]) -> torch.Tensor:
    """Sum of squared errors per scale group: [] (tensor), [N, 1] (channel) or block grid."""
    if strategy == "tensor":
        return err.sum()
    if strategy == "channel":
        return err.sum(dim=-1, keepdim=True)
    bn, bk = block_size
    p = numerics._pad_to_blocks(err, bn, bk)
    return p.reshape(p.shape[0] // bn, bn, p.shape[1] // bk, bk).sum(dim=(1, 3))


def _amax(w: torch.Tensor, strategy: str, block_size: tuple[int, int]) -> torch.Tensor:
    if strategy == "tensor":
        return w.abs().amax() if w.numel() else torch.zeros(())
    if strategy == "channel":
        return w.abs().amax(dim=-1, keepdim=True)
    return numerics.block_amax(w, block_size)


def _expand(scale: torch.Tensor, w: torch.Tensor, strategy: str, block_size) -> torch.Tensor:
    if strategy == "block":
        return numerics.expand_block_scale(scale, tuple(w.shape), block_size)
    return scale


def choose_scale(w: torch.Tensor, strategy: str, search: str = "none",
                 block_size: tuple[int, int] = numerics.BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, sse): the fp32 scale per group and its summed squared quantization error.

    "none": numerics.compute_scale(amax), the same scale as numerics.quantize_per_*.
    "mse": per group, the ratio r in MSE_GRID whose scale compute_scale(amax * r) gives the
    least squared error; a group only moves off r = 1 on a strict improvement, so the result is
    never worse than amax."""
    w = w.float()
    amax = _amax(w, strategy, block_size)
    best = numerics.compute_scale(amax)

    def sse(scale):
        q = numerics.quantize_with_scale(w, _expand(scale, w, strategy, block_size))
        return _group_sum((numerics.dequantize(q, _expand(scale, w, strategy, block_size)) - w) ** 2,
                          strategy, block_size)

    best_err = sse(best)
    if search == "mse":
        for r in MSE_GRID:
            if r == 1.0:
                continue
            cand = numerics.compute_scale(amax * r)
            err = sse(cand)
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
    return best, best_err


def quantize_weight(w: torch.Tensor, layer: str, opts: QuantizeOptions) -> tuple[dict[str, torch.Tensor], float, float]:
    """The checkpoint tensors for linear layer ``layer`` with 16-bit weight ``w``, and
    (sse of the chosen scales, sse of plain amax scales) for reporting the search's gain.

    Raises ValueError naming the tensor if ``w`` holds NaN or Inf."""
    name = f"{layer}.weight"
    numerics.check_finite(w, name)  # 16-bit input: NaN / Inf named before quantizing
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] linear weight, found shape {tuple(w.shape)}")
    strategy = opts.weight_strategy
    scale, err = choose_scale(w, strategy, opts.scale_search, opts.block_size)
    if opts.scale_search == "mse":
        base_err = float(choose_scale(w, strategy, "none", opts.block_size)[1].sum())
    else:
        base_err = float(err.sum())
    q = numerics.quantize_with_scale(w, _expand(scale, w.float(), strategy, opts.block_size))
    scheme = opts.checkpoint_scheme()
    names = scheme.tensor_names(layer)
    if strategy == "tensor":
        scale = scale.reshape(scheme.scalar_shape)
    return {names["weight"]: q, names["weight_scale"]: scale.float().contiguous()}, float(err.sum()), base_err
