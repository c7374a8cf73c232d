"""Import this BEFORE triton in tests that run Triton kernels on CPU tensors.

It sets TRITON_INTERPRET=1 (triton reads it when kernels are decorated, so it must be set before
our kernel modules are imported) and fixes one bug of the Triton 3.9 interpreter that is not a
kernel bug: ``tl.dot`` on bf16 operands multiplies their raw uint16 bit patterns (the interpreter
stores bf16 as uint16 and calls np.matmul on it). The patch widens bf16 operands to fp32 before
the matmul, which is what the tensor-core MMA computes (exact products, fp32 accumulation).
Other interpreter quirks are handled in the kernels themselves (fp8_math: bit-exact FP8 encode,
bf16 output rounding).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

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
