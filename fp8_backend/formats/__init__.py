"""Checkpoint and option conventions, normalized into one scheme object. Imports neither vLLM
nor the kernels."""
from .scheme import Fp8Scheme, match_ignore  # noqa: F401
