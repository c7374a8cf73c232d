"""The C++ W8A16 CPU kernel (every code path this CPU can run) against numerics.py.

Paths: amx (AMX-BF16 tile GEMM for bf16 activations at M >= amx_min_m, else avx512_vbmi),
avx512_vbmi (byte-LUT decode, permuted lanes), avx512 (F16C decode), avx2 (F16C decode, 8
lanes, 2^-8 kept in the GEMV's products), portable (scalar), each in
every regime: register-blocked GEMV (M <= small_m_max), decode + fp32 GEMM (above), and on amx
the tile GEMM for every M. Every path this CPU has runs here on real hardware; a path this CPU
lacks is skipped with the reason (AMX ran on a Sapphire Rapids-class Xeon).
"""

import os
import subprocess
import sys

import pytest
import torch

from fp8_backend import _C, kernels, numerics

ISAS = list(kernels.ISAS)
# (small_m_max, amx_min_m) per regime; "amx" only differs from the others on the amx path.
NEVER = 1 << 30
REGIMES = {"gemv": (NEVER, NEVER), "decode_gemm": (0, NEVER), "amx": (NEVER, 0)}


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(params=ISAS)
def isa(request):
    if not _C.cpu_isa_supported(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} path")
    with kernels.using_cpu_isa(request.param):
        yield request.param


@pytest.fixture(params=list(REGIMES))
def regime(request, isa):
    if request.param == "amx" and isa != "amx":
        pytest.skip("the AMX tile GEMM runs only on the amx path")
    before = _C.small_m_max(), _C.amx_min_m()
    _C.set_small_m_max(REGIMES[request.param][0])
    _C.set_amx_min_m(REGIMES[request.param][1])
    yield request.param
    _C.set_small_m_max(before[0])
    _C.set_amx_min_m(before[1])


