"""Triton GPU kernels of fp8_backend (verified on CPU under TRITON_INTERPRET=1 and compiled ahead
of time for sm_80 / sm_89 / sm_90; not run on GPU hardware by this project's CI).

- quant: FP8 activation quantization (dynamic per-tensor, per-token with upper bound, static, 1xG groups)
- gemm_w8a8: FP8 x FP8 GEMM for sm_89+ (per-tensor, per-token x per-channel, block scales)
- w8a16_repack / w8a16_marlin: Marlin-style W8A16 for sm_80/86 (bytes in, bit-decode, fp16/bf16 MMA)
- kv_cache: FP8 KV-cache write and paged decode attention
"""
