"""Fp8Schemes by short name, for parametrizing tests: weight granularity x activations."""

from fp8_backend.formats.scheme import PER_ROW, PER_TENSOR, ActivationQuant, Fp8Scheme, Granularity, blocks

WEIGHTS = {"tensor": PER_TENSOR, "channel": PER_ROW, "block": blocks(128, 128)}
STATIC = ActivationQuant(PER_TENSOR, static=True)
PER_TOKEN = ActivationQuant(PER_ROW)
GROUP_128 = ActivationQuant(Granularity(1, 128))


def scheme(weight: str, act: str = "none") -> Fp8Scheme:
    """``weight`` "tensor" | "channel" | "block" (128x128); ``act`` "none" (weight-only),
    "static" (per-tensor input scale) or "dynamic" (per token; 1x128 groups with blocks)."""
    w = WEIGHTS[weight]
    if act == "none":
        return Fp8Scheme(w)
    if act == "static":
        return Fp8Scheme(w, STATIC)
    return Fp8Scheme(w, GROUP_128 if w.cols else PER_TOKEN)
