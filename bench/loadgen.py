"""A small closed-loop HTTP/1.1 load generator (keep-alive, one connection per client).

On a 2-core machine the client shares the CPU with the server under test, and every
microsecond it spends is taken from the server: a heavy client (httpx costs several times more
per request) would measure itself. So each client is a bare asyncio stream that sends a
request built once and reads the response by its ``Content-Length`` (both servers set it), on
uvloop (the caller's ``uvloop.run``). Every server gets the same client. Each client sends
its request, waits for the whole response (latency: from the write to the last byte), and
sends the next one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


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


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """A keep-alive JSON POST, built once and sent as is by every client."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _request(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes
) -> tuple[int, bytes]:
    """One request on a keep-alive connection: ``(status, body)``."""
    reader, writer = conn
    writer.write(data)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        raise ConnectionError(f"response without Content-Length: {head[:200]!r}")
    length = int(head[i + 17 : head.index(b"\r\n", i + 2)])
    return int(head[9:12]), await reader.readexactly(length)


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
    first_error: str | None = None
    issued = 0
    deadline = 0.0
    clock = time.perf_counter

    async def client() -> None:
        nonlocal issued, errors, first_error
        conn = await asyncio.open_connection(host, port)
        try:
            for _ in range(max(1, warmup // concurrency)):
                await _request(conn, request)
            await ready.wait()
            await start.wait()
            # A slow server may take longer to warm every connection up than its keep-alive
            # timeout, closing the connections that finished first: start on fresh ones.
            conn[1].close()
            conn = await asyncio.open_connection(host, port)
            while issued < max_requests and clock() < deadline:
                issued += 1
                t0 = clock()
                status, body = await _request(conn, request)
                latencies.append(clock() - t0)
                if status != 200:
                    errors += 1
                    first_error = first_error or f"{status}: {body[:300]!r}"
        finally:
            conn[1].close()

    ready, start = asyncio.Barrier(concurrency + 1), asyncio.Event()
    # A client that fails cancels the others and this wait: its error is raised here.
    async with asyncio.TaskGroup() as clients:
        for _ in range(concurrency):
            clients.create_task(client())
        await ready.wait()  # connections open and warm-up requests done
        t_start = clock()
        deadline = t_start + max_seconds
        start.set()
    elapsed = clock() - t_start
    return LoadResult(
        concurrency, len(latencies), errors, elapsed, np.asarray(latencies), first_error
    )
