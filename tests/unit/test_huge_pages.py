"""CPU weights placed in huge-page memory (fp8_backend/kernels/huge_pages.py)."""

import torch

from fp8_backend import kernels, numerics
from fp8_backend.kernels.huge_pages import HugePageArena


def test_arena_copies_exactly_aligned_and_shares_blocks():
    arena = HugePageArena(block_bytes=1 << 20)
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, 70, generator=gen).to(torch.float8_e4m3fn) for n in (3, 100, 5000, 7)]
    out = [arena.place(t) for t in ts]
    for t, o in zip(ts, out):
        assert o.shape == t.shape and o.dtype == t.dtype and o.is_contiguous()
        assert torch.equal(o.view(torch.uint8), t.view(torch.uint8))
        assert o.data_ptr() % 64 == 0
    # Tensors smaller than a block share one.
    assert out[1].untyped_storage().data_ptr() == out[0].untyped_storage().data_ptr()
    # A tensor as large as a block gets its own, 2 MiB-aligned.
    big = arena.place(torch.zeros(1 << 20, dtype=torch.uint8))
    assert big.data_ptr() % (2 << 20) == 0
    assert big.untyped_storage().data_ptr() != out[0].untyped_storage().data_ptr()
    # Later writes to one placement do not touch the others.
    out[0].view(torch.uint8).fill_(0x11)
    assert torch.equal(out[1].view(torch.uint8), ts[1].view(torch.uint8))


def test_prepacked_weights_live_in_huge_page_blocks_and_compute_the_same():
    q, s = numerics.quantize_per_tensor(torch.randn(64, 96))
    p = kernels.w8a16_prepack(q)
    assert p.data_ptr() != q.data_ptr() and p.data_ptr() % 64 == 0
    assert torch.equal(p.view(torch.uint8), q.view(torch.uint8))
    x = torch.randn(3, 96).to(torch.bfloat16)
    assert torch.equal(kernels.w8a16_linear(x, p, s), kernels.w8a16_linear(x, q.contiguous(), s))
