"""benchmarks/RESULTS.md: each benchmark rewrites its own section (fp8_backend.eval.results_md)."""

from __future__ import annotations

from pathlib import Path

from fp8_backend.eval import results_md as _md
from fp8_backend.eval.results_md import cpu_description, machine  # noqa: F401  (re-exported)

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = RESULTS.parent.parent


def update_section(name: str, body: str) -> None:
    """Replace (or append) section `name` of benchmarks/RESULTS.md with `body`."""
    _md.update_section(RESULTS, name, body)


def kernel_path() -> str:
    """The CPU kernel path an engine started from this tree uses."""
    return _md.kernel_path(ROOT)
