"""formats.scheme: the one scheme model. Granularities are block shapes, so scale shapes, amax
and expansion follow from the shape alone; Fp8Scheme refuses combinations no format or kernel
has; every consumer (parser, writer, producer presets, kernel choice) speaks it."""

import pytest
import torch

from fp8_backend import numerics
from fp8_backend.formats.layer_tensors import stored_scale_shapes
from fp8_backend.formats.scheme import (
    PER_ROW,
    PER_TENSOR,
    ActivationQuant,
    Fp8Scheme,
    Granularity,
    blocks,
)
from fp8_backend.quantize.options import QuantizeOptions


@pytest.mark.parametrize("g,shape,want", [
    (PER_TENSOR, (300, 200), (1, 1)),
    (PER_ROW, (300, 200), (300, 1)),
    (blocks(128, 128), (300, 200), (3, 2)),  # partial last blocks
    (blocks(128, 128), (128, 128), (1, 1)),
    (Granularity(1, 128), (5, 300), (5, 3)),  # activation groups
    (blocks(128, 128), (8, 300, 200), (8, 3, 2)),  # experts: one grid each
    (PER_TENSOR, (8, 300, 200), (8, 1, 1)),
])
def test_scale_shape_is_the_grid_of_the_block(g, shape, want):
    assert g.scale_shape(shape) == want


@pytest.mark.parametrize("g", [PER_TENSOR, PER_ROW, blocks(128, 128), blocks(64, 32), Granularity(1, 128)])
def test_block_amax_and_expansion_match_the_named_quantizers(g):
    """One rule, five granularities: block amax over g.block(shape) gives the scales the
    per-tensor / per-channel / block / per-token / group quantizers of numerics.py give."""
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 3, 300, base=2.0)[:, None]
    block = g.block(w.shape)
    scale = numerics.compute_scale(numerics.block_amax(w, block))
    assert tuple(scale.shape) == g.grid(w.shape)
    if g == PER_TENSOR:
        ref = numerics.quantize_per_tensor(w)[1].reshape(1, 1)
    elif g == PER_ROW:
        ref = numerics.quantize_per_channel(w)[1]
        assert torch.equal(numerics.quantize_per_token(w)[1], ref)  # per token = per row
    elif g.rows == 1:
        ref = numerics.quantize_group(w, g.cols)[1]
    else:
        ref = numerics.quantize_block(w, block_size=block)[1]
    assert torch.equal(scale, ref)
    full = numerics.expand_block_scale(scale, tuple(w.shape), block)
    assert full.shape == w.shape and torch.equal(full[-1, -1], scale[-1, -1])


def test_stored_scale_shapes():
    assert stored_scale_shapes(PER_TENSOR, (16, 32)) == ((1, 1), (1,), ())
    assert stored_scale_shapes(PER_ROW, (16, 32)) == ((16, 1), (16,))
    assert stored_scale_shapes(blocks(128, 128), (300, 100)) == ((3, 1),)  # a block grid keeps its rank


@pytest.mark.parametrize("make,match", [
    (lambda: Granularity(-1, 0), "Granularity.rows"),
    (lambda: Granularity(0, 128), "Fp8Scheme.weight"),
    (lambda: ActivationQuant(blocks(128, 128)), "ActivationQuant.granularity"),
    (lambda: ActivationQuant(PER_ROW, static=True), "static activation scales are per tensor"),
    (lambda: Fp8Scheme(PER_ROW, ActivationQuant(Granularity(1, 128))), "need weight blocks with the same K"),
    (lambda: Fp8Scheme(blocks(128, 64), ActivationQuant(Granularity(1, 128))), "need weight blocks with the same K"),
    (lambda: Fp8Scheme(blocks(128, 128), ActivationQuant(PER_TENSOR, static=True)), "block weights take dynamic"),
])
def test_inconsistent_schemes_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        s = make()
        if isinstance(s, Granularity):
            Fp8Scheme(s)


@pytest.mark.parametrize("scheme,want", [
    (Fp8Scheme(blocks(128, 128), ActivationQuant(Granularity(1, 128))), ActivationQuant(Granularity(1, 128))),
    (Fp8Scheme(blocks(128, 128)), ActivationQuant(Granularity(1, 128))),  # weight-only blocks: groups
    (Fp8Scheme(PER_TENSOR, ActivationQuant(PER_TENSOR, static=True)), ActivationQuant(PER_TENSOR, static=True)),
    (Fp8Scheme(PER_TENSOR, ActivationQuant(PER_TENSOR)), ActivationQuant(PER_ROW)),  # dynamic: per token
    (Fp8Scheme(PER_ROW), ActivationQuant(PER_ROW)),
])
def test_w8a8_activation(scheme, want):
    assert scheme.w8a8_activation() == want


@pytest.mark.parametrize("opts,weight,act", [
    (dict(scheme="dynamic"), PER_TENSOR, ActivationQuant(PER_ROW)),
    (dict(scheme="dynamic", per_channel=True, format="compressed-tensors"), PER_ROW, ActivationQuant(PER_ROW)),
    (dict(scheme="static"), PER_TENSOR, ActivationQuant(PER_TENSOR, static=True)),
    (dict(scheme="block"), blocks(128, 128), ActivationQuant(Granularity(1, 128))),
])
def test_producer_presets_are_schemes(opts, weight, act):
    o = QuantizeOptions(**opts)
    assert o.fp8_scheme == Fp8Scheme(weight, act)
    assert o.checkpoint_format().scheme == o.fp8_scheme


def test_words():
    assert [g.words() for g in (PER_TENSOR, PER_ROW, blocks(128, 128))] == ["per-tensor", "per-channel", "128x128 block"]
    assert [g.words("activation") for g in (PER_TENSOR, PER_ROW, Granularity(1, 128))] == [
        "per-tensor", "per-token", "1x128 group"]
