"""Round trip of the checkpoint conventions: the producer (fp8_backend.quantize) writes a tiny
checkpoint -> formats parses its config and validates every quantized layer's tensors -> vLLM
loads it with the plugin -> the FP8 weights and scales it serves equal the tensors on disk.

Dense per-tensor, per-channel, 128x128 blocks (both formats), static activation scales and
static KV-cache scales. Every checkpoint loads through vLLM's own model loader (the plugin's
config, get_quant_method, the weight loaders and process_weights_after_loading: everything an
engine does before serving) in one process, tests/engine/hostile/load_worker.py, which saves what each
layer holds: one process instead of an engine start per checkpoint, and the tensors themselves
rather than what generation shows of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fp8_backend import numerics
from fp8_backend.formats.checkpoint import parse_quantization_config
from fp8_backend.formats.layer_tensors import kv_scale_role, validate_layer_tensors
from fp8_backend.formats.safetensors_files import check_safetensors_files

pytestmark = pytest.mark.slow  # quantizes 6 checkpoints and loads them through vLLM

HERE = Path(__file__).parent

#: producer options per checkpoint (fp8_backend.quantize.quantize keyword arguments)
CHECKPOINTS = {
    "autofp8-dynamic-tensor": dict(scheme="dynamic", format="autofp8"),
    "ct-dynamic-channel": dict(scheme="dynamic", format="compressed-tensors", per_channel=True),
    "autofp8-block": dict(scheme="block", format="autofp8"),
    "ct-block": dict(scheme="block", format="compressed-tensors"),
    "autofp8-static-kv": dict(scheme="static", format="autofp8", kv_cache=True, num_samples=2, seq_len=32),
    "ct-static-channel-kv": dict(scheme="static", format="compressed-tensors", per_channel=True,
                                 kv_cache=True, num_samples=2, seq_len=32),
}
#: vLLM's fused linear layers of the Llama model -> checkpoint shards, in row order
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture(scope="module")
def round_trip(tiny_model, tmp_path_factory):
    from fp8_backend.quantize import quantize

    root = tmp_path_factory.mktemp("roundtrip")
    specs = []
    for name, opts in CHECKPOINTS.items():
        quantize(tiny_model, root / name, progress=False, **opts)
        kwargs = {"kv_cache_dtype": "fp8"} if opts.get("kv_cache") else {}
        specs.append({"dir": str(root / name), "kwargs": kwargs, "dump": str(root / f"{name}.pt")})
    spec_file = root / "specs.json"
    spec_file.write_text(json.dumps(specs))
    p = subprocess.run([sys.executable, str(HERE / "hostile" / "load_worker.py"), str(spec_file)],
                       capture_output=True, text=True, timeout=1200)
    results = [json.loads(x[5:]) for x in p.stdout.splitlines() if x.startswith("CASE ")]
    assert len(results) == len(specs), p.stderr[-3000:]
    return {n: (root / n, r, root / f"{n}.pt") for n, r in zip(CHECKPOINTS, results)}


def _per_element(scale: torch.Tensor, n: int, k: int, block) -> torch.Tensor:
    """One fp32 scale per weight element, from a scale of 1 or n elements, or a block grid."""
    if block is not None:
        return numerics.expand_block_scale(scale, (n, k), tuple(block))
    return scale.float().reshape(-1, 1).expand(n, k) if scale.numel() == n else scale.float().reshape(()).expand(n, k)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_producer_formats_vllm_round_trip(round_trip, name):
    ckpt, result, dump = round_trip[name]
    assert result["ok"], result.get("traceback")

    # formats: the config parses, the files check, every quantized layer validates.
    config = json.loads((ckpt / "config.json").read_text())
    scheme = parse_quantization_config(config["quantization_config"])
    assert set(check_safetensors_files(ckpt)) == set(load_file(ckpt / "model.safetensors"))
    disk = load_file(ckpt / "model.safetensors")
    layers = sorted({n[: -len(".weight")] for n, t in disk.items()
                     if n.endswith(".weight") and t.dtype == torch.float8_e4m3fn})
    assert layers, "the producer wrote no FP8 layer"
    valid = {p: validate_layer_tensors(p, {k: v for k, v in disk.items() if k.startswith(p + ".")}, scheme)
             for p in layers}

    # vLLM: what each layer serves equals the shards on disk, bit for bit.
    served = torch.load(dump, weights_only=False)
    linear = {m: v for m, v in served.items() if "weight" in v}
    assert len(linear) == 4 * int(config["num_hidden_layers"])  # qkv, o, gate_up, down
    seen = set()
    for module, got in linear.items():
        parent, proj = module.rsplit(".", 1)
        shards = [f"{parent}.{s}" for s in FUSED.get(proj, [proj])]
        seen.update(shards)
        w = torch.cat([valid[s].weight for s in shards])
        assert torch.equal(got["weight"], w.view(torch.uint8)), module
        n, k = w.shape
        g = scheme.scheme.weight  # on disk: the granularity's grid, expanded by its block shape
        want = torch.cat([numerics.expand_block_scale(valid[s].weight_scale, tuple(valid[s].weight.shape),
                                                      g.block(valid[s].weight.shape)) for s in shards])
        assert torch.equal(_per_element(got["weight_scale"], n, k, got["block_size"]), want), module
        if scheme.input_scale_name is not None:
            assert torch.equal(got["input_scale"].reshape(-1), torch.stack([valid[s].input_scale for s in shards])), module
        else:
            assert "input_scale" not in got, module
    assert seen == set(layers)

    # KV-cache scales: each attention layer serves the k/v scales on disk.
    stored = {kv_scale_role(n): float(t) for n, t in disk.items() if kv_scale_role(n)}
    attention = {m: v for m, v in served.items() if "k_scale" in v}
    assert len(attention) == int(config["num_hidden_layers"])
    for module, got in attention.items():
        parent = module.rsplit(".", 1)[0]
        if scheme.kv_cache is None:
            assert not stored and got["k_scale"] == got["v_scale"] == 1.0
        else:
            assert got["kv_cache_dtype"] == "fp8"
            assert (got["k_scale"], got["v_scale"]) == (stored[(parent, "k")], stored[(parent, "v")]), module
