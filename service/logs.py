"""Log lines written in batches: one write per fraction of a second instead of one per line.

The access log writes one line per request, and a plain ``StreamHandler`` makes each line a
``write`` (and a flush) of its own: thousands of syscalls a second under load, each waking
whatever reads the log. ``BatchedStreamHandler`` formats each record as it comes (the same
formatter, so the same lines) and writes what has gathered in one call when a timer on the
event loop fires (``interval_s`` after the first line waiting), when ``max_lines`` are waiting,
at once for a record of level WARNING or above (so errors are never late, and lines keep their
order), and on ``flush`` / ``close``: at the app's shutdown (``flush_all``) and in
``logging.shutdown`` at exit. A record logged outside an event loop's thread is written at
once too, with what waits before it.

``icu-forecast serve`` swaps the root logger's plain stream handlers for these while it runs
(``batch_log_writes``), in the single process and in each worker. What it costs: a line
reaches the log up to ``interval_s`` late, and a process killed with SIGKILL loses the lines of
its last ``interval_s``; a normal shutdown (SIGINT, SIGTERM) loses none.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

INTERVAL_S = 0.2
MAX_LINES = 1000
_live: weakref.WeakSet[BatchedStreamHandler] = weakref.WeakSet()


class BatchedStreamHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes its lines in batches (see the module docstring)."""

    def __init__(
        self, stream: Any = None, interval_s: float = INTERVAL_S, max_lines: int = MAX_LINES
    ) -> None:
        super().__init__(stream)
        self.interval_s = interval_s
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        _live.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._lines) >= self.max_lines:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: nothing would fire a timer
            self.flush()
            return
        if self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(self.interval_s, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._timer_loop is loop:
                self._timer_loop = None
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._lines:
                text = "".join(self._lines)
                self._lines = []
                try:
                    self.stream.write(text)
                except Exception:
                    self.handleError(logging.makeLogRecord({"msg": "batched log lines"}))
            super().flush()

    def close(self) -> None:
        self.flush()
        super().close()


def flush_all() -> None:
    """Write every batched handler's waiting lines now (the app's shutdown calls it: uvicorn
    ends a process stopped by a signal by raising that signal again, which skips
    ``logging.shutdown``)."""
    for handler in list(_live):
        handler.flush()


def batch_log_writes(
    interval_s: float = INTERVAL_S, logger: logging.Logger | None = None
) -> Callable[[], None]:
    """Replace ``logger``'s (default: the root's) plain ``StreamHandler``s by batched ones
    writing the same stream with the same formatter, level and filters (none when
    ``interval_s`` is 0).

    Other handlers (files with rotation, test capture handlers, anything subclassed) are left
    as they are. Returns a function that writes what is waiting and puts the originals back.
    """
    logger = logger or logging.getLogger()
    swapped: list[tuple[logging.Handler, BatchedStreamHandler]] = []
    if interval_s <= 0:
        return swapped.clear
    handlers = logger.handlers
    for i, h in enumerate(handlers):
        if type(h) is not logging.StreamHandler:
            continue
        batched = BatchedStreamHandler(h.stream, interval_s)
        batched.setFormatter(h.formatter)
        batched.setLevel(h.level)
        for f in h.filters:
            batched.addFilter(f)
        handlers[i] = batched  # in place: the handlers keep their order
        swapped.append((h, batched))

    def restore() -> None:
        for original, batched in swapped:
            with batched.lock:  # type: ignore[union-attr]
                if batched in handlers:
                    handlers[handlers.index(batched)] = original
                batched.flush()
        swapped.clear()

    return restore
