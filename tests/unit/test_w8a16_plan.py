"""The W8A16 CPU kernel choice (_C.w8a16_plan, csrc/cpu/ops.cpp): one pure function of (path, M,
N, K, activation dtype, K block of block scales) built from the crossovers measured in
benchmarks/bench_w8a16.py (RESULTS.md). Pure: it runs for every path, whatever this CPU has."""

import pytest
import torch  # noqa: F401  (loads libc10 before the extension)

from fp8_backend import _C, kernels

# Largest M served by each path's GEMV (measured crossovers with decode + torch's fp32 GEMM).
SMALL_M_MAX = {"amx": 64, "avx512_vbmi": 64, "avx512": 64, "avx2": 32, "portable": 0}
AMX_MIN_M = 8  # bf16 activations on amx: the tile GEMM from here


@pytest.fixture(autouse=True)
def no_overrides():
    before = _C.small_m_max(), _C.amx_min_m()
    _C.set_small_m_max(-1)
    _C.set_amx_min_m(-1)
    yield
    _C.set_small_m_max(before[0])
    _C.set_amx_min_m(before[1])


def plan(isa, m, n=4096, k=4096, dtype="bfloat16", block_k=0):
    return _C.w8a16_plan(isa, m, n, k, dtype, block_k)


@pytest.mark.parametrize("isa", ["avx512_vbmi", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gemv_up_to_the_crossover_then_decode_gemm(isa, dtype):
    top = SMALL_M_MAX[isa]
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (576, 576), (1536, 576)]:
        for m in sorted({1, 2, top - 1, top} & set(range(1, top + 1))):
            assert plan(isa, m, n, k, dtype) == f"gemv_{isa}", (m, n, k)
        for m in (top + 1, 512, 4096):
            assert plan(isa, m, n, k, dtype) == f"decode_gemm_{isa}", (m, n, k)


def test_amx_tile_gemm_for_bf16_from_its_crossover():
    for m in range(1, AMX_MIN_M):
        assert plan("amx", m) == "gemv_avx512_vbmi"
    for m in (AMX_MIN_M, 64, 65, 512, 4096):
        assert plan("amx", m) == "amx_tile_gemm"
    # fp16 activations are not exact in bf16: the VBMI fp32 kernels at every M.
    assert plan("amx", 8, dtype="float16") == "gemv_avx512_vbmi"
    assert plan("amx", 65, dtype="float16") == "decode_gemm_avx512_vbmi"


def test_block_scales():
    # K blocks that are multiples of 64: every kernel takes them.
    assert plan("amx", 16, block_k=128) == "amx_tile_gemm"
    assert plan("avx2", 1, block_k=128) == "gemv_avx2"
    assert plan("avx2", 1, block_k=64) == "gemv_avx2"
    assert plan("portable", 1, block_k=128) == "decode_gemm_portable"
    # Others only the decode + GEMM (the GEMV scales 64-wide staging blocks, AMX 64-wide chunks).
    assert plan("amx", 16, block_k=96) == "decode_gemm_avx512_vbmi"
    assert plan("avx2", 1, block_k=96) == "decode_gemm_avx2"
    assert plan("portable", 1, block_k=32) == "decode_gemm_portable"


def test_test_overrides_fold_into_the_plan():
    _C.set_small_m_max(0)
    assert plan("avx2", 1) == "decode_gemm_avx2"
    _C.set_small_m_max(1 << 30)
    assert plan("avx2", 4096) == "gemv_avx2"
    _C.set_amx_min_m(1 << 30)
    assert plan("amx", 512) == "gemv_avx512_vbmi"
    _C.set_amx_min_m(0)
    assert plan("amx", 1) == "amx_tile_gemm"


def test_pure_and_independent_of_the_path_in_use():
    before = kernels.cpu_isa()
    try:
        answers = []
        for name in kernels.supported_cpu_isas():
            kernels.set_cpu_isa(name)
            answers.append([plan(i, m) for i in SMALL_M_MAX for m in (1, 7, 8, 64, 65, 512)])
        assert all(a == answers[0] for a in answers)
    finally:
        kernels.set_cpu_isa(before)


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="unknown CPU kernel path 'sse9'"):
        plan("sse9", 1)
    with pytest.raises(RuntimeError, match="dtype must be 'bfloat16' or 'float16'; found 'float32'"):
        plan("avx2", 1, dtype="float32")
    with pytest.raises(RuntimeError, match="must be >= 0"):
        plan("avx2", -1)
