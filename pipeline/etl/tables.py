"""Find and stream MIMIC-III tables: ``.csv`` or ``.csv.gz``, upper- or lower-case names.

The compressed bytes are hashed as they are read: the data card's checksums cost no second pass
over 30 GB.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import queue
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from isal import igzip_threaded
from isal.isal_zlib import error as IsalError

from features.errors import UserError


class InputError(UserError):
    """A MIMIC-III input that is missing, unreadable or malformed."""


@dataclass
class TableStats:
    name: str
    path: Path
    rows_read: int = 0
    rows_kept: int = 0
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0
    duplicate_rows: int = 0  # exact duplicates of a kept row, dropped
    time_out_of_range_rows: int = 0  # rows with a timestamp no timestamp type here can hold


def find_table(mimic_dir: Path, name: str) -> Path:
    """The file of table ``name``: ``NAME.csv.gz``, ``NAME.csv``, ``name.csv.gz``, ... ."""
    if not mimic_dir.exists():
        raise InputError(
            f"MIMIC-III folder {mimic_dir} does not exist (set --mimic-dir or MIMIC_DIR)"
        )
    if not mimic_dir.is_dir():
        raise InputError(f"--mimic-dir {mimic_dir} is a file, not a folder of MIMIC-III tables")
    wanted = {f"{name.lower()}.csv.gz", f"{name.lower()}.csv"}
    try:
        entries = list(mimic_dir.iterdir())
    except OSError as exc:
        raise InputError(
            f"MIMIC-III folder {mimic_dir} cannot be read ({exc.strerror or exc})"
        ) from exc
    found = [p for p in entries if p.name.lower() in wanted and p.is_file()]
    if not found:
        raise InputError(
            f"{mimic_dir}: table {name} not found (expected {name}.csv.gz or {name}.csv, any case)"
        )
    # Prefer the compressed file when both exist: it is what the release ships.
    return min(found, key=lambda p: (not p.name.lower().endswith(".gz"), p))


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


def resolve_columns(
    path: Path, header: list[str], table: str, columns: Iterable[str]
) -> dict[str, str]:
    """Lower-case name -> name as in the file, for every one of ``columns`` (lower-case)."""
    by_lower = {c.lower(): c for c in header}
    missing = [c for c in columns if c not in by_lower]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (table {table}; "
            f"header has {', '.join(header[:20])}{' ...' if len(header) > 20 else ''})"
        )
    return {c: by_lower[c] for c in columns}


_QUOTE = ord('"')
_COLUMN_NO = re.compile(r"column #(\d+)")
_ROW_NO = re.compile(r"Row #(\d+)")


@dataclass
class Chunk:
    """Whole CSV rows: ``buf[:stop]``; ``quoted`` when they hold a ``"`` anywhere."""

    buf: bytearray
    stop: int
    quoted: bool

    def view(self) -> memoryview:
        return memoryview(self.buf)[: self.stop]


def _row_boundary(buf: bytearray, end: int) -> tuple[int, bool]:
    """The end of the last whole row in ``buf[:end]`` (0 if none); whether the rows hold a quote.

    A line break counts as a row boundary only outside quotes (an even number of ``"`` before
    it: CSV escapes a quote as ``""``), so a quoted value holding a line break stays whole.
    Counting quotes costs a pass over the bytes (numpy's, several times faster than
    ``bytearray.count`` and outside the GIL); the search for a first quote costs almost
    nothing, and blocks without any quote skip the count.
    """
    cut = buf.rfind(b"\n", 0, end) + 1
    first = buf.find(b'"', 0, cut)
    if first < 0:
        return cut, False
    data = np.frombuffer(buf, np.uint8, count=cut)
    while cut > first and np.count_nonzero(data[first:cut] == _QUOTE) % 2:
        cut = buf.rfind(b"\n", 0, cut - 1) + 1
    del data  # a bytearray with a live export cannot be resized
    return cut, first < cut


def _line_chunks(
    stream: io.BufferedIOBase, size: int, free: queue.SimpleQueue[bytearray] | None = None
) -> Iterator[Chunk]:
    """Cut a byte stream into :class:`Chunk` s of about ``size`` bytes of whole rows.

    The bytes are read straight into buffers taken from ``free`` (a new one when it is empty
    or the buffer is too small), and the consumer puts each buffer back when it is done with
    the chunk: reusing a few buffers spares the kernel from handing out and zeroing fresh
    pages for every block of a 30 GB stream. Only the unfinished last row moves, not the block.
    """
    rest = b""
    while True:
        buf = None
        if free is not None:
            with contextlib.suppress(queue.Empty):
                buf = free.get_nowait()
        need = len(rest) + size
        if buf is None or len(buf) < need:
            buf = bytearray(need)
        view = memoryview(buf)
        view[: len(rest)] = rest
        n = stream.readinto(view[len(rest) : need])
        end = len(rest) + n
        if not n:
            if rest.strip():
                yield Chunk(buf, end, b'"' in rest)
            return
        cut, quoted = _row_boundary(buf, end)
        rest = bytes(view[cut:end])
        view.release()
        if cut:
            yield Chunk(buf, cut, quoted)
        elif free is not None:
            free.put(buf)


