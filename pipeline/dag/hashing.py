"""Content hashes of a step's inputs, parameters and code.

Files are hashed by content (SHA-256), never by timestamp, so touching a file or copying a
folder does not invalidate a step. Hashing the full MIMIC-III release (tens of GB) on every
``dag run`` would be slow, so digests are cached by (path, size, mtime_ns): a file whose size
and modification time are unchanged is not read again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MISSING = "<missing>"
_CHUNK = 1 << 20
# Files that never carry content a step depends on.
_IGNORED_NAMES = {"__pycache__", ".DS_Store"}


class DigestCache:
    """(path, size, mtime_ns) -> sha256, persisted with the DAG state."""

    def __init__(self, entries: Mapping[str, list] | None = None) -> None:
        self.entries: dict[str, list] = dict(entries or {})

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            return hit[2]
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        value = digest.hexdigest()
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, value]
        return value


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(
            part in _IGNORED_NAMES or part.startswith(".") for part in p.relative_to(folder).parts
        )
    )


def path_digests(path: Path, cache: DigestCache) -> dict[str, str]:
    """One digest per file: ``{"<path>": sha}`` for a file, ``{"<path>/<rel>": sha}`` per file
    of a folder (hidden files skipped: staging leftovers are not content), ``{"<path>":
    "<missing>"}`` when absent. Keys name the files so a change can be reported by name."""
    label = str(path)
    if path.is_file():
        return {label: cache.file_digest(path)}
    if path.is_dir():
        files = _files_under(path)
        if not files:
            return {label: "<empty>"}
        return {f"{label}/{p.relative_to(path).as_posix()}": cache.file_digest(p) for p in files}
    return {label: MISSING}


def inputs_digests(paths: Iterable[Path], cache: DigestCache) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in paths:
        out.update(path_digests(Path(path), cache))
    return out


def params_canonical(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as JSON-compatible values (paths and tuples normalised) for storing/diffing."""
    return json.loads(json.dumps(dict(params), sort_keys=True, default=str))


def module_sources(module: str) -> list[Path]:
    """The .py files of ``module``: one file, or every file of a package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"code module {module!r} not found")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        return sorted(
            p
            for loc in spec.submodule_search_locations
            for p in Path(loc).rglob("*.py")
            if "__pycache__" not in p.parts
        )
    return [origin]


def code_digests(modules: Iterable[str]) -> dict[str, str]:
    """``{"<module>:<relative file>": sha}`` over the source of the modules a step runs."""
    out: dict[str, str] = {}
    for module in modules:
        files = module_sources(module)
        root = (
            files[0].parent
            if len(files) == 1
            else Path(
                importlib.util.find_spec(module).submodule_search_locations[0]  # type: ignore[union-attr]
            )
        )
        for f in files:
            out[f"{module}:{f.relative_to(root).as_posix()}"] = hashlib.sha256(
                f.read_bytes()
            ).hexdigest()
    return out


def combined(digests: Mapping[str, Any]) -> str:
    """One short hash of a digest mapping, for display and MLflow tags."""
    blob = json.dumps(dict(digests), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
