"""All-or-nothing output directory: write into a temporary sibling, rename into place at the end.

An exception or KeyboardInterrupt before the end removes the temporary directory and leaves an
existing output untouched. With ``force`` an existing output is moved aside only once the new one
is complete, then deleted; if the final rename fails the old one is moved back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .options import QuantizeError


def check_out_dir(out: Path, model_dir: Path, force: bool) -> None:
    if out.resolve() == model_dir.resolve():
        raise QuantizeError(f"out_dir: expected a directory other than the input model, found the same {str(out)!r}")
    if out.exists() and not force:
        raise QuantizeError(
            f"out_dir: {str(out)!r} already exists; expected a new path, or force=True (--force) to replace it"
        )


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on normal exit it becomes ``out``."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise QuantizeError(f"out_dir: {str(out)!r} already exists; pass force=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(old)