def _arrow_error(path: Path, header: list[str], exc: Exception, rows_before: int) -> InputError:
    """One line naming file, column and value; Arrow's row number counts from the start of
    its block, so ``rows_before`` (the data rows of the earlier blocks) is added to it."""
    msg = str(exc).split("\n")[0]
    msg = _ROW_NO.sub(lambda r: f"data row {rows_before + int(r.group(1)):,}", msg)
    m = _COLUMN_NO.search(msg)
    where = ""
    if m and int(m.group(1)) < len(header):
        where = f" column {header[int(m.group(1))].lower()!r}:"
    return InputError(f"{path}:{where} {msg}")


def stream_table(
    path: Path,
    spec: Mapping[str, pa.DataType],
    stats: TableStats,
    *,
    block_size: int = 4 << 20,
    threads: int = 2,
    transform: Callable[[pa.Table], pa.Table] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> Iterator[pa.Table]:
    """Yield tables of ``spec``'s columns (lower-case name -> type), ``transform``ed.

    ISA-L inflates the file in a thread of its own (outside the GIL); it is read into reused
    buffers and cut into chunks of whole rows; ``threads`` workers parse the chunks with Arrow
    and apply ``transform`` (a filter) in parallel, which Arrow's streaming reader does not do.
    ``stats.rows_read`` counts rows before ``transform``.

    ``transform`` sees timestamp columns as text: they are converted after it, so only the
    rows it keeps pay for parsing dates (most CHARTEVENTS rows are dropped by item id).

    Every failure (corrupt or truncated gzip, a value that does not parse as its type) becomes
    one :class:`InputError` naming the file, and the column where that is known.
    """
    header = read_header(path)
    names = resolve_columns(path, header, stats.name, spec)
    deferred = {c: t for c, t in spec.items() if pa.types.is_timestamp(t)}
    convert = pcsv.ConvertOptions(
        include_columns=list(names.values()),
        column_types={names[c]: pa.string() if c in deferred else t for c, t in spec.items()},
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    read = pcsv.ReadOptions(column_names=header, use_threads=False, block_size=block_size * 2)
    # Without a quote anywhere in a chunk, quoting rules cannot change a value, and Arrow
    # tokenizes a fifth faster with them off. A chunk is parsed as one Arrow block (see
    # ``parse``), and within a block Arrow's parser keeps quoted line breaks in their value:
    # ``newlines_in_values`` only steers where Arrow would cut blocks, and costs 5 %.
    parse_options = {
        False: pcsv.ParseOptions(quote_char=False, double_quote=False),
        True: pcsv.ParseOptions(),
    }
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()

    def convert_deferred(table: pa.Table) -> pa.Table:
        for i, field in enumerate(table.schema):
            want = deferred.get(field.name)
            if want is None or not pa.types.is_string(field.type):
                continue
            try:
                converted = table.column(i).cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                msg = str(exc).split("\n")[0]
                raise InputError(f"{path}: column {field.name!r}: {msg}") from exc
            table = table.set_column(i, field.name, converted)
        return table

    def parse(chunk: Chunk) -> tuple[int, pa.Table]:
        # One Arrow block per chunk: Arrow must not cut it again (at a quoted line break), so
        # a row longer than a block gets a block of its own size.
        options = read
        if chunk.stop >= read.block_size:
            options = pcsv.ReadOptions(
                column_names=header, use_threads=False, block_size=chunk.stop + 1
            )
        try:
            table = pcsv.read_csv(
                pa.py_buffer(chunk.view()),
                read_options=options,
                parse_options=parse_options[chunk.quoted],
                convert_options=convert,
            )
        finally:
            free.put(chunk.buf)  # Arrow copies the values out: the buffer can be refilled
        table = table.rename_columns(list(names))
        n = table.num_rows
        if transform is not None:
            table = transform(table)
        return n, convert_deferred(table)

    hasher = _HashingReader(open(path, "rb"))  # noqa: SIM115 - closed in finally
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="etl-parse")
    # Chunks being parsed, in file order, at most ``threads + 1``: memory stays flat.
    parsing: collections.deque[Future[tuple[int, pa.Table]]] = collections.deque()
    stream = None
    try:
        stream = io.BufferedReader(hasher, 1 << 20)
        if path.name.lower().endswith(".gz"):
            # ISA-L inflates several times faster than zlib, beside the parse workers.
            stream = igzip_threaded.open(stream, "rb", threads=1, block_size=block_size)
        stream.readline()  # the header, already read
        chunks = _line_chunks(stream, block_size, free)
        while True:
            while len(parsing) <= threads and (chunk := next(chunks, None)) is not None:
                parsing.append(pool.submit(parse, chunk))
            if not parsing:
                break
            n, table = parsing.popleft().result()
            stats.rows_read += n
            if on_rows is not None:
                on_rows(n)
            yield table
    except InputError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _arrow_error(path, header, exc, stats.rows_read) from exc
    except (OSError, EOFError, zlib.error, IsalError, pa.ArrowException) as exc:
        raise InputError(f"{path}: {_gzip_message(exc)}") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if stream is not None:
            # A close error after a failed read would hide the real error.
            with contextlib.suppress(Exception):
                stream.close()
        hasher.close()
    # Hash the rest of the file (bytes after the last block the reader needed).
    with open(path, "rb") as fh:
        fh.seek(hasher.n)
        stats.sha256 = hashlib.file_digest(fh, lambda: hasher.sha).hexdigest()
        stats.bytes = fh.tell()
    stats.seconds = time.perf_counter() - start
