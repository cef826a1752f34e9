"""A small closed-loop HTTP/1.1 load generator (keep-alive, one connection per client).

On a 2-core machine the client shares the CPU with the server under test, and every
microsecond it spends is taken from the server: a heavy client would measure itself. So it is
an ``asyncio.Protocol`` per connection (no stream reader layers), it finds the end of a response
from its ``Content-Length`` (or chunked framing) with byte searches, sends a request that is
built once, and runs on uvloop when that is installed (``run``). Every server gets the same
client. Each client sends its request, waits for the whole response (latency: from the write to
the last byte), and sends the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_s: np.ndarray = field(repr=False)
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if len(self.latencies_s) else 0.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (a lighter client), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def build_request(host: str, port: int, path: str, body: bytes, headers: dict | None = None):
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Framing(Exception):
    pass


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in a lower-cased response head, if present."""
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def _parse(buf: bytearray, until_close: bool) -> tuple[int, bytes, int] | None:
    """``(status, body, bytes used)`` of the response at the start of ``buf``, or None if it
    has not all arrived. ``until_close``: the connection has ended (a body without framing)."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    start = head_end + 4
    head = bytes(buf[:head_end]).lower()
    status = int(head[9:12])
    length = _header(head, b"content-length")
    if length is not None:
        end = start + int(length)
        return (status, bytes(buf[start:end]), end) if len(buf) >= end else None
    if b"chunked" in (_header(head, b"transfer-encoding") or b""):
        parts = []
        pos = start
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            chunk_end = line_end + 2 + size
            if len(buf) < chunk_end + 2:
                return None
            if size == 0:
                return status, b"".join(parts), chunk_end + 2
            parts.append(bytes(buf[line_end + 2 : chunk_end]))
            pos = chunk_end + 2
    if until_close:
        return status, bytes(buf[start:]), len(buf)
    return None


class _Connection(asyncio.Protocol):
    """One keep-alive connection: ``await request(data)`` -> ``(status, body)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._complete(until_close=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._complete(until_close=True)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc!r}"))

    def _complete(self, until_close: bool) -> None:
        if self.waiter is None or self.waiter.done():
            return
        try:
            got = _parse(self.buf, until_close)
        except ValueError as exc:
            self.waiter.set_exception(_Framing(f"bad response framing: {exc}"))
            return
        if got is not None:
            status, body, used = got
            del self.buf[:used]
            self.waiter.set_result((status, body))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: _Connection(loop), host, port)
    return conn


async def run_load(
    host: str,
    port: int,
    request: bytes,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup: int = 20,
) -> LoadResult:
    """Closed loop: ``concurrency`` clients, until ``max_requests`` or ``max_seconds``."""
    latencies: list[float] = []
    errors = 0
    first_error: list[str] = []
    issued = 0
    deadline = 0.0
    clock = time.perf_counter

    async def client() -> None:
        nonlocal issued, errors
        conn = await _connect(host, port)
        try:
            for _ in range(max(1, warmup // concurrency)):
                await conn.request(request)
            ready.append(1)
            await start.wait()
            # A slow server may take longer to warm every connection up than its keep-alive
            # timeout, closing the connections that finished first: start on fresh ones.
            conn.close()
            conn = await _connect(host, port)
            while issued < max_requests and clock() < deadline:
                issued += 1
                t0 = clock()
                status, body = await conn.request(request)
                latencies.append(clock() - t0)
                if status != 200:
                    errors += 1
                    if not first_error:
                        first_error.append(f"{status}: {body[:300]!r}")
        finally:
            conn.close()

    start = asyncio.Event()
    ready: list[int] = []
    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    while len(ready) < concurrency:  # connections open and warm-up requests done
        if any(t.done() for t in tasks):
            await asyncio.gather(*tasks)  # raises the client's error
        await asyncio.sleep(0.01)
    t_start = clock()
    deadline = t_start + max_seconds
    start.set()
    await asyncio.gather(*tasks)
    elapsed = clock() - t_start
    return LoadResult(
        concurrency,
        len(latencies),
        errors,
        elapsed,
        np.asarray(latencies),
        first_error[0] if first_error else None,
    )
