"""Block-FP8 checkpoints with tensor parallelism, without an engine: the block-scale sharding of
Fp8CheckpointLinearMethod for every rank of column-parallel (output rows split), row-parallel
(input K split), merged gate/up and QKV layers (with replicated KV heads too), at 128-aligned
shard boundaries and at boundaries inside a 128 block. The contract: every weight element of a
rank's shard is served with its own checkpoint block's scale, i.e. the rank's dequantized weight
equals the TP=1 dequantized weight's slice exactly. (Engines at TP=2: tests/engine/test_tp.py.)"""

import math

import pytest
import torch
from schemes import scheme

from fp8_backend import kernels, numerics
from fp8_backend.formats.checkpoint import CheckpointFormat
from fp8_backend.vllm_adapter import checkpoint_linear as cl

BLOCK = (128, 128)


def _scheme(fmt: str) -> CheckpointFormat:
    return CheckpointFormat(source=fmt, storage_format="fp8" if fmt == "fp8" else "float-quantized",
                            scheme=scheme("block", "dynamic"),
                            weight_scale_name="weight_scale_inv" if fmt == "fp8" else "weight_scale")


def _checkpoint_shard(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One checkpoint tensor quantized with 128x128 blocks whose scales differ a lot block to
    block (rows scaled by up to 2^6), so a misplaced scale shows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 3, n, base=2.0)[:, None]
    w *= torch.logspace(-2, 2, k, base=2.0)[None, :]
    return numerics.quantize_block(w, block_size=BLOCK)


def _rank_slices(kind: str, full: list[int], k: int, rank: int, size: int, replicas: int):
    """(rows per shard, K columns) a rank holds, as vLLM's loaders narrow the weights."""
    if kind == "row":
        kp = k // size
        return [slice(0, n) for n in full], slice(rank * kp, (rank + 1) * kp)
    out = []
    for i, n in enumerate(full):
        parts = size // (replicas if i > 0 else 1)
        r = rank // (replicas if i > 0 else 1)
        w = n // parts
        out.append(slice(r * w, (r + 1) * w))
    return out, slice(0, k)


def _set_tp(monkeypatch, rank: int, size: int) -> None:
    """Be rank ``rank`` of ``size`` without a process group (vLLM's parameters ask too)."""
    import vllm.model_executor.parameter as vp

    monkeypatch.setattr(cl, "_tp_rank_size", lambda: (rank, size))
    monkeypatch.setattr(vp, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vp, "get_tensor_model_parallel_world_size", lambda: size)


def _serve_rank(monkeypatch, fmt, kind, full, k, rank, size, replicas=1):
    """create_weights + this rank's checkpoint tensors + process_weights_after_loading."""
    _set_tp(monkeypatch, rank, size)
    shards = [_checkpoint_shard(n, k, seed=i) for i, n in enumerate(full)]
    rows, cols = _rank_slices(kind, full, k, rank, size, replicas)
    local_w = [q[r, cols] for (q, _), r in zip(shards, rows)]
    widths = [w.shape[0] for w in local_w]
    layer = torch.nn.Module()
    if replicas > 1:
        layer.num_kv_head_replicas = replicas
    method = cl.Fp8CheckpointLinearMethod(_scheme(fmt), prefix=f"model.layers.0.{kind}")
    method.create_weights(layer, input_size_per_partition=cols.stop - cols.start, output_partition_sizes=widths,
                          input_size=k, output_size=sum(full), params_dtype=torch.bfloat16,
                          weight_loader=None)
    layer.weight.data.copy_(torch.cat(local_w))
    param = getattr(layer, method.checkpoint.weight_scale_name)
    ids = [None] if len(full) == 1 else (["q", "k", "v"] if len(full) == 3 else [0, 1])
    for shard_id, (_, s) in zip(ids, shards):
        param.weight_loader(param, s, shard_id)
    method.process_weights_after_loading(layer)
    # The reference: the TP=1 dequantized weight, this rank's slice of each shard.
    ref = torch.cat([numerics.dequantize(q, numerics.expand_block_scale(s, tuple(q.shape), BLOCK))[r, cols] for (q, s), r in zip(shards, rows)])
    return layer, ref


CASES = {  # name -> (kind, full shard widths, K, tp size, kv replicas)
    "column-aligned": ("column", [512], 256, 2, 1),
    "column-mid-block": ("column", [576], 256, 2, 1),  # 288 rows per rank
    "gate-up-mid-block": ("merged", [688, 688], 256, 2, 1),  # 344 per rank and shard
    "qkv": ("merged", [256, 128, 128], 256, 2, 1),  # k/v 64 rows per rank
    "qkv-replicated-kv": ("merged", [512, 128, 128], 256, 4, 2),  # 2 KV heads over 4 ranks
    "row-aligned": ("row", [256], 512, 2, 1),
    "row-mid-block": ("row", [256], 688, 2, 1),  # K 344 per rank: rank 1 starts 88 into a block
    "row-mid-block-tp4": ("row", [192], 576, 4, 1),  # K 144 per rank
}


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_rank_serves_the_tp1_weights_exactly(monkeypatch, case, fmt):
    kind, full, k, size, replicas = CASES[case]
    for rank in range(size):
        layer, ref = _serve_rank(monkeypatch, fmt, kind, full, k, rank, size, replicas)
        n_local, k_local = layer.weight.shape
        bn, bk = layer.block_size
        got = numerics.dequantize(layer.weight.data, numerics.expand_block_scale(
            layer.weight_scale.data, (n_local, k_local), (bn, bk)))
        assert torch.equal(got, ref), (case, rank)
        aligned = all(w % 128 == 0 for w in layer.logical_widths[:-1]) and not any(layer.block_tp.phases)
        assert (bn == 128) == aligned, (case, rank, layer.block_size)
        assert bk == (128 if layer.block_tp.k_offset % 128 == 0 else math.gcd(layer.block_tp.k_offset, 128))
        # The kernel serves the re-indexed grid: same result as the reference weight in fp32.
        x = torch.randn(3, k_local, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
        y = kernels.w8a16_linear(x, layer.weight.data, layer.weight_scale.data, None, layer.block_size)
        y_ref = (x.float() @ ref.T).to(torch.bfloat16)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=1.6e-2, atol=1e-3 * y_ref.float().abs().max().item())


