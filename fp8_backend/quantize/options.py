"""What the user asked the producer for, validated up front (before any file is read)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats.checkpoint import CheckpointFormat
from ..formats.scheme import PER_ROW, PER_TENSOR, ActivationQuant, Fp8Scheme, Granularity, blocks, check_ignore_patterns
from ..formats.writer import producer_format

SCHEMES = ("dynamic", "static", "block")
FORMATS = ("autofp8", "compressed-tensors")
SCALE_SEARCHES = ("none", "mse")


class QuantizeError(ValueError):
    """Bad producer input; the message names the option, file or tensor, expected vs found."""


@dataclass(frozen=True)
class QuantizeOptions:
    """scheme: "dynamic" (weights only; activations quantized at run time), "static" (weights +
    calibrated per-tensor ``input_scale``) or "block" (128x128 weight blocks).
    per_channel: one weight scale per output row (compressed-tensors only; the AutoFP8 "fp8"
    format stores one scalar per tensor). kv_cache: calibrate and store k_scale / v_scale.
    ignore: extra layer names / patterns left 16-bit ("re:<regex>", globs, names); lm_head is
    always left 16-bit. scale_search: "none" (amax) or "mse" (clipping ratio minimizing the
    weight's quantization MSE; never worse than amax)."""

    scheme: str = "dynamic"
    format: str = "autofp8"
    per_channel: bool = False
    kv_cache: bool = False
    ignore: tuple[str, ...] = ()
    scale_search: str = "none"
    calib: str | None = None
    num_samples: int = 32
    seq_len: int = 256
    max_shard_bytes: int = 2 << 30
    block_size: tuple[int, int] = (128, 128)
    ignore_default: tuple[str, ...] = field(default=("lm_head",), repr=False)

    def __post_init__(self) -> None:
        for name, allowed in (("scheme", SCHEMES), ("format", FORMATS), ("scale_search", SCALE_SEARCHES)):
            if getattr(self, name) not in allowed:
                raise QuantizeError(f"{name}: expected one of {list(allowed)}, found {getattr(self, name)!r}")
        if self.per_channel and self.scheme == "block":
            raise QuantizeError("per_channel: expected False with scheme 'block' (blocks have their own scales), found True")
        if self.per_channel and self.format == "autofp8":
            raise QuantizeError(
                "per_channel: the AutoFP8 'fp8' format stores one weight scale per tensor; use "
                "format 'compressed-tensors' for per-channel scales (found per_channel=True, format 'autofp8')"
            )
        for name in ("num_samples", "seq_len", "max_shard_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise QuantizeError(f"{name}: expected an integer >= 1, found {getattr(self, name)!r}")
        try:
            check_ignore_patterns(self.ignore)
        except ValueError as e:
            raise QuantizeError(str(e)) from None

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "static" or self.kv_cache

    @property
    def fp8_scheme(self) -> Fp8Scheme:
        """The scheme these options name (the producer's presets, as compressed-tensors' FP8,
        FP8_DYNAMIC and FP8_BLOCK): "dynamic" -> per-tensor (or per-channel) weights and
        per-token activations, "static" -> a calibrated per-tensor input scale, "block" ->
        block weights and 1 x (K block) activation groups."""
        if self.scheme == "block":
            bn, bk = self.block_size
            return Fp8Scheme(blocks(bn, bk), ActivationQuant(Granularity(1, bk)))
        weight = PER_ROW if self.per_channel else PER_TENSOR
        if self.scheme == "static":
            return Fp8Scheme(weight, ActivationQuant(PER_TENSOR, static=True))
        return Fp8Scheme(weight, ActivationQuant(PER_ROW))

    def checkpoint_format(self, ignored=()) -> CheckpointFormat:
        """How the checkpoint these options write is stored (names, shapes and
        quantization_config all come from it); ``ignored``: the layers left 16-bit."""
        return producer_format(self.format, self.fp8_scheme, kv_cache=self.kv_cache, ignore=tuple(ignored))

    @property
    def all_ignores(self) -> list[str]:
        return list(self.ignore_default) + [p for p in self.ignore if p not in self.ignore_default]
