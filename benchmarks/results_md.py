"""Write one benchmark's section of benchmarks/RESULTS.md (each benchmark owns one section,
delimited by HTML comments, so benchmarks can be re-run independently)."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
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


def update_section(name: str, body: str) -> None:
    """Replace (or append) section `name` of RESULTS.md with `body`."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
