"""Imported once by tests/conftest.py (pytest_configure), before triton is imported by anything.

It turns on the interpreter (as TRITON_INTERPRET=1 would; it must be on before our kernel
modules are imported, when @triton.jit runs) and fixes one bug of the Triton 3.9 interpreter that is not a
kernel bug: ``tl.dot`` on bf16 operands multiplies their raw uint16 bit patterns (the interpreter
stores bf16 as uint16 and calls np.matmul on it). The patch widens bf16 operands to fp32 before
the matmul, which is what the tensor-core MMA computes (exact products, fp32 accumulation).
Other interpreter quirks are handled in the kernels themselves (fp8_math: bit-exact FP8 encode,
bf16 output rounding).
"""

import os

# The environment variable must be set while triton itself is imported (its library functions
# are decorated then); afterwards the knob holds the setting (read when our kernels are decorated
# and while they run) and the variable is removed, so that the vLLM engine subprocesses that
# other tests of the same pytest session start do not inherit it.
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402
import triton.language  # noqa: E402,F401
from triton.experimental import gluon  # noqa: E402,F401  (imported lazily by the interpreter)

triton.knobs.runtime.interpret = True
if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

_orig_dot = _interp.InterpreterBuilder.create_dot


def _widen_bf16(h):
    if h.dtype.scalar == tl.bfloat16:
        data = _interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return _interp.TensorHandle(data, tl.float32)
    return h


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return _orig_dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision, max_num_imprecise_acc)


_interp.InterpreterBuilder.create_dot = _create_dot