def test_aligned_shards_keep_the_checkpoint_grid(monkeypatch):
    """At 128-aligned boundaries a rank keeps its rows of the checkpoint grid unchanged."""
    layer, _ = _serve_rank(monkeypatch, "fp8", "column", [512], 256, rank=1, size=2)
    assert layer.block_size == [128, 128] and layer.weight_scale.shape == (2, 2)
    layer, _ = _serve_rank(monkeypatch, "fp8", "row", [256], 512, rank=1, size=2)
    assert layer.block_size == [128, 128] and layer.weight_scale.shape == (2, 2)


def test_block_split_by_shard_boundary_is_kept_on_both_sides(monkeypatch):
    """576 rows over 2 ranks: block 2 (rows 256..383) is split at row 288; both ranks keep it."""
    grids = []
    for rank in range(2):
        _set_tp(monkeypatch, rank, 2)
        layer = torch.nn.Module()
        cl.Fp8CheckpointLinearMethod(_scheme("fp8"), "p").create_weights(
            layer, 256, [288], 256, 576, torch.bfloat16, weight_loader=None)
        grids.append(layer.block_tp)
    assert (grids[0].first_rows, grids[0].rows, grids[0].phases) == ((0,), (3,), (0,))
    assert (grids[1].first_rows, grids[1].rows, grids[1].phases) == ((2,), (3,), (32,))


def test_wrong_grid_shape_named(monkeypatch):
    _set_tp(monkeypatch, 1, 2)
    layer = torch.nn.Module()
    cl.Fp8CheckpointLinearMethod(_scheme("fp8"), "model.layers.0.mlp.down_proj").create_weights(
        layer, 344, [256], 688, 256, torch.bfloat16, weight_loader=None)
    p = layer.weight_scale_inv
    with pytest.raises(cl.CheckpointFormatError,
                       match=r"model.layers.0.mlp.down_proj.weight_scale_inv: expected 128x128 block scales of shape "
                             r"\[2, 6\] .*found \[2, 3\]"):
        p.weight_loader(p, torch.ones(2, 3))


def test_k_split_inside_a_block_refused_off_cpu(monkeypatch):
    """GPU kernels quantize activations in 1x128 groups from column 0 of each rank: a K split
    inside a block cannot be served exactly there, and is refused naming layer, columns, K and
    block (a meta-device weight stands in for a GPU one)."""
    _set_tp(monkeypatch, 1, 2)
    layer = torch.nn.Module()
    method = cl.Fp8CheckpointLinearMethod(_scheme("fp8"), "model.layers.0.mlp.down_proj")
    method.create_weights(layer, 344, [256], 688, 256, torch.bfloat16, weight_loader=None)
    layer.weight = torch.nn.Parameter(torch.empty(256, 344, dtype=torch.float8_e4m3fn, device="meta"),
                                      requires_grad=False)
    with pytest.raises(cl.CheckpointFormatError,
                       match=r"model.layers.0.mlp.down_proj.weight_scale_inv: this tensor-parallel rank holds "
                             r"input columns \[344, 688\) of K=688, which splits 128x128 scale block 2; .*CPU only"):
        method._block_layout(torch.ones(2, 3), layer)


def test_vllm_cpu_moe_refused_under_expert_parallelism(monkeypatch):
    """A layer fp8-backend would hand to vLLM's own CPU experts (an ignored MoE layer: 16-bit)
    is refused under expert parallelism, naming the layer, instead of crashing at the first
    forward; without expert parallelism it is vLLM's 16-bit method as before."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod

    from fp8_backend.vllm_adapter import config, moe
    from fp8_backend.vllm_adapter.layer_owner import UnsupportedLayerError

    monkeypatch.setattr(config, "platform_name", lambda: "cpu")
    layer = SimpleNamespace(moe_config=SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=True)))
    with pytest.raises(UnsupportedLayerError, match=r"model.layers.1.mlp.experts: expert parallelism "
                                                    r"\(enable_expert_parallel=True\) on CPU: .*16-bit experts"):
        moe.unquantized_moe_method(layer, "model.layers.1.mlp.experts")
    layer.moe_config.moe_parallel_config.use_ep = False
    monkeypatch.setattr(UnquantizedFusedMoEMethod, "__init__", lambda self, cfg: None)
    assert isinstance(moe.unquantized_moe_method(layer, "model.layers.1.mlp.experts"), UnquantizedFusedMoEMethod)
