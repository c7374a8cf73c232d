"""Online quantization at load (vllm_adapter.linear.quantize_linear_weight) against numerics.py:
bit-identical FP8 values and scales, whatever the row-block size it works in (it quantizes a
block of rows at a time to bound the load's peak memory)."""
import pytest
import torch

from fp8_backend import numerics
from fp8_backend.formats.scheme import blocks
from fp8_backend.vllm_adapter.linear import quantize_linear_weight
from schemes import WEIGHTS


def reference(w, strategy, widths):
    if strategy == "channel":
        q, s = numerics.quantize_per_channel(w)
        return q, s.reshape(-1)
    if len(widths) == 1:
        q, s = numerics.quantize_per_tensor(w)
        return q, s.reshape(1)
    shards = torch.split(w, widths)
    parts = [numerics.quantize_per_tensor(x) for x in shards]
    return (torch.cat([p[0] for p in parts]),
            torch.cat([p[1].expand(x.shape[0]) for p, x in zip(parts, shards)]))


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 20], ids=["rows-of-1", "rows-of-few", "whole"])
@pytest.mark.parametrize("shape,widths", [((96, 70), [96]), ((96, 70), [32, 16, 48]), ((5, 3), [5]),
                                          ((300, 33), [100, 200]), ((4, 8), [1, 3])])
def test_chunked_online_quantization_is_bit_identical_to_numerics(strategy, chunk, shape, widths):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 600).to(torch.bfloat16)
    w[0] = 0  # an all-zero row (per-channel scale floor) and values beyond 448 (saturation)
    q, s = quantize_linear_weight(w, WEIGHTS[strategy], widths, "layer.weight", chunk_elements=chunk)
    rq, rs = reference(w, strategy, widths)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert s.dtype == torch.float32 and s.shape == rs.shape and torch.equal(s, rs)


def test_bad_input_is_named():
    w = torch.ones(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"layer.weight: shard widths \[1, 2\] do not add up to the weight's 4 rows"):
        quantize_linear_weight(w, WEIGHTS["tensor"], [1, 2], "layer.weight")
    with pytest.raises(ValueError, match="layer.weight: online FP8 quantizes per tensor or per channel, found 128x128 block"):
        quantize_linear_weight(w, WEIGHTS["block"], [4], "layer.weight")
    with pytest.raises(ValueError, match="layer.weight: online FP8 quantizes per tensor or per channel, found 1x64 block"):
        quantize_linear_weight(w, blocks(1, 64), [4], "layer.weight")
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="layer.weight: expected finite values, found 1 NaN"):
        quantize_linear_weight(w, WEIGHTS["tensor"], [4], "layer.weight")
