"""Every Triton kernel compiles ahead of time (triton.compile, CUDA GPUTarget) for sm_80, sm_89
and sm_90 without a GPU, and uses the tensor-core instructions it is meant to. Compilation runs
in a subprocess (tests/support/triton_aot.py) because test_triton_kernels.py turns on the interpreter,
under which kernels cannot be compiled. Nothing is run on hardware."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles every Triton kernel for three GPU targets

ROOT = Path(__file__).resolve().parents[2]
CAPS = (80, 89, 90)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # really compile
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "triton_aot.py"), *map(str, CAPS)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {(row["kernel"], row["cap"]): row for row in rows}


COMMON = ["e4m3_encode", "e4m3_decode", "quant_per_token_bf16_ub", "quant_group_fp16", "quant_partial_amax",
          "quant_per_tensor_dynamic", "quant_per_tensor_static",
          "w8a16_bf16_group0_bm16",
          "w8a16_bf16_group0", "w8a16_bf16_group128", "w8a16_fp16_group0", "w8a16_fp16_group128"]
W8A8 = ["w8a8_gemm_channel_bf16", "w8a8_gemm_block_bf16"]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("kernel", COMMON)
def test_kernel_compiled(compiled, kernel, cap):
    row = compiled[(kernel, cap)]
    assert row["ptx"] > 0 and row["cubin"] > 0
    assert row["target"] == ("sm_90a" if cap == 90 else f"sm_{cap}")
    if kernel.startswith("w8a16"):  # bf16/fp16 tensor-core MMA with fp32 accumulation
        dt = "bf16" if "bf16" in kernel else "f16"
        want = f"f32.{dt}.{dt}"
        assert any(want in m for m in row["mma"]), row["mma"]


@pytest.mark.parametrize("cap", (89, 90))
@pytest.mark.parametrize("kernel", W8A8)
def test_w8a8_gemm_compiled_to_fp8_mma(compiled, kernel, cap):
    row = compiled[(kernel, cap)]
    assert row["cubin"] > 0
    assert any("e4m3.e4m3" in m for m in row["mma"]), row["mma"]  # FP8 tensor cores


def test_w8a8_gemm_not_built_for_sm80(compiled):
    # sm_80 has no FP8 MMA: the W8A8 kernel is not a target there; linear_paths.py refuses it
    # (tests/unit/test_dispatch.py) and sends Ampere to the W8A16 kernel.
    assert not any(k[0] in W8A8 and k[1] == 80 for k in compiled)
