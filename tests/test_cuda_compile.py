"""csrc/cuda: every torch-free .cu file compiles with nvcc for sm_80, sm_89 and sm_90a; the shared
FP8 device arithmetic (fp8_math.cuh, __host__ __device__) is compiled for the host and checked
against numerics.py through ctypes; bindings.cpp passes a syntax check against torch's headers.
Nothing runs on a GPU."""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fp8_backend import numerics as nm

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_89", "sm_90a")


def test_cu_files_present():
    assert {"act_quant.cu", "kv_cache.cu"} <= set(CU_FILES)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI has nvcc 13); cannot compile .cu files")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES)
def test_cu_compiled(cu, arch, tmp_path):
    out = tmp_path / (cu + ".cubin")
    r = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-O3", "-Werror", "all-warnings",
                        str(CUDA_DIR / cu), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    # the FP8 kernels really are in the cubin (one symbol per launcher instantiation)
    names = subprocess.run([shutil.which("cuobjdump") or "cuobjdump", "-symbols", str(out)],
                           capture_output=True, text=True).stdout if shutil.which("cuobjdump") else ""
    if names:
        assert "kernel" in names


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no host C compiler to build fp8_math.cuh for the CPU")
    so = tmp_path_factory.mktemp("fp8host") / "fp8host.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-x", "c", str(CUDA_DIR / "fp8_host_api.c"), "-o", str(so), "-lm"],
                   check=True, timeout=120)
    return ctypes.CDLL(str(so))


def ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def test_device_encode_on_host_bit_exact(host_lib):
    from test_triton_kernels import edge_values  # same edge set as the Triton tests

    x = edge_values().contiguous()
    q = torch.empty(x.numel(), dtype=torch.uint8)
    host_lib.fp8_host_encode(ptr(x), ptr(q), ctypes.c_long(x.numel()))
    ref = nm.round_to_fp8(x).view(torch.uint8)
    nan = torch.isnan(x)
    assert torch.equal(q[~nan], ref[~nan])
    assert bool(((q[nan] & 0x7F) == 0x7F).all())


def test_device_decode_on_host_all_codes(host_lib):
    u = torch.arange(256, dtype=torch.uint8)
    y = torch.empty(256)
    host_lib.fp8_host_decode(ptr(u), ptr(y), ctypes.c_long(256))
    r = u.view(nm.E4M3).float()
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(y), nan) and torch.equal(y[~nan], r[~nan])


@pytest.mark.parametrize("scale_ub", [None, 2.0])
def test_device_row_quant_on_host(host_lib, scale_ub):
    g = torch.Generator().manual_seed(0)
    for row in (torch.randn(333, generator=g) * 5, torch.zeros(7), torch.tensor([1e4, -3.0, 1e-7]),
                torch.tensor([1.0, math.nan])):
        q = torch.empty(row.numel(), dtype=torch.uint8)
        s = torch.empty(1)
        host_lib.fp8_host_quantize_row(ptr(row), ptr(q), ptr(s), ctypes.c_long(row.numel()),
                                       ctypes.c_float(scale_ub or 0.0), ctypes.c_int(scale_ub is not None))
        rq, rs = nm.quantize_per_token(row.reshape(1, -1), scale_ub=scale_ub)
        if bool(torch.isnan(rs).any()):
            assert bool(torch.isnan(s).all())
        else:
            assert torch.equal(s, rs.reshape(1)) and torch.equal(q, rq.reshape(-1).view(torch.uint8))


def test_bindings_syntax_against_torch_headers(tmp_path):
    """bindings.cpp can only be built with a CUDA torch; check it parses against this torch's headers
    (the CPU wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h: stubbed here)."""
    import os

    gxx = shutil.which("g++")
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include", Path("/usr/local/cuda/include")]
    if NVCC:
        candidates.insert(0, Path(NVCC).resolve().parents[1] / "include")
    cuda_inc = next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)
    if gxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA toolkit headers")
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_inc}", f"-I{tmp_path}"]
    r = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", *incs, str(CUDA_DIR / "bindings.cpp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
