"""Random mixture-of-experts weights quantized with numerics.py, in the fused layout
(numerics.fused_moe_w8a16: w13 = [gate; up] per expert)."""

import torch

from fp8_backend import numerics as nx


def experts(e, i, h, block_size, seed=0):
    """Random experts quantized as a checkpoint would be: per-channel, or one block grid each for
    gate, up and down."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) * 0.1
    w2 = torch.randn(e, h, i, generator=g) * 0.1
    q13, s13, q2, s2 = [], [], [], []
    for ex in range(e):
        if block_size is None:
            a, sa = nx.quantize_per_channel(w13[ex])
            b, sb = nx.quantize_per_channel(w2[ex])
            sa, sb = sa.reshape(-1), sb.reshape(-1)
        else:
            ga, gs = nx.quantize_block(w13[ex, :i], block_size=block_size)
            ua, us = nx.quantize_block(w13[ex, i:], block_size=block_size)
            a, sa = torch.cat([ga, ua]), torch.cat([gs, us])
            b, sb = nx.quantize_block(w2[ex], block_size=block_size)
        q13.append(a), s13.append(sa), q2.append(b), s2.append(sb)
    return torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)
