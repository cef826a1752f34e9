"""Spreading connections evenly over the workers of ``serve --workers N``.

The supervisor accepts every connection on the port and hands it (the open file descriptor,
``SCM_RIGHTS`` over a Unix socket) to the next worker in turn. Node.js's cluster module
balances its workers the same way by default, for the same reason: left to the kernel, the
split is uneven. With ``SO_REUSEPORT`` sockets the kernel picks a worker by a hash of the
client's address and port, so 32 connections land e.g. 20 / 12 (a binomial draw); with one
shared socket an idle worker tends to take a whole burst. A worker serving more connections is
slower for every one of them, and under load it sets the tail latency of the whole service.

Round-robin rather than least-connections: a worker learns that a client has gone only when
its event loop gets to it, and a busy one late. When many clients reconnect at once (a
client pool restarting), counts that lag send most new connections to whichever worker
happened to report its closes first (measured: 22 / 10 of 32); taking turns needs no feedback
and splits any burst evenly.

The cost is one ``accept`` and one ``sendmsg`` in the supervisor per connection, not per
request (connections are kept alive), and the supervisor is otherwise idle.

Each worker connects to the Unix socket ``RUN_DIR/dispatch.sock`` once it has started (its app's
startup, model load included, is done) and then receives one byte per connection, the byte
carrying the descriptor (a stream socket, which every Unix has; reading one byte at a time
returns each descriptor with its own byte). Until some worker has registered, connections wait
in the kernel's queue, as on a listening socket nobody accepts from yet. A worker that exits
closes its end and the dispatcher drops it from the rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("icu_forecast.service")

CONTROL_SOCKET = "dispatch.sock"


class Dispatcher:
    """Accepts on ``listener`` and hands each connection to the next worker in turn (a thread).

    Workers register by connecting to ``control_path``; ``handed_out()`` counts per worker.
    """

    def __init__(self, listener: socket.socket, control_path: Path, backlog: int = 2048) -> None:
        self.listener = listener
        self.listener.setblocking(False)
        self.control_path = control_path
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(str(control_path))
        self.control.listen(64)
        self.control.setblocking(False)
        self.backlog = backlog
        # Registered workers in rotation order, and connections handed to each.
        self.workers: list[socket.socket] = []
        self._handed: dict[socket.socket, int] = {}
        self._turn = 0
        self._lock = threading.Lock()  # for ``handed_out()`` from other threads
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._listening = False
        self._stopped = False

    def start(self) -> None:
        self.listener.listen(self.backlog)
        self._selector.register(self.control, selectors.EVENT_READ, self._register)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread.start()

    def stop(self) -> None:
        """Stop handing out connections (new ones wait in the kernel until the port closes)."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()
        for s in (*self.workers, self.control, self._wake_r, self._wake_w):
            s.close()
        self.workers.clear()
        self._selector.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()

    def handed_out(self) -> list[int]:
        """Connections handed to each registered worker so far, in rotation order."""
        with self._lock:
            return [self._handed[w] for w in self.workers]

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    return  # stop()
                key.data(key.fileobj)

    def _watch_listener(self) -> None:
        # Accept only while some worker can take the connection; until then it waits in the
        # kernel's queue (the listener would otherwise be readable, and polled, in a loop).
        want = bool(self.workers)
        if want and not self._listening:
            self._selector.register(self.listener, selectors.EVENT_READ, self._accept)
        elif not want and self._listening:
            self._selector.unregister(self.listener)
        self._listening = want

    def _register(self, control: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            channel, _ = control.accept()
            channel.setblocking(False)
            with self._lock:
                self.workers.append(channel)
                self._handed[channel] = 0
            # Readable only when the worker exits (it sends nothing).
            self._selector.register(channel, selectors.EVENT_READ, self._drop)
            self._watch_listener()

    def _drop(self, channel: socket.socket) -> None:
        if channel not in self._handed:
            return  # already dropped (a failed send, then its end-of-file in the same wake-up)
        with self._lock:
            self.workers.remove(channel)
            del self._handed[channel]
        self._selector.unregister(channel)
        channel.close()
        self._watch_listener()

    def _accept(self, listener: socket.socket) -> None:
        # Drain the queue: a burst of connections is handed out in one wake-up.
        while self.workers:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors
                log.warning("dispatcher: accept failed: %s", exc)
                return
            with conn:  # the worker has its own descriptor once it is sent
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        for _ in range(len(self.workers)):
            self._turn = (self._turn + 1) % len(self.workers)
            worker = self.workers[self._turn]
            try:
                socket.send_fds(worker, [b"\0"], [conn.fileno()])
            except BlockingIOError:
                continue  # its queue is full (a stuck worker): the next one
            except OSError:
                self._drop(worker)  # it exited
                if not self.workers:
                    break
                self._turn -= 1  # the next worker moved into this place
                continue
            with self._lock:
                self._handed[worker] += 1
            return
        log.warning("dispatcher: no worker could take a connection; closed it")


class DispatchedConnections:
    """A worker's end: registers with the dispatcher and serves what it hands over.

    ``start(loop, serve)`` registers; ``serve(sock)`` is then called on ``loop`` with each
    connection received. ``stop()`` unregisters.
    """

    def __init__(self, control_path: Path) -> None:
        self.control_path = control_path
        self.channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.serve: Callable[[socket.socket], None] = socket.socket.close

    def start(
        self, loop: asyncio.AbstractEventLoop, serve: Callable[[socket.socket], None]
    ) -> None:
        self.serve = serve
        self.channel.connect(str(self.control_path))
        self.channel.setblocking(False)
        self._loop = loop
        loop.add_reader(self.channel.fileno(), self._receive)

    def stop(self) -> None:
        """Unregister: the dispatcher sees the channel close and leaves this worker out."""
        if self._loop is not None:
            self._loop.remove_reader(self.channel.fileno())
            self._loop = None
        self.channel.close()

    def _receive(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 1, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message and not fds:  # the supervisor is gone
                self.stop()
                return
            for fd in fds:
                self.serve(socket.socket(fileno=fd))


def serve_on_loop(
    loop: asyncio.AbstractEventLoop, protocol_factory: Callable[[], asyncio.Protocol], ssl: Any
) -> Callable[[socket.socket], None]:
    """A ``serve(sock)`` for ``DispatchedConnections``: run the connection on ``loop`` with a
    protocol from ``protocol_factory``, as ``loop.create_server`` does for one it accepted."""

    def serve(sock: socket.socket) -> None:
        task = loop.create_task(loop.connect_accepted_socket(protocol_factory, sock, ssl=ssl))
        task.add_done_callback(lambda t: _close_if_failed(t, sock))

    return serve


def _close_if_failed(task: asyncio.Task, sock: socket.socket) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a dispatched connection could not start: %s", type(task.exception()).__name__)
        sock.close()
