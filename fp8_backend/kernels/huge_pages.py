"""CPU weight storage in transparent huge pages.

The W8A16 GEMV at small M streams every FP8 weight byte once per call; from 2 MiB pages it reads
~15% faster than from 4 KiB pages on Sapphire Rapids (fewer TLB misses, and the hardware
prefetchers are not stopped at every 4 KiB boundary). Weights are sub-allocated, 64-byte
aligned, from 64 MiB blocks (``_C.huge_page_empty``: 2 MiB-aligned, ``madvise(MADV_HUGEPAGE)``;
a larger weight gets a block of its own), so layers do not each round up to a huge page: only
the 2 MiB pages a weight touches become resident, and blocks are filled back to back.
Where the kernel does not grant huge pages (THP "never") the blocks are ordinary memory and
nothing else changes.
"""

from __future__ import annotations

import torch

from .. import _C

BLOCK_BYTES = 64 << 20
ALIGN = 64


class HugePageArena:
    """Hands out tensors that are views into shared huge-page blocks (a block lives as long as
    any tensor placed in it)."""

    def __init__(self, block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes
        self._block: torch.Tensor | None = None
        self._used = 0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of CPU tensor ``t`` in huge-page memory."""
        if t.device.type != "cpu":
            raise ValueError(f"HugePageArena.place: expected a CPU tensor, found one on {t.device}")
        if t.numel() == 0:
            return t.contiguous()
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous CPU tensor in huge-page memory (pages become resident as
        they are first written, so filling it piece by piece never holds a second copy)."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if nbytes >= self.block_bytes:
            buf = _C.huge_page_empty(nbytes)  # a block of its own
        else:
            if self._block is None or self._used + nbytes > self._block.numel():
                self._block, self._used = _C.huge_page_empty(self.block_bytes), 0
            buf = self._block[self._used : self._used + nbytes]
            self._used = (self._used + nbytes + ALIGN - 1) // ALIGN * ALIGN
        return buf.view(dtype).view(shape)


_arena = HugePageArena()


def to_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` in the process-wide weight arena."""
    return _arena.place(t)


def huge_page_empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in the process-wide weight arena (weights filled in place by
    a loader, such as mixture-of-experts weights loaded expert by expert)."""
    return _arena.empty(shape, dtype)
