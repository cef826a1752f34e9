"""Running the service as several worker processes behind one port (``serve --workers N``).

One Python process serves on one core: its event loop, parsing and model calls share one GIL.
With ``--workers N`` uvicorn's supervisor starts N workers; the supervisor accepts on the port
and hands each connection to the next worker in turn (``service.dispatch``).
Three things span the workers, all through a run folder that ``serve`` creates and passes down
in the environment:

* **connections**: the dispatcher's control socket, ``RUN_DIR/dispatch.sock``;

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
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from uvicorn import Config, Server
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess
from uvicorn.supervisors.multiprocess import Process

from service.dispatch import CONTROL_SOCKET, DispatchedConnections, Dispatcher, serve_on_loop
from service.logs import batch_log_writes

log = logging.getLogger("icu_forecast.service")

RUN_DIR_ENV = "ICU_FORECAST_RUN_DIR"
SETTINGS_ENV = "ICU_FORECAST_WORKER_SETTINGS"
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOG_LEVEL_ENV = "ICU_FORECAST_WORKER_LOG_LEVEL"
# The format ``icu-forecast`` (pipeline/cli.py) gives the root logger.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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
    names = (RUN_DIR_ENV, SETTINGS_ENV, PROMETHEUS_ENV, LOG_LEVEL_ENV)
    saved = {k: os.environ.get(k) for k in names}
    os.environ[RUN_DIR_ENV] = str(folder)
    os.environ[SETTINGS_ENV] = json.dumps(settings_payload)
    os.environ[PROMETHEUS_ENV] = str(prom)
    os.environ[LOG_LEVEL_ENV] = str(logging.getLogger().getEffectiveLevel())
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


def configure_worker_logging(flush_s: float) -> None:
    """Log as the supervisor does (level and format of ``icu-forecast``'s root logger).

    A worker is a fresh interpreter (uvicorn spawns it) in which uvicorn sets up only its own
    loggers: without this the access log and the service's own messages would be dropped.
    """
    level = int(os.environ.get(LOG_LEVEL_ENV, logging.INFO))
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # Lines written in batches, at most ``flush_s`` late (service.logs).
    batch_log_writes(flush_s)


def mark_worker_gone() -> None:
    """Drop this worker's live gauges from the shared metrics (its counters stay counted)."""
    if os.environ.get(PROMETHEUS_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


class DispatchedServer(Server):
    """uvicorn's server for one worker, serving the connections the supervisor hands it.

    It listens on no socket of its own (``sockets=[]``): once its startup is done it registers
    with the supervisor's dispatcher (``service.dispatch``) and runs each connection it receives
    with uvicorn's own HTTP protocol, as it would run one it had accepted.
    """

    _connections: DispatchedConnections | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        folder = run_dir()
        if folder is None or self.should_exit:
            return
        config = self.config
        # What uvicorn's ``startup`` builds for ``loop.create_server``.
        protocol = functools.partial(
            config.http_protocol_class,
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        connections = DispatchedConnections(folder / CONTROL_SOCKET)
        loop = asyncio.get_running_loop()
        connections.start(loop, serve_on_loop(loop, protocol, config.ssl))
        self._connections = connections

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Unregister first, so no new connection arrives while the open ones drain.
        if self._connections is not None:
            self._connections.stop()
        await super().shutdown(sockets=sockets)


class WorkerProcess(Process):
    """uvicorn's worker process, running a ``DispatchedServer``."""

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = DispatchedServer(config=self.config)
        return self._server


@contextlib.contextmanager
def _workers_are(cls: type[Process]) -> Iterator[None]:
    """uvicorn's supervisor starts workers as ``multiprocess.Process`` in several places (at
    start, in place of a dead worker, on SIGTTIN); have it start ``cls`` while it runs."""
    original = uvicorn_multiprocess.Process
    uvicorn_multiprocess.Process = cls  # type: ignore[misc]
    try:
        yield
    finally:
        uvicorn_multiprocess.Process = original  # type: ignore[misc]


def serve_workers(config: Config, folder: Path) -> None:
    """uvicorn's multi-process supervisor, with connections handed out by a ``Dispatcher``
    and SIGHUP turned into a broadcast reload.

    uvicorn's own SIGHUP handling restarts the workers one by one; a replacement that cannot
    load the model would still come up (not ready) and retire a worker that was serving. A
    broadcast reload keeps every worker's current model when the new one fails to load.
    """
    listener = config.bind_socket()
    dispatcher = Dispatcher(listener, folder / CONTROL_SOCKET, config.backlog)

    class _Supervisor(uvicorn_multiprocess.Multiprocess):
        def handle_hup(self) -> None:
            generation = bump_generation(folder)
            log.info("SIGHUP: asked all workers to reload (generation %d)", generation)

        def terminate_all(self) -> None:
            dispatcher.stop()  # hand nothing more to workers on their way out
            super().terminate_all()

    try:
        dispatcher.start()
        with _workers_are(WorkerProcess):
            _Supervisor(config, sockets=[]).run()
    finally:
        dispatcher.stop()
        listener.close()
