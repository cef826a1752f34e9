"""Leftovers of killed runs: scratch, staging and temporary names carry their owner.

A name such as ``.etl-work-4242@host.x1y2`` says which process made it, so the next run can
tell debris of a run that is gone from the work of a run still going (two DAG runs on one
data folder, an ETL next to another) and from anything else in the folder, which it never
touches. An owner on another machine (a shared folder) cannot be checked and is left alone.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_OWNER = re.compile(r"(\d+)@([A-Za-z0-9_-]+)\.")


def host() -> str:
    """This machine's name as it appears in owner marks (no dots: a dot ends the mark)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", platform.node() or "localhost")


def owner_mark() -> str:
    """``<pid>@<host>.``: the part of a name that says which process created it."""
    return f"{os.getpid()}@{host()}."


def process_gone(pid: int, made_at: float | None = None) -> bool:
    """True when process ``pid`` no longer runs on this machine.

    ``made_at`` (a UNIX time at or after which the owner was still alive and working) also
    catches a reused number: a process that started later cannot be the owner.
    """
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # exists but cannot be inspected: assume it is the owner
        return False
    # One second of slack: process start times are rounded to clock ticks.
    return made_at is not None and started > made_at + 1.0


def stale(folder: Path, prefix: str) -> list[Path]:
    """Entries of ``folder`` named ``prefix + <owner>...`` whose owner process is gone."""
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    found = []
    for entry in entries:
        owner = _OWNER.match(entry.name, len(prefix)) if entry.name.startswith(prefix) else None
        if owner is None or owner[2] != host() or int(owner[1]) == os.getpid():
            continue
        try:
            made_at = entry.lstat().st_mtime
        except FileNotFoundError:  # its owner just finished with it
            continue
        if process_gone(int(owner[1]), made_at):
            found.append(entry)
    return sorted(found)


def remove(path: Path) -> None:
    """Remove one leftover (a folder with everything in it; links are not followed)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    log.info("removed %s, left behind by a run that was stopped", path)


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove what :func:`stale` finds."""
    for path in stale(folder, prefix):
        remove(path)