def all_codes(n_rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n_rows, k] FP8 weight whose bytes cover every non-NaN encoding in shuffled order (NaN
    encodings 0x7F/0xFF replaced by 0: one NaN would make its whole output row NaN)."""
    codes = torch.arange(256, dtype=torch.uint8).repeat((n_rows * k + 255) // 256)[: n_rows * k]
    codes = codes[torch.randperm(codes.numel(), generator=gen)]
    codes[(codes & 0x7F) == 0x7F] = 0
    return codes.reshape(n_rows, k).view(torch.float8_e4m3fn)


def check_close(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias=None):
    """|y - exact| within what fp32 accumulation plus one rounding to x.dtype allow.

    exact: float64 x @ q^T * s + bias. The kernel sums K fp32 products in another order than
    numerics.w8a16_linear does; either sum is within K * 2^-24 * sum|x*q| of the exact one
    (products of a bf16/fp16 and an e4m3 value are exact in fp32), times |s|. The final rounding
    to bf16 (fp16) adds at most 2^-8 (2^-11) relative; we allow 2^-8 / 2^-10 to cover rounding
    a slightly different fp32 value (a double rounding across a tie).
    """
    n, k = q.shape
    xd, qd = x.double().reshape(-1, k), q.double()
    sd = s.double().reshape(1, -1)
    exact = (xd @ qd.T) * sd
    spread = (xd.abs() @ qd.abs().T) * sd.abs()
    if bias is not None:
        exact = exact + bias.double()
    rel = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-10
    tol = k * 2.0**-24 * spread + rel * exact.abs() + 1e-30
    err = (y.double().reshape(-1, n) - exact).abs()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n)
    assert bool((err <= tol).all()), f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"
    # And the specification itself agrees with the exact value under the same bound.
    ref = numerics.w8a16_linear(x, q, s, bias).double().reshape(-1, n)
    assert bool(((ref - exact).abs() <= tol).all())


def test_every_encoding_in_every_lane(isa):
    """x = identity (M = K = 64): y[m, n] = fp8 value of w[n, m] exactly, for all 256 bytes in
    every lane position of a 64-block (the VBMI path permutes lanes)."""
    gen = torch.Generator().manual_seed(0)
    q = all_codes(512, 64, gen)
    x = torch.eye(64, dtype=torch.bfloat16)
    y = kernels.w8a16_linear(x, q, torch.ones(1))
    expected = q.float().T  # torch's own e4m3fn decoding
    assert torch.equal(y.float(), expected)  # bit-exact: every e4m3 value is a bf16
    assert len(set(q.view(torch.uint8).flatten().tolist())) == 254


@pytest.mark.parametrize("k", [5, 16, 40, 64, 70])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_nan_encodings_propagate(isa, regime, k, m):
    """0x7F / 0xFF decode to NaN as in torch (formats' check_fp8_weight refuses them at load time; the op
    itself must still not turn them into a finite number): the row's output is NaN. Rows 1 and
    3 of a 4-row tile and row 6 (the tail tile) have one, in the first 32-byte block or in the
    row's tail; m = 1 and m > 1 run different GEMV tiles."""
    q = torch.zeros(7, k).to(torch.float8_e4m3fn)
    q.view(torch.uint8)[1, min(5, k - 1)] = 0x7F
    q.view(torch.uint8)[3, k - 1] = 0xFF
    q.view(torch.uint8)[6, k // 2] = 0x7F
    y = kernels.w8a16_linear(torch.ones(m, k, dtype=torch.bfloat16), q, torch.ones(1))
    assert torch.equal(y.isnan(), torch.tensor([[False, True, False, True, False, False, True]] * m))


@pytest.mark.parametrize("k", [1, 5, 63, 65, 127])
def test_every_encoding_in_the_tail(isa, k):
    """K not a multiple of 64: masked tail bytes must not leak into the sums."""
    gen = torch.Generator().manual_seed(k)
    q = all_codes(256, k, gen)
    x = torch.eye(k, dtype=torch.bfloat16)
    y = kernels.w8a16_linear(x, q, torch.ones(1))
    assert torch.equal(y.float(), q.float().T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_random_odd_shapes(isa, regime, dtype, per_channel, with_bias):
    gen = torch.Generator().manual_seed(1)
    for m, n, k in [(1, 1, 1), (1, 7, 5), (2, 3, 64), (3, 33, 65), (4, 5, 130), (5, 17, 200),
                    (17, 9, 257), (64, 40, 96), (65, 11, 33), (130, 6, 1000),
                    (40, 300, 1100)]:  # AMX: several K chunks (256), the last partial
        w = torch.randn(n, k, generator=gen) * 0.1
        q, s = numerics.quantize_per_channel(w) if per_channel else numerics.quantize_per_tensor(w)
        s = s.reshape(-1)
        x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
        check_close(kernels.w8a16_linear(x, q, s, b), x, q, s, b)


def test_leading_dims_and_noncontiguous_x(isa, regime):
    gen = torch.Generator().manual_seed(2)
    q, s = numerics.quantize_per_tensor(torch.randn(12, 70, generator=gen))
    x = torch.randn(3, 70, 5, generator=gen).to(torch.bfloat16).transpose(1, 2)  # [3, 5, 70], strided
    y = kernels.w8a16_linear(x, q, s)
    assert y.shape == (3, 5, 12)
    check_close(y, x.contiguous(), q, s)


def test_edge_values(isa, regime):
    """Zeros, -0, subnormal weights (2^-9 .. 7*2^-9), +-448, huge and tiny activations,
    inf and NaN activations: finite results within the bound, inf/NaN where fp math puts them."""
    vals = torch.tensor([0.0, -0.0, 2**-9, -(2**-9), 7 * 2**-9, 2**-6, 448.0, -448.0, 1.0, -1.75])
    q = vals.to(torch.float8_e4m3fn).repeat(6, 7)[:, :67].contiguous()  # [6, 67]
    assert torch.equal(q.float()[0, :10], vals)
    xs = torch.tensor([
        [1.0] * 67,
        [3.0e38] + [0.0] * 66,              # near bf16 max times 448 overflows fp32 -> inf
        [1e-38] * 67,                       # bf16 subnormal-range activations
        [float("inf")] + [1.0] * 66,        # inf * 0 (first weight column is 0) -> NaN
        [float("nan")] + [0.0] * 66,
        [0.0] * 66 + [float("inf")],        # inf in the masked tail region's last lane
    ]).to(torch.bfloat16)
    s = torch.tensor([0.5])
    y = kernels.w8a16_linear(xs, q, s).float()
    ref = ((xs.float() @ q.float().T) * s)  # fp32, same products
    assert torch.equal(y.isnan(), ref.isnan()), (y, ref)
    assert torch.equal(y.isinf(), ref.isinf()) and torch.equal(y[y.isinf()], ref[ref.isinf()].to(torch.bfloat16).float())
    fin = ref.isfinite()
    check_close(kernels.w8a16_linear(xs[[0, 2]], q, s), xs[[0, 2]], q, s)
    assert fin[0].all() and fin[2].all()
    # A row's result does not depend on what the other rows of the call hold (the AVX2 GEMV scales
    # each staged row by its own power of two: 1e-38 next to 3e38 must not underflow).
    for r in (0, 2):
        assert torch.equal(y[r], kernels.w8a16_linear(xs[r : r + 1], q, s).float()[0]), r


def test_paths_agree_and_threads_do_not_change_gemv_results():
    gen = torch.Generator().manual_seed(3)
    q, s = numerics.quantize_per_channel(torch.randn(301, 517, generator=gen))
    s = s.reshape(-1)
    threads = torch.get_num_threads()
    try:
        for m in (1, 7):  # the GEMV's M = 1 and M > 1 tiles
            x = torch.randn(m, 517, generator=gen).to(torch.bfloat16)
            outs = {}
            for name in kernels.supported_cpu_isas():
                with kernels.using_cpu_isa(name):
                    for t in (1, 2):
                        torch.set_num_threads(t)
                        outs[(name, t)] = kernels.w8a16_linear(x, q, s)
            for name in kernels.supported_cpu_isas():
                # Each output row's sum is computed by one thread in a fixed order: bit-identical.
                assert torch.equal(outs[(name, 1)], outs[(name, 2)]), name
            for y in outs.values():
                check_close(y, x, q, s)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not _C.cpu_isa_supported("amx"), reason="the AMX tile GEMM needs an AMX CPU")
@pytest.mark.parametrize("scheme", ["per_channel", "block"])
def test_amx_panels_chunks_row_blocks_and_threads(scheme):
    """The AMX GEMM's whole blocking at once: two 512-row activation blocks (the second partial),
    several weight panels (the decode of panel p + 1 pipelined into panel p's tile products), K
    in chunks of 256 with a partial last one (partial sums kept between chunks), 1 and 2 threads.
    Close to the exact product, and bit-identical across thread counts (each output is summed
    by one thread in a fixed order)."""
    gen = torch.Generator().manual_seed(4)
    m, n, k = 530, 1040, 1100
    w = torch.randn(n, k, generator=gen) * 0.1
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    before = _C.amx_min_m(), torch.get_num_threads()
    with kernels.using_cpu_isa("amx"):
        try:
            _C.set_amx_min_m(0)
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                if scheme == "block":
                    q, s = numerics.quantize_block(w, block_size=(128, 128))
                    outs.append(kernels.w8a16_linear(x, q, s, None, [128, 128]))
                else:
                    q, s = numerics.quantize_per_channel(w)
                    outs.append(kernels.w8a16_linear(x, q, s.reshape(-1)))
            assert torch.equal(outs[0], outs[1])
            if scheme == "block":
                deq = numerics.dequantize(q, s, (128, 128)).double()
                exact = x.double() @ deq.T
                spread = x.double().abs() @ deq.abs().T
                tol = k * 2.0**-24 * spread + 2.0**-8 * exact.abs() + 1e-30  # as in check_close
                assert bool(((outs[0].double() - exact).abs() <= tol).all())
            else:
                check_close(outs[0], x, q, s.reshape(-1))
        finally:
            _C.set_amx_min_m(before[0])
            torch.set_num_threads(before[1])


@pytest.mark.parametrize("scale_exp", [0, -135])
def test_output_rounding_is_bit_exact(isa, regime, scale_exp):
    """One nonzero product per output (x has one nonzero per row), so the fp32 sum has no order:
    every path must then give numerics.w8a16_linear's bits exactly — the scale and bias in fp32,
    one round-to-nearest-even to bf16. scale_exp -135 makes the results fp32 denormals, which
    the AMX epilogue's fast conversion (vcvtne2ps2bf16 flushes them) must leave to its exact path."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 40, 37, 96
    q = all_codes(n, k, gen)
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    x[torch.arange(m), torch.arange(m) * 7 % k] = torch.randn(m, generator=gen).to(torch.bfloat16)
    s = (torch.rand(n, generator=gen) + 0.5) * 2.0**scale_exp
    b = (torch.randn(n, generator=gen) * 2.0**scale_exp).to(torch.bfloat16)
    for bias in (None, b):
        y = kernels.w8a16_linear(x, q, s, bias)
        assert torch.equal(y.view(torch.int16), numerics.w8a16_linear(x, q, s, bias).view(torch.int16))


def test_empty_and_degenerate_shapes(isa):
    q = torch.zeros(5, 8).to(torch.float8_e4m3fn)
    assert kernels.w8a16_linear(torch.zeros(0, 8, dtype=torch.bfloat16), q, torch.ones(1)).shape == (0, 5)
    b = torch.arange(5, dtype=torch.bfloat16)
    y = kernels.w8a16_linear(torch.ones(2, 0, dtype=torch.bfloat16), torch.zeros(5, 0).to(torch.float8_e4m3fn), torch.ones(1), b)
    assert torch.equal(y, b.expand(2, 5))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q: (torch.ones(2, 8), q, torch.ones(1), None), "bfloat16 or float16"),
        (lambda q: (torch.ones(2, 8, dtype=torch.bfloat16), q.float(), torch.ones(1), None), "float8_e4m3fn"),
        (lambda q: (torch.ones(2, 9, dtype=torch.bfloat16), q, torch.ones(1), None), "x has K=9"),
        (lambda q: (torch.ones(2, 8, dtype=torch.bfloat16), q, torch.ones(3), None), "N=5"),
        (lambda q: (torch.ones(2, 8, dtype=torch.bfloat16), q, torch.ones(1, dtype=torch.bfloat16), None), "float32"),
        (lambda q: (torch.ones(2, 8, dtype=torch.bfloat16), q, torch.ones(1), torch.ones(4)), "bias"),
        (lambda q: (torch.ones(2, 8, dtype=torch.bfloat16), q.t().contiguous().t(), torch.ones(1), None), "contiguous"),
        (lambda q: (torch.ones(2, 8, dtype=torch.bfloat16), q[0], torch.ones(1), None), "2-D"),
    ],
    ids=["fp32-activations", "weight-dtype", "k-mismatch", "scale-count", "scale-dtype", "bias-size",
         "noncontiguous-weight", "weight-rank"],
)
def test_bad_input_is_refused_with_a_clear_error(make, message):
    q = torch.zeros(5, 8).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match=message):
        kernels.w8a16_linear(*make(q))


def test_prepack_checks_the_op_contract_and_lays_out():
    with pytest.raises(ValueError, match="w: expected float8_e4m3fn"):
        kernels.w8a16_prepack(torch.zeros(4, 6), "w")
    p = kernels.w8a16_prepack(torch.zeros(6, 4).to(torch.float8_e4m3fn).t())
    assert p.is_contiguous()


def test_isa_detection_matches_cpuinfo():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    assert _C.cpu_isa_supported("avx2") == avx2
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert _C.cpu_isa_supported("avx512") == avx512
    vbmi = avx512 and "avx512vbmi" in flags
    assert _C.cpu_isa_supported("avx512_vbmi") == vbmi
    # amx also needs the kernel's permission for tile data, which Linux grants on AMX CPUs.
    amx = vbmi and {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags
    assert _C.cpu_isa_supported("amx") == amx
    with kernels.using_cpu_isa("auto") as best:  # the best path this CPU has
        assert kernels.cpu_isa() == best == kernels.supported_cpu_isas()[0]
    assert _C.cpu_isa_supported("portable")
    with pytest.raises(RuntimeError, match="unknown CPU kernel path 'sse9'"):
        kernels.set_cpu_isa("sse9")


@pytest.mark.parametrize("name", ISAS)
def test_forcing_a_path_this_cpu_lacks_names_the_missing_feature(name):
    """set_cpu_isa on a path the CPU cannot run: an error naming the path and the first missing
    CPU feature (the capability order makes the missing set grow along ISAS)."""
    if _C.cpu_isa_supported(name):
        pytest.skip(f"this CPU runs the {name} path")
    flags = _cpu_flags()
    needs = {"avx2": ["avx2", "fma", "f16c"], "avx512": ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"]}
    needs["avx512_vbmi"] = needs["avx512"] + ["avx512vbmi"]
    needs["amx"] = needs["avx512_vbmi"] + ["amx_tile", "amx_bf16", "avx512_bf16"]
    lacking = [f for f in needs[name] if f not in flags]
    before = kernels.cpu_isa()
    with pytest.raises(RuntimeError, match=rf"CPU kernel path '{name}' needs .*{lacking[0].replace('_', '-')}.*which this CPU lacks"):
        kernels.set_cpu_isa(name)
    assert kernels.cpu_isa() == before
    env = dict(os.environ, FP8_BACKEND_CPU_ISA=name)
    p = subprocess.run([sys.executable, "-c", "import fp8_backend.kernels"], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and f"FP8_BACKEND_CPU_ISA='{name}'" in p.stderr and "lacks" in p.stderr


@pytest.mark.parametrize("value, expect", [("portable", "portable"), ("bogus", "FP8_BACKEND_CPU_ISA='bogus'")])
def test_isa_environment_variable(value, expect):
    env = dict(os.environ, FP8_BACKEND_CPU_ISA=value)
    p = subprocess.run([sys.executable, "-c", "import fp8_backend.kernels as k; print(k.cpu_isa())"],
                       capture_output=True, text=True, env=env)
    assert expect in (p.stdout + p.stderr)


def test_fake_impl_and_schema_opcheck():
    q, s = numerics.quantize_per_tensor(torch.randn(9, 70))
    x = torch.randn(3, 70).to(torch.bfloat16)
    # test_schema is left out: its mutation check does arithmetic on every input, which torch
    # does not implement for float8 tensors.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    op = torch.ops.fp8_backend.w8a16_linear.default
    torch.library.opcheck(op, (x, q, s, None), test_utils=utils)
    torch.library.opcheck(op, (x, q, s, torch.randn(9).to(torch.bfloat16)), test_utils=utils)
    qb, sb = numerics.quantize_block(torch.randn(9, 70), block_size=(8, 64))
    torch.library.opcheck(op, (x, qb, sb, None, [8, 64]), test_utils=utils)


def test_torch_compile_fullgraph_dynamic():
    q, s = numerics.quantize_per_channel(torch.randn(24, 100))
    s = s.reshape(-1)

    def f(x):
        return kernels.w8a16_linear(x, q, s) * 2 + 1

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 3, 17):
        x = torch.randn(m, 100).to(torch.bfloat16)
        assert torch.equal(cf(x), f(x))


@pytest.mark.parametrize("block", [(128, 128), (128, 96), (1, 128), (64, 64)],
                         ids=["128x128", "bk96-decode-path", "per-row-1x128", "64x64"])
def test_block_scales_with_partial_blocks(isa, regime, block):
    """y = x @ dequant(q, s[ceil(N/bn), ceil(K/bk)])^T; N and K not multiples of the block (the
    last block of each is partial, as llm-compressor writes for e.g. hidden size 576)."""
    gen = torch.Generator().manual_seed(4)
    for m, n, k in [(1, 576, 576), (3, 130, 200), (66, 257, 300)]:
        w = torch.randn(n, k, generator=gen) * 0.05
        q, s = numerics.quantize_block(w, block_size=block)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        b = torch.randn(n, generator=gen).to(torch.bfloat16)
        y = kernels.w8a16_linear(x, q, s, b, list(block))
        # Bound as in check_close, with the block scale inside the sum: each product
        # x * s * q is rounded once more in fp32 (2^-24 relative), inside the K-term bound.
        deq = numerics.dequantize(q, s, block).double()
        exact = x.double() @ deq.T + b.double()
        tol = (k + 2) * 2.0**-24 * (x.double().abs() @ deq.abs().T) + 2.0**-8 * exact.abs()
        assert bool(((y.double() - exact).abs() <= tol).all()), (m, n, k)
    with pytest.raises(RuntimeError, match=r"must have shape \[5, 5\].*found \[5, 4\]"):
        q, s = numerics.quantize_block(torch.randn(576, 576), block_size=(128, 128))
        kernels.w8a16_linear(torch.ones(1, 576, dtype=torch.bfloat16), q, s[:, :4].contiguous(), None, [128, 128])
