"""GPU linear ops as torch.library custom ops (traceable by torch.compile through their fake
implementations), backed by the Triton kernels in kernels/triton. Triton is imported on first
call only, so CPU-only processes never load it.

- fp8_backend::triton_w8a8_linear: quantize activations to FP8 (static per-tensor, dynamic
  per-token or 1 x g groups), FP8 x FP8 GEMM, scales, bias (sm_89 / sm_90).
- fp8_backend::triton_w8a16_linear: Marlin-style W8A16 over weights repacked at load time (sm_80 / sm_86).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fp8_backend::triton_w8a8_linear", mutates_args=())
def triton_w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       input_scale: torch.Tensor | None, block_size: list[int] | None) -> torch.Tensor:
    """y = dequant(quant(x)) @ dequant(w, w_scale)^T + bias in x.dtype. Activations: static
    per-tensor with ``input_scale``; else 1 x bk groups with block weights (``block_size`` =
    [bn, bk]); else dynamic per token."""
    from .triton import gemm_w8a8, quant

    k = w.shape[1]
    x2 = x.reshape(-1, k)
    if input_scale is not None:
        xq, xs = quant.quantize_per_tensor(x2, input_scale)
    elif block_size is not None:
        xq, xs = quant.quantize_group(x2, block_size[1])
    else:
        xq, xs = quant.quantize_per_token(x2)
    y = gemm_w8a8.w8a8_gemm(xq, xs, w, w_scale, bias, x.dtype, tuple(block_size) if block_size is not None else None)
    return y.reshape(*x.shape[:-1], w.shape[0])


@triton_w8a8_linear.register_fake
def _(x, w, w_scale, bias, input_scale, block_size):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("fp8_backend::triton_w8a16_linear", mutates_args=())
def triton_w8a16_linear(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                        n: int, k: int, group_size: int) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias over a w8a16_repack.PackedW8A16 given as its fields."""
    from .triton import w8a16_marlin
    from .triton.w8a16_repack import PackedW8A16

    return w8a16_marlin.w8a16_linear(x, PackedW8A16(tiles, scales, n, k, group_size), bias)


@triton_w8a16_linear.register_fake
def _(x, tiles, scales, bias, n, k, group_size):
    return x.new_empty((*x.shape[:-1], n))
