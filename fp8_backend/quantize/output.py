"""All-or-nothing output directory: write into a temporary sibling, rename into place at the end.

An exception or KeyboardInterrupt before the end removes the temporary directory and leaves an
existing output untouched; after a SIGKILL the next run removes what was left and, if the kill
came between moving the old output aside and renaming the new one in, puts the old one back. With ``force`` an existing output is moved aside only once the new one
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(out: Path) -> None:
    """Clean up after a run that was killed (SIGKILL, power loss) before it could: its temporary
    ``.<out>.tmp-<pid>-*`` directories are deleted, and an old output it had moved aside
    (``.<out>.old-<pid>-*``) is put back if ``out`` is missing, else deleted. Only directories of
    processes that are no longer running are touched."""
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not (out.exists() or out.is_symlink()):
            os.replace(p, out)
        else:
            _remove(p)


@contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on normal exit it becomes ``out``.

    Killed at any point, it leaves either the old ``out`` or the complete new one at ``out``;
    what it left beside it is cleaned up by the next run (:func:`recover_interrupted`)."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    if out.exists() and not force:
        raise QuantizeError(f"out_dir: {str(out)!r} already exists; pass force=True (--force) to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(old)
