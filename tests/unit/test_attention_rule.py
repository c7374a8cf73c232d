"""The attention kernel rule (which kernels read a KV cache and why), a pure function, and
vllm_reads_fp8_cache against vLLM's own CPU_ATTN choice."""

import pytest
import torch

RULE_CASES = [
    ("vllm", "fp8", "amx", True, "vllm", "=vllm"),
    ("vllm", "fp8", "avx2", False, "vllm", "will refuse"),
    ("all", "auto", "avx2", False, "fp8_backend", "=all"),
    ("all", "fp8", "avx512", True, "fp8_backend", "=all"),
    ("auto", "auto", "amx", True, "vllm", "16-bit"),
    ("auto", "bfloat16", "avx2", False, "vllm", "16-bit"),
    ("auto", "float16", "portable", False, "vllm", "16-bit"),
    # vLLM cannot read FP8 (no AVX-512, or head size not a multiple of 32): ours, whatever the path
    ("auto", "fp8", "avx2", False, "fp8_backend", "only FP8 reader"),
    ("auto", "fp8_e5m2", "avx2", False, "fp8_backend", "only FP8 reader"),
    ("auto", "fp8", "portable", False, "fp8_backend", "portable path is many times slower"),
    ("auto", "fp8_e4m3", "avx512", False, "fp8_backend", "only FP8 reader"),
    # both can: ours only where measured faster (amx decode kernel)
    ("auto", "fp8", "amx", True, "fp8_backend", "1.27-1.52x"),
    ("auto", "fp8", "avx512", True, "vllm", "not measured faster"),
    ("auto", "fp8_e5m2", "avx2", True, "vllm", "not measured faster"),
    ("auto", "fp8", "portable", True, "vllm", "not measured faster"),
]


@pytest.mark.parametrize("mode,kv,path,vllm_fp8,kernel,why", RULE_CASES)
def test_attention_rule(mode, kv, path, vllm_fp8, kernel, why):
    from fp8_backend.vllm_adapter.attention_backend import choose_attention_kernel

    choice = choose_attention_kernel(mode, kv, path, vllm_fp8)
    assert choice.kernel == kernel and why in choice.reason, choice


@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"])
def test_attention_rule_per_head_scales_stay_on_own_kernels(path):
    # Where vLLM's kernel would otherwise take an FP8 cache, per-head scales (which it cannot
    # apply) keep the layer on fp8-backend's kernels instead of failing at the first forward.
    from fp8_backend.vllm_adapter.attention_backend import choose_attention_kernel

    choice = choose_attention_kernel("auto", "fp8", path, True, per_head_scales=True)
    assert choice.kernel == "fp8_backend" and "per-head" in choice.reason
    assert choose_attention_kernel("auto", "auto", path, True, per_head_scales=True).kernel == "vllm"
    assert choose_attention_kernel("vllm", "fp8", path, True, per_head_scales=True).kernel == "vllm"


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_vllm_reads_fp8_matches_vllm(head_size):
    """vllm_reads_fp8_cache agrees with vLLM's own CPU_ATTN ISA choice on this CPU (it raises
    where it cannot read an FP8 cache)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from fp8_backend.vllm_adapter.attention_backend import vllm_reads_fp8_cache

    try:
        _get_attn_isa(torch.bfloat16, 128, head_size, "fp8")
        vllm_ok = True
    except NotImplementedError:
        vllm_ok = False
    assert vllm_reads_fp8_cache(head_size) == vllm_ok
