"""Content hashes of a step's inputs, parameters and code.

Files are hashed by content (SHA-256), never by timestamp, so touching a file or copying a
folder does not invalidate a step. Hashing the full MIMIC-III release (tens of GB) on every
``dag run`` would be slow, so digests are cached by (path, size, mtime_ns): a file whose size
and modification time are unchanged is not read again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import modulefinder
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from features.checksum import sha256_file

MISSING = "<missing>"
_COMPILED = {".pyc", ".pyo"}
_CODE = {".py", *_COMPILED}


def file_digest(path: Path, cache: dict[str, list]) -> str:
    """sha256 of ``path``, from ``cache`` ((path -> [size, mtime_ns, sha256]), persisted with
    the DAG state) while the file's size and mtime are unchanged."""
    stat = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
        return hit[2]
    cache[key] = [stat.st_size, stat.st_mtime_ns, sha256_file(path)]
    return cache[key][2]


def _path_digests(path: Path, cache: dict[str, list]) -> dict[str, str]:
    # Keys name the files so that a change can be reported by name.
    if path.is_file():
        return {str(path): file_digest(path, cache)}
    if not path.is_dir():
        return {str(path): MISSING}
    if not (files := _files_under(path)):
        return {str(path): "<empty>"}
    return {f"{path}/{p.relative_to(path).as_posix()}": file_digest(p, cache) for p in files}


def inputs_digests(paths: Iterable[Path], cache: dict[str, list]) -> dict[str, str]:
    """One digest per file of ``paths`` (files or folders), ``<missing>`` for an absent one."""
    return {k: v for path in paths for k, v in _path_digests(Path(path), cache).items()}


def params_canonical(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as JSON-compatible values (paths and tuples normalised) for storing/diffing."""
    return json.loads(json.dumps(dict(params), sort_keys=True, default=str))


# Libraries whose version can change what a step computes (parsing, numerics, training), by
# distribution name. A step's fingerprint records the installed version of those its code
# imports; the others (MLflow, FastAPI, ...) only carry results and do not invalidate them.
RESULT_LIBRARIES = frozenset(
    {"duckdb", "lightning", "ncps", "numpy", "pandas", "pyarrow", "scikit-learn", "torch"}
)


def _package_root(module: str) -> tuple[Path, list[Path]]:
    """The folder that holds ``module``'s top-level package, and the module's own files: one
    file, or every file of a package (data files too: ``.sql``, ``.json``, ``.yaml`` ...)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"code module {module!r} not found")
    origin = Path(spec.origin).resolve()
    depth = module.count(".") + (1 if spec.submodule_search_locations else 0)
    root = origin.parents[depth]
    if spec.submodule_search_locations:
        return root, [p for p in _files_under(origin.parent) if p.suffix not in _COMPILED]
    return root, [origin]


def _files_under(folder: Path) -> list[Path]:
    # Hidden entries (.DS_Store, staging leftovers) and byte-code caches carry no content.
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part == "__pycache__" or part[0] == "." for part in p.relative_to(folder).parts)
    )


_distributions = functools.cache(importlib.metadata.packages_distributions)


def code_digests(modules: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(project file -> sha256, distribution -> version) of ``modules`` and, followed through
    their imports (the stdlib's ``modulefinder``: lazy imports inside functions count too),
    every project file they load with the data files beside it in its package, and the
    versions of the :data:`RESULT_LIBRARIES` any of them imports."""
    files: dict[Path, Path] = {}  # file -> the project root it is under
    third_party: set[str] = set()
    for module in modules:
        root, own = _package_root(module)
        # Searching only the project root: every other import is reported missing, by name.
        finder = modulefinder.ModuleFinder(path=[str(root)])
        for path in own:
            files[path] = root
            if path.suffix == ".py":
                name = ".".join(path.relative_to(root).with_suffix("").parts)
                # A file that does not parse is still hashed; running it says what is wrong.
                with contextlib.suppress(ImportError, SyntaxError, ValueError):
                    finder.import_hook(name.removesuffix(".__init__"))
        third_party |= {name.split(".")[0] for name in finder.badmodules}
        for found in finder.modules.values():
            path = Path(found.__file__).resolve() if found.__file__ else None
            if path is None or not path.is_relative_to(root):
                continue
            files[path] = root
            # Data files sit beside the module that reads them (sibling modules count only
            # when imported).
            if (path.parent / "__init__.py").is_file():
                files |= {
                    p: root
                    for p in path.parent.iterdir()
                    if p.is_file() and p.suffix not in _CODE and not p.name.startswith(".")
                }
    distributions = _distributions()
    libraries = {
        dist.lower()
        for top in third_party
        for dist in distributions.get(top, [])
        if dist.lower() in RESULT_LIBRARIES
    }
    digests = {p.relative_to(root).as_posix(): sha256_file(p) for p, root in sorted(files.items())}
    return digests, {dist: importlib.metadata.version(dist) for dist in sorted(libraries)}


def combined(digests: Mapping[str, Any]) -> str:
    """One short hash of a digest mapping, for display and MLflow tags."""
    blob = json.dumps(dict(digests), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
