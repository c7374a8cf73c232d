// The fused W8A16 mixture-of-experts op (moe_w8a16.cpp) and what it needs from the dense op
// layer (ops.cpp, isa.h): one ISA registry and one kernel plan for linear layers and experts alike.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "isa.h"
#include "kernels.h"

namespace fp8_backend {

// The test overrides of w8a16_plan's crossovers (-1: none), defined in ops.cpp; the CPU path
// comes from isa.h's selected_cpu_isa.
int64_t plan_small_m_max_override();
int64_t plan_amx_min_m_override();

// numerics.fused_moe_w8a16: x [T, H] bf16/fp16, w13 [E, 2I, H] and w2 [E, H, I] float8_e4m3fn,
// fp32 scales per channel ([E, 2I], [E, H]) or per [bn, bk] block (gate and up one grid each:
// [E, 2*ceil(I/bn), ceil(H/bk)], [E, ceil(H/bn), ceil(I/bk)]), topk_weights / topk_ids [T, k].
at::Tensor fused_moe_w8a16(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w13_scale,
                           const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& topk_weights,
                           const at::Tensor& topk_ids, at::OptionalIntArrayRef block_size);

}  // namespace fp8_backend
