"""Compile every Triton kernel of fp8_backend ahead of time for CUDA targets (no GPU needed).

Run as a script in a process WITHOUT TRITON_INTERPRET (kernels decorated under the interpreter
cannot be compiled): ``python tests/support/triton_aot.py 80 89 90`` prints one JSON line per
(kernel, capability) with the sizes of the PTX / cubin and the tensor-core instructions found.
"""

import json
import os
import re
import sys

assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET to compile"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fp8_backend.kernels.triton import fp8_math, gemm_w8a8, quant, w8a16_marlin  # noqa: E402

C = "constexpr"


def spec(fn, sig: dict, consts: dict):
    full = dict(sig)
    full.update({k: C for k in consts})
    return fn, full, consts


def kernels(cap: int):
    """(name, fn, signature, constexprs) of every kernel variant used by the launchers."""
    out = {
        "e4m3_encode": spec(fp8_math._encode_kernel, {"x_ptr": "*fp32", "q_ptr": "*u8", "n": "i32"}, {"BLOCK": 1024}),
        "e4m3_decode": spec(fp8_math._decode_kernel, {"q_ptr": "*u8", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024}),
        "quant_per_token_bf16_ub": spec(
            quant._per_token_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32", "K": "i32", "stride_x": "i32",
             "stride_q": "i32", "scale_ub": "fp32", "scale_floor": "fp32"}, {"HAS_UB": True, "BLOCK": 1024}),
        "quant_group_fp16": spec(
            quant._group_kernel,
            {"x_ptr": "*fp16", "q_ptr": "*u8", "scale_ptr": "*fp32", "K": "i32", "n_groups": "i32",
             "stride_x": "i32", "stride_q": "i32", "scale_floor": "fp32"}, {"GROUP": 128}),
        "quant_partial_amax": spec(quant._partial_amax_kernel, {"x_ptr": "*bf16", "partial_ptr": "*fp32", "n": "i32"},
                                   {"BLOCK": 1024}),
        "quant_per_tensor_dynamic": spec(
            quant._per_tensor_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32", "partial_ptr": "*fp32", "n": "i32",
             "n_partial": "i32", "scale_floor": "fp32"}, {"DYNAMIC": True, "BLOCK": 1024, "PBLOCK": 1024}),
        "quant_per_tensor_static": spec(
            quant._per_tensor_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*u8", "scale_ptr": "*fp32", "partial_ptr": "*fp32", "n": "i32",
             "n_partial": "i32", "scale_floor": "fp32"}, {"DYNAMIC": False, "BLOCK": 1024, "PBLOCK": 16}),
    }
    for dt in ("bf16", "fp16"):
        for grouped in (0, 128):
            out[f"w8a16_{dt}_group{grouped}"] = spec(
                w8a16_marlin.w8a16_kernel,
                {"x_ptr": f"*{dt}", "w_ptr": "*u8", "s_ptr": "*fp32", "bias_ptr": f"*{dt}", "y_ptr": f"*{dt}",
                 "M": "i32", "N": "i32", "K": "i32", "n_tiles_n": "i32", "stride_xm": "i32", "stride_ym": "i32",
                 "stride_s": "i32"}, {"HAS_BIAS": True, "GROUP_K": grouped, "BM": 64, "BN": 64, "BK": 64})
    out["w8a16_bf16_group0_bm16"] = (out["w8a16_bf16_group0"][0], out["w8a16_bf16_group0"][1],
                                     {**out["w8a16_bf16_group0"][2], "BM": 16})
    if cap >= 89:  # FP8 tensor cores only; linear_paths.py never sends sm_80/86 here
        for block in (False, True):
            out[f"w8a8_gemm_{'block' if block else 'channel'}_bf16"] = spec(
                gemm_w8a8.w8a8_gemm_kernel,
                {"a_ptr": "*u8", "b_ptr": "*u8", "c_ptr": "*bf16", "bias_ptr": "*bf16", "sa_ptr": "*fp32",
                 "sb_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32",
                 "stride_cm": "i32", "stride_sa_m": "i32", "stride_sa_k": "i32", "stride_sb_n": "i32",
                 "stride_sb_k": "i32"},
                {"HAS_BIAS": True, "BLOCK_SCALES": block, "GROUP_K": 128 if block else 1, "GROUP_N": 128 if block else 1,
                 "BM": 64, "BN": 64, "BK": 128 if block else 64})
    return out


def main(caps):
    for cap in caps:
        for name, (fn, sig, consts) in kernels(cap).items():
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cap, 32))
            ptx = k.asm["ptx"]
            mma = sorted(set(re.findall(r"\b(w?gmma\.[\w.]+|mma\.sync\.[\w.]+)", ptx)))
            print(json.dumps({"kernel": name, "cap": cap, "ptx": len(ptx), "cubin": len(k.asm["cubin"]),
                              "target": re.search(r"\.target\s+(\S+)", ptx).group(1), "mma": mma}), flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]])
