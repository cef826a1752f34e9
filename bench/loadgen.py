"""A small closed-loop HTTP/1.1 load generator (keep-alive, one connection per worker).

Raw asyncio streams instead of an HTTP client library: on a 2-core machine the client shares
the CPU with the server under test, and a heavy client would measure itself. Each worker sends
its request, reads the whole response (Content-Length or chunked), and sends the next one.
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


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, body


async def run_load(
    host: str,
    port: int,
    request: bytes,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup: int = 20,
) -> LoadResult:
    """Closed loop: ``concurrency`` workers, until ``max_requests`` or ``max_seconds``."""
    latencies: list[float] = []
    errors = 0
    first_error: list[str] = []
    issued = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(max(1, warmup // concurrency)):
                writer.write(request)
                await _read_response(reader)
            ready.append(1)
            await start.wait()
            # A slow server may take longer to warm every connection up than its keep-alive
            # timeout, closing the connections that finished first: start on fresh ones.
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                writer.write(request)
                status, body = await _read_response(reader)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
                    if not first_error:
                        first_error.append(f"{status}: {body[:300]!r}")
        finally:
            writer.close()

    start = asyncio.Event()
    ready: list[int] = []
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    while len(ready) < concurrency:  # connections open and warm-up requests done
        if any(t.done() for t in tasks):
            await asyncio.gather(*tasks)  # raises the worker's error
        await asyncio.sleep(0.01)
    t_start = time.perf_counter()
    deadline = t_start + max_seconds
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    return LoadResult(
        concurrency,
        len(latencies),
        errors,
        elapsed,
        np.asarray(latencies),
        first_error[0] if first_error else None,
    )
