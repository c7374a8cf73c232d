"""Quantize one weight tensor with numerics.py (amax scales, optionally MSE-searched clipping).

Returns the tensors a checkpoint stores for the layer: the FP8 weight and its scale, named and
shaped as the chosen format expects.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..formats.scheme import Granularity
from .options import QuantizeOptions

#: Clipping ratios tried by the MSE scale search; 1.0 (plain amax) is always among them.
MSE_GRID = tuple(round(0.70 + 0.01 * i, 2) for i in range(31))


def choose_scale(w: torch.Tensor, granularity: Granularity,
                 search: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, sse): the fp32 scale grid of ``w`` (granularity.grid) and the summed squared
    quantization error of each scale's block.

    "none": numerics.compute_scale(amax), the same scale as numerics.quantize_per_*.
    "mse": per block, the ratio r in MSE_GRID whose scale compute_scale(amax * r) gives the
    least squared error; a block only moves off r = 1 on a strict improvement, so the result is
    never worse than amax."""
    w = w.float()
    block = granularity.block(w.shape)
    amax = numerics.block_amax(w, block)
    best = numerics.compute_scale(amax)

    def sse(scale):
        full = numerics.expand_block_scale(scale, tuple(w.shape), block)
        return numerics.block_sum((numerics.dequantize(numerics.quantize_with_scale(w, full), full) - w) ** 2, block)

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
    fmt = opts.checkpoint_format()
    g = fmt.scheme.weight
    scale, err = choose_scale(w, g, opts.scale_search)
    if opts.scale_search == "mse":
        base_err = float(choose_scale(w, g, "none")[1].sum())
    else:
        base_err = float(err.sum())
    q = numerics.quantize_with_scale(w, numerics.expand_block_scale(scale, tuple(w.shape), g.block(w.shape)))
    names = fmt.tensor_names(layer)
    scale = scale.reshape(fmt.weight_scale_shape(*w.shape))
    return {names["weight"]: q, names["weight_scale"]: scale.float().contiguous()}, float(err.sum()), base_err
