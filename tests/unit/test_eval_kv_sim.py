"""fp8_backend/eval/kv_sim.py (the accuracy report's FP8 KV simulation) against numerics.py's FP8 cache and
paged attention: the simulation must compute what the plugin's kernels are specified to compute."""
from __future__ import annotations

import math

import pytest
import torch

from fp8_backend import numerics
from fp8_backend.eval.kv_sim import fake_quantize_kv, fp8_kv_attention, install


def test_fake_quantize_kv_edge_values():
    # per kv head scales 1 and 0.5: head 1's values are divided by 0.5 before rounding
    vals = [0.0, -0.0, 2.0 ** -9, 2.0 ** -10, 448.0, -448.0, 464.0, 1e6, float("inf"), float("-inf"), 1.0625, float("nan")]
    x = torch.tensor(vals).reshape(1, 1, -1, 1).expand(1, 2, -1, 1).contiguous()
    s = torch.tensor([1.0, 0.5])
    y = fake_quantize_kv(x, s)
    for h, sh in enumerate((1.0, 0.5)):
        want = numerics.round_to_fp8(x[0, h, :, 0] / sh).float() * sh
        assert torch.equal(torch.isnan(y[0, h, :, 0]), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.equal(y[0, h, :, 0][ok], want[ok])
    # spot values, head scale 1: 2^-10 is e4m3's smallest subnormal/2 -> tie to even gives 0;
    # 464 and beyond saturate to 448; 1.0625 lies halfway between 1.0 and 1.125 -> 1.0 (even)
    got = y[0, 0, :, 0].tolist()
    assert got[2] == 2.0 ** -9 and got[3] == 0.0
    assert got[6] == 448.0 and got[7] == 448.0 and got[8] == 448.0 and got[9] == -448.0
    assert got[10] == 1.0 and math.isnan(got[11])
    # e5m2 saturates at 57344
    assert fake_quantize_kv(torch.full((1, 1, 1, 1), 1e9), 1.0, numerics.E5M2).item() == 57344.0


def test_fake_quantize_kv_bad_input():
    with pytest.raises(ValueError, match="kv_heads"):
        fake_quantize_kv(torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        fake_quantize_kv(torch.zeros(1, 2, 3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="scales > 0"):
        fake_quantize_kv(torch.zeros(1, 2, 3, 4), 0.0)


@pytest.mark.parametrize("qdtype,kv", [(torch.float32, "fp8"), (torch.bfloat16, "fp8"), (torch.float32, "fp8_e5m2")])
def test_attention_matches_paged_attention(qdtype, kv):
    """Prefill of one odd-length sequence (GQA 6 query / 2 kv heads, head size 40) through the
    simulation vs numerics.paged_attention over a paged FP8 cache written by paged_kv_write."""
    g = torch.Generator().manual_seed(0)
    T, Hq, Hkv, D, bs = 37, 6, 2, 40, 16
    q = torch.randn(1, Hq, T, D, generator=g).to(qdtype)
    k = (torch.randn(1, Hkv, T, D, generator=g) * 3).to(qdtype)
    v = torch.randn(1, Hkv, T, D, generator=g).to(qdtype)
    k[0, 1, 5, 3] = 1e4  # beyond max: saturates in both
    ks, vs = torch.tensor([0.02, 0.05]), torch.tensor(0.01)
    dtype = numerics.KV_CACHE_FP8_DTYPES[kv]
    mod = torch.nn.Module()
    mod.fp8_kv = (ks, vs, dtype)
    out, _ = fp8_kv_attention(mod, q, k, v, None, scaling=D ** -0.5)
    nblk = -(-T // bs)
    kc = torch.zeros(nblk, Hkv, bs, D, dtype=dtype)
    vc = torch.zeros(nblk, Hkv, bs, D, dtype=dtype)
    slots = torch.arange(T)
    numerics.paged_kv_write(k[0].transpose(0, 1), kc, slots, ks)
    numerics.paged_kv_write(v[0].transpose(0, 1), vc, slots, vs)
    ref = numerics.paged_attention(q[0].transpose(0, 1), kc, vc, torch.tensor([0, T]), torch.tensor([T]),
                                   torch.arange(nblk).reshape(1, -1), D ** -0.5, ks, vs)
    assert out.dtype == qdtype and out.shape == (1, T, Hq, D)
    # same fp32 math up to summation order (~1e-6 relative); bf16 outputs may then round to a
    # neighbouring bf16 value (2^-8 relative)
    tol = 1e-5 if qdtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(out[0].float(), ref.float(), rtol=tol, atol=tol)


def test_install_on_a_tiny_llama():
    """In a real transformers Llama, FP8 KV with a scale of 1 stays close to plain sdpa, and a
    scale of 1000 (every k/v rounds to 0 or the smallest subnormals) changes the logits far more:
    the function is really called, with each layer's scales."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (1, 21))
    with torch.no_grad():
        ref = m(ids).logits
        assert install(m, {}, {}, "fp8") == 2
        fine = m(ids).logits
        install(m, {0: 1000.0, 1: 1000.0}, {0: 1000.0, 1: 1000.0}, "fp8")
        coarse = m(ids).logits
    # scale 1: k, v keep 3 mantissa bits (2^-4 relative) -> logits move, but little
    assert 0 < (fine - ref).abs().max() < 0.05
    assert (coarse - ref).abs().max() > 2 * (fine - ref).abs().max()
