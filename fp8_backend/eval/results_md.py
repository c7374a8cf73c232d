"""Results documents: one section per benchmark or report in a Markdown file (benchmarks/RESULTS.md),
delimited by HTML comments so each can be re-run independently, and the machine description every
figure carries (CPU, SIMD features, kernel path)."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

HEADER = "# Benchmark and accuracy results\n\nEach section is rewritten by the command named in it.\n"


def machine() -> str:
    """CPU model, cores, ISA flags that matter here, torch version, date."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx512bw", "avx512_vbmi", "avx512_bf16", "amx_tile", "avx512_fp16") if f in flags]
    missing = [f for f in ("avx512_bf16", "amx_tile") if f not in flags]
    return (
        f"{model}, {torch.get_num_threads()} threads ({platform.machine()}), "
        f"ISA: {' '.join(isa) or 'no AVX-512'}" + (f" (no {', '.join(missing)})" if missing else "")
        + f"; torch {torch.__version__}; {datetime.date.today().isoformat()}"
    )


def update_section(results: Path, name: str, body: str) -> None:
    """Replace (or append) section `name` of the results file `results` with `body`."""
    results = Path(results)
    text = results.read_text() if results.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    results.write_text(text)


def cpu_description() -> str:
    """lscpu's model name and family/model, core count, and the SIMD features that decide which
    kernel paths can run (AVX2/FMA/F16C, AVX-512, AMX), naming AVX-512 / AMX when absent."""
    import os
    import subprocess

    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(info.get("Flags", "").split())
    simd = [f.upper().replace("_", "-") for f in
            ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    desc = (f"{info.get('Model name', 'unknown CPU')} (family {info.get('CPU family', '?')} model "
            f"{info.get('Model', '?')}), {os.cpu_count()} cores, {' '.join(simd) or 'no AVX2'}")
    if "avx512f" not in flags:
        desc += ", no AVX-512"
    elif "amx_tile" not in flags:
        desc += ", no AMX"
    return desc


def kernel_path(root: Path) -> str:
    """fp8_backend.kernels.cpu_isa() as an engine started from the tree `root` sees it (`root` first
    on PYTHONPATH; run in a fresh interpreter so that the caller does not load the extension)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run([sys.executable, "-c", "from fp8_backend import kernels; print(kernels.cpu_isa())"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    return lines[-1] if p.returncode == 0 and lines else "unknown"
