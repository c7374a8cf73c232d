"""The producer runs shared by the unit tests of fp8_backend.quantize and its round trips through
vLLM: one checkpoint per (scheme, format) with the independent writer describing the same
quantization, produced once per module (fixtures `produced`, `sharded_model`)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_writers import write_autofp8, write_block, write_llm_compressor
from safetensors.torch import load_file, save_file

from fp8_backend import numerics
from fp8_backend.quantize import quantize

CALIB = dict(num_samples=4, seq_len=64)  # enough for the tiny model; keeps calibration < 1 s


def q(model, out, **kw):
    kw.setdefault("progress", False)
    return quantize(model, out, **kw)


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in numerics.FP8_DTYPES:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# (scheme, format, per_channel) -> the checkpoint_writers writer describing the same quantization
CASES = {
    "dynamic-autofp8": (dict(scheme="dynamic", format="autofp8"), lambda s, d: write_autofp8(s, d, "dynamic")),
    "static-autofp8": (dict(scheme="static", format="autofp8"), lambda s, d: write_autofp8(s, d, "static")),
    "block-autofp8": (dict(scheme="block", format="autofp8"), lambda s, d: write_block(s, d, "fp8")),
    "dynamic-ct-channel": (dict(scheme="dynamic", format="compressed-tensors", per_channel=True),
                           lambda s, d: write_llm_compressor(s, d, "FP8_DYNAMIC")),
    "static-ct": (dict(scheme="static", format="compressed-tensors"),
                  lambda s, d: write_llm_compressor(s, d, "FP8")),
    "block-ct": (dict(scheme="block", format="compressed-tensors"),
                 lambda s, d: write_block(s, d, "compressed-tensors")),
}


@pytest.fixture(scope="module")
def produced(tiny_model, tmp_path_factory):
    """Every CASES checkpoint, produced once for the module."""
    root = tmp_path_factory.mktemp("produced")
    return {name: q(tiny_model, root / name, **kw, **CALIB) for name, (kw, _) in CASES.items()}


@pytest.fixture(scope="module")
def sharded_model(tiny_model, tmp_path_factory):
    """The tiny model re-saved in 3 input shards with an index, plus an extra file to copy."""
    d = tmp_path_factory.mktemp("sharded") / "m"
    shutil.copytree(tiny_model, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    parts = [names[0::3], names[1::3], names[2::3]]
    wm = {}
    for i, p in enumerate(parts):
        f = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: sd[k] for k in p}, str(d / f), metadata={"format": "pt"})
        wm.update({k: f for k in p})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "README.md").write_text("model card")
    return d
