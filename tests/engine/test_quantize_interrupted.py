"""The producer under SIGKILL and bad inputs: an existing output stays intact (or is replaced by
a complete new one), no partial directory is left that looks like a checkpoint once the next run
has started, and bad inputs get a sentence naming the file or option."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fp8_backend.formats.safetensors_files import check_safetensors_files

pytestmark = pytest.mark.slow  # runs and kills producer processes


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fp8_backend.cli", "quantize", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(d).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _complete(d: Path, scheme: str) -> bool:
    cfg = json.loads((d / "config.json").read_text())
    check_safetensors_files(d)  # raises on a partial file
    return cfg["quantization_config"]["activation_scheme"] == scheme


@pytest.fixture(scope="module")
def first_output(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "out"
    p = _cli(tiny_model, out, "--scheme", "dynamic")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return out, _digest(out)


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0, 6.0, 9.0])
def test_sigkill_with_force_keeps_old_or_complete_new(tiny_model, first_output, delay):
    out, old = first_output
    p = _cli(tiny_model, out, "--scheme", "static", "--num-samples", "4", "--seq-len", "64", "--force")
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    if out.exists():
        assert _digest(out) == old or _complete(out, "static")
    # What the killed run left beside it is hidden and holds no config.json unless complete...
    for sib in out.parent.iterdir():
        if sib != out:
            assert sib.name.startswith(f".{out.name}."), sib
    # ...and the next run cleans it up (and puts an old output back if it had been moved aside).
    q = _cli(tiny_model, out, "--scheme", "dynamic", "--force")
    assert q.wait(timeout=300) == 0, q.stderr.read()
    assert [s.name for s in out.parent.iterdir()] == [out.name]
    assert _digest(out) == old  # same options as the first run: same bytes


def test_sigkill_without_existing_output_leaves_nothing_that_loads(tiny_model, tmp_path):
    out = tmp_path / "new"
    p = _cli(tiny_model, out, "--scheme", "dynamic")
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not out.exists() or _complete(out, "dynamic")
    for sib in tmp_path.iterdir():
        if sib != out:
            assert sib.name.startswith(".new.tmp-") and not (sib / "config.json").exists() or _complete(sib, "dynamic")


def _run(*args) -> str:
    p = _cli(*args)
    assert p.wait(timeout=300) != 0
    return p.stderr.read()


def test_bad_producer_inputs_are_named(tiny_model, tmp_path):
    # Output equal to the input.
    assert "out_dir: expected a directory other than the input model" in _run(tiny_model, tiny_model, "--force")
    # config.json that is not JSON.
    bad = tmp_path / "badcfg"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{not json")
    err = _run(bad, tmp_path / "o1")
    assert "config.json" in err and "Traceback" not in err, err
    # A truncated safetensors file.
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    err = _run(trunc, tmp_path / "o2")
    assert "model.safetensors" in err and "Traceback" not in err, err
    # Empty and binary calibration files.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = _run(tiny_model, tmp_path / "o3", "--scheme", "static", "--calib", empty)
    assert "empty.txt" in err and "Traceback" not in err, err
    binary = tmp_path / "bin.txt"
    binary.write_bytes(os.urandom(4096))
    err = _run(tiny_model, tmp_path / "o4", "--scheme", "static", "--calib", binary)
    assert "bin.txt" in err and "Traceback" not in err, err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.name in ("o1", "o2", "o3", "o4"))
