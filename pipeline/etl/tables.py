"""Find and stream MIMIC-III tables: ``.csv`` or ``.csv.gz``, upper- or lower-case names.

Tables are streamed in blocks (pyarrow's CSV reader, gzip through ISA-L, which inflates several
times faster than zlib), filtered block by block and appended to DuckDB, so memory stays flat
however large the table is. The compressed bytes are hashed as they are read: the data card's
checksums cost no second pass over 30 GB.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv

from features.errors import UserError


class InputError(UserError):
    """A MIMIC-III input that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class TableSpec:
    """The columns the ETL needs from one table, lower-case name -> Arrow type."""

    name: str
    columns: dict[str, pa.DataType]


@dataclass
class TableStats:
    name: str
    path: Path
    rows_read: int = 0
    rows_kept: int = 0
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0


def find_table(mimic_dir: Path, name: str) -> Path:
    """The file of table ``name``: ``NAME.csv.gz``, ``NAME.csv``, ``name.csv.gz``, ... ."""
    if not mimic_dir.is_dir():
        raise InputError(
            f"MIMIC-III folder {mimic_dir} does not exist (set --mimic-dir or MIMIC_DIR)"
        )
    wanted = {f"{name.lower()}.csv.gz", f"{name.lower()}.csv"}
    found = sorted(p for p in mimic_dir.iterdir() if p.name.lower() in wanted and p.is_file())
    if not found:
        raise InputError(
            f"{mimic_dir}: table {name} not found (expected {name}.csv.gz or {name}.csv, any case)"
        )
    # Prefer the compressed file when both exist: it is what the release ships.
    found.sort(key=lambda p: not p.name.lower().endswith(".gz"))
    return found[0]


class _HashingReader(io.RawIOBase):
    """Passes reads through and feeds every byte to sha256."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._raw.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.n += n
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_text_stream(path: Path, hasher: _HashingReader) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        try:
            from isal import igzip_threaded

            # Inflate in a background thread (it releases the GIL) while Arrow parses.
            return igzip_threaded.open(io.BufferedReader(hasher, 1 << 20), "rb", threads=1)
        except ImportError:  # pragma: no cover - isal is a dependency; zlib works too
            return gzip.open(io.BufferedReader(hasher, 1 << 20), "rb")
    return io.BufferedReader(hasher, 1 << 20)


def read_header(path: Path) -> list[str]:
    """The header row of a table, as written (case kept)."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            line = fh.readline()
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read the header: {_gzip_message(exc)}") from exc
    if not line.strip():
        raise InputError(f"{path}: file is empty (no header row)")
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: header is not UTF-8 text") from exc
    return [c.strip().strip('"') for c in text.split(",")]


def _gzip_message(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "end-of-stream" in msg or "ended before" in msg:
        return f"truncated gzip file ({msg})"
    if isinstance(exc, gzip.BadGzipFile) or "gzip" in msg.lower() or isinstance(exc, zlib.error):
        return f"corrupt gzip file ({msg})"
    return msg


def resolve_columns(path: Path, header: list[str], spec: TableSpec) -> dict[str, str]:
    """Lower-case name -> name as in the file, for every column the spec needs."""
    by_lower = {c.lower(): c for c in header}
    missing = [c for c in spec.columns if c not in by_lower]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (table {spec.name}; "
            f"header has {', '.join(header[:20])}{' ...' if len(header) > 20 else ''})"
        )
    return {c: by_lower[c] for c in spec.columns}


_COLUMN_NO = re.compile(r"column #(\d+)")


def _line_chunks(stream: io.BufferedIOBase, size: int) -> Iterator[bytes]:
    """Cut a byte stream into chunks of about ``size`` bytes that end at a row boundary.

    A line break counts as a row boundary only outside quotes (an even number of ``"`` before
    it: CSV escapes a quote as ``""``), so a quoted value holding a line break stays whole and
    every chunk is a set of whole rows that can be parsed on its own.
    """
    rest = b""
    while True:
        buf = stream.read(size)
        if not buf:
            if rest.strip():
                yield rest
            return
        buf = rest + buf
        cut = buf.rfind(b"\n") + 1
        while cut and buf.count(b'"', 0, cut) % 2:
            cut = buf.rfind(b"\n", 0, cut - 1) + 1
        if cut == 0:
            rest = buf
            continue
        yield buf[:cut]
        rest = buf[cut:]


def stream_table(
    path: Path,
    spec: TableSpec,
    stats: TableStats,
    *,
    block_size: int = 4 << 20,
    threads: int = 2,
    transform: Callable[[pa.Table], pa.Table] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[pa.Table]:
    """Yield tables of the spec's columns (lower-case names, the spec's types), ``transform``ed.

    One thread reads (ISA-L inflates in its own thread); ``threads`` workers parse chunks of
    whole lines with Arrow and apply ``transform`` (a filter) in parallel, which Arrow's own
    streaming reader does not do. ``stats.rows_read`` counts rows before ``transform``.

    Every failure (corrupt or truncated gzip, a value that does not parse as its type) becomes
    one :class:`InputError` naming the file, and the column where Arrow says which.
    """
    header = read_header(path)
    names = resolve_columns(path, header, spec)
    lower = list(names)
    convert = pcsv.ConvertOptions(
        include_columns=list(names.values()),
        column_types={names[c]: t for c, t in spec.columns.items()},
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    read = pcsv.ReadOptions(column_names=header, use_threads=False, block_size=block_size * 2)
    parse_options = pcsv.ParseOptions(newlines_in_values=True)

    def parse(chunk: bytes) -> tuple[int, pa.Table]:
        table = pcsv.read_csv(
            pa.py_buffer(chunk),
            read_options=read,
            parse_options=parse_options,
            convert_options=convert,
        )
        table = table.rename_columns(lower)
        return table.num_rows, (transform(table) if transform is not None else table)

    hasher = _HashingReader(open(path, "rb"))  # noqa: SIM115 - closed in finally
    stream = None
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="etl-parse")
    pending: deque[Future] = deque()

    def drain(limit: int) -> Iterator[pa.Table]:
        while len(pending) > limit:
            n, table = pending.popleft().result()
            stats.rows_read += n
            if on_rows is not None:
                on_rows(n)
            yield table

    try:
        stream = _open_text_stream(path, hasher)
        stream.readline()  # the header, already read
        for chunk in _line_chunks(stream, block_size):
            pending.append(pool.submit(parse, chunk))
            yield from drain(threads + 1)  # bounded read-ahead keeps memory flat
        yield from drain(0)
    except InputError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        msg = str(exc).split("\n")[0]
        m = _COLUMN_NO.search(msg)
        where = ""
        if m and int(m.group(1)) < len(header):
            where = f" column {header[int(m.group(1))].lower()!r}:"
        raise InputError(f"{path}:{where} {msg}") from exc
    except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:
        raise InputError(f"{path}: {_gzip_message(exc)}") from exc
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        if stream is not None:
            # A close error after a failed read would hide the real error.
            with contextlib.suppress(Exception):
                stream.close()
        hasher.close()
    # Hash the rest of the file (bytes after the last block the reader needed).
    with open(path, "rb") as fh:
        fh.seek(hasher.n)
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            hasher.sha.update(chunk)
            hasher.n += len(chunk)
    stats.bytes = hasher.n
    stats.sha256 = hasher.sha.hexdigest()
    stats.seconds = time.perf_counter() - start
