"""Atomic file and directory output: a failed write leaves the previous output intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from features import leftovers


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and a rename.

    Temporary files of earlier writers of ``path`` that were killed are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    leftovers.remove_stale(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(
        prefix=prefix + leftovers.owner_mark(), suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are the same folder or one lies inside the other.

    Compared after resolving symlinks and ``..``, so two spellings of one folder overlap.
    """
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces ``path`` as a whole.

    The swap is two renames (old out of the way, new in place), so a reader never sees a
    half-written folder, and an exception inside the block leaves ``path`` untouched.
    Everything at ``path`` is replaced: callers decide whether that is theirs to replace.
    A file at ``path`` is refused (it is never a previous output folder), and a symlink to a
    folder is kept: the folder it points to is replaced.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    mark = leftovers.owner_mark()
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-{mark}", dir=path.parent))
    # mkdtemp makes 0700 folders; outputs are meant to be shared like any other folder.
    staging.chmod(0o755)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{mark}", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(path: str | os.PathLike) -> None:
    """Clean up after an :func:`atomic_dir` of ``path`` whose process was killed.

    Its staging folder goes. A kill between the two renames of the swap leaves no ``path``
    but the previous output set aside as ``.<name>.old-*``: that is put back, so the output is
    the last complete one rather than lost.
    """
    path = Path(path)
    old = leftovers.stale(path.parent, f".{path.name}.old-")
    if old and not os.path.lexists(path):
        newest = max(old, key=lambda p: p.lstat().st_mtime)
        os.replace(newest, path)
        old.remove(newest)
    for leftover in old + leftovers.stale(path.parent, f".{path.name}.staging-"):
        leftovers.remove(leftover)
