"""Running the service as several worker processes behind one port (``serve --workers N``).

One Python process serves on one core: its event loop, parsing and model calls share one GIL.
With ``--workers N`` uvicorn's supervisor forks N workers that accept on the same socket. Two
things must then span the workers, and both go through a run folder that ``serve`` creates
and passes down in the environment:

* **reloads**: a reload (endpoint or SIGHUP to the supervisor) reaches one process. It bumps a
  generation counter in ``RUN_DIR/reload-generation``; every worker watches the counter and
  reloads when it grows, each keeping its previous model if loading fails (as with one worker).
* **metrics**: prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), so
  ``/metrics`` from any worker reports the counts of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("icu_forecast.service")

RUN_DIR_ENV = "ICU_FORECAST_RUN_DIR"
SETTINGS_ENV = "ICU_FORECAST_WORKER_SETTINGS"
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_GENERATION = "reload-generation"


def run_dir() -> Path | None:
    """The run folder when this process is one of several workers, else None."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def read_generation(folder: Path) -> int:
    try:
        return int((folder / _GENERATION).read_text() or 0)
    except FileNotFoundError:
        return 0


def bump_generation(folder: Path) -> int:
    """Ask every worker to reload; returns the new generation (locked: bumps never merge)."""
    with open(folder / f"{_GENERATION}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        new = read_generation(folder) + 1
        tmp = folder / f"{_GENERATION}.tmp"
        tmp.write_text(str(new))
        tmp.replace(folder / _GENERATION)  # readers see the old or the new number, never half
        return new


async def watch_generation(
    folder: Path,
    seen: Callable[[], int],
    reload: Callable[[int], Awaitable[Any]],
    interval_s: float,
) -> None:
    """Call ``reload(generation)`` when the counter exceeds ``seen()``; runs until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        generation = read_generation(folder)
        if generation > seen():
            await reload(generation)


@contextlib.contextmanager
def worker_environment(settings_payload: dict[str, Any]) -> Iterator[Path]:
    """The run folder and environment the workers inherit; removed when serving ends.

    The settings travel as JSON so every worker builds exactly the supervisor's settings (CLI
    flags included); the environment is private to the processes ``serve`` starts.
    """
    folder = Path(tempfile.mkdtemp(prefix="icu-forecast-run-"))
    prom = folder / "prometheus"
    prom.mkdir()
    saved = {k: os.environ.get(k) for k in (RUN_DIR_ENV, SETTINGS_ENV, PROMETHEUS_ENV)}
    os.environ[RUN_DIR_ENV] = str(folder)
    os.environ[SETTINGS_ENV] = json.dumps(settings_payload)
    os.environ[PROMETHEUS_ENV] = str(prom)
    try:
        yield folder
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


def worker_settings_payload() -> dict[str, Any] | None:
    raw = os.environ.get(SETTINGS_ENV)
    return json.loads(raw) if raw else None


def mark_worker_gone() -> None:
    """Drop this worker's live gauges from the shared metrics (its counters stay counted)."""
    if os.environ.get(PROMETHEUS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


def _listen_sockets(config: Any) -> list[socket.socket]:
    """One listening socket per worker on the same port, with SO_REUSEPORT where it exists.

    Workers sharing one socket race for each new connection and an idle one tends to accept a
    whole burst, leaving the other without clients; with a socket each, the kernel spreads
    connections over the workers.
    """
    if not hasattr(socket, "SO_REUSEPORT") or config.uds or config.fd is not None:
        return [config.bind_socket()]
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    port = config.port
    out: list[socket.socket] = []
    try:
        for _ in range(config.workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first got
            sock.listen(config.backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


def serve_workers(config: Any, folder: Path) -> None:
    """uvicorn's multi-process supervisor, with a socket per worker and SIGHUP turned into a
    broadcast reload.

    uvicorn's own SIGHUP handling restarts the workers one by one; a replacement that cannot
    load the model would still come up (not ready) and retire a worker that was serving. A
    broadcast reload keeps every worker's current model when the new one fails to load.
    """
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import Process

    socks = _listen_sockets(config)

    class _Supervisor(Multiprocess):
        def init_processes(self) -> None:
            for i in range(self.processes_num):
                # A replacement of a dead worker gets every socket (self.sockets) instead.
                process = Process(self.config, [socks[i % len(socks)]])
                process.start()
                self.processes.append(process)

        def handle_hup(self) -> None:
            generation = bump_generation(folder)
            log.info("SIGHUP: asked all workers to reload (generation %d)", generation)

    try:
        _Supervisor(config, sockets=socks).run()
    finally:
        for sock in socks:
            sock.close()
