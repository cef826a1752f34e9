"""What spans the workers of `serve --workers N`: the reload generation and its watcher, and
the dispatcher that hands each connection to the least busy worker."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from service.dispatch import CONTROL_SOCKET, Dispatcher
from service.workers import bump_generation, read_generation, watch_generation


def test_generation_starts_at_zero_and_bumps_never_merge(tmp_path):
    assert read_generation(tmp_path) == 0
    threads = [threading.Thread(target=bump_generation, args=(tmp_path,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_generation(tmp_path) == 8
    assert bump_generation(tmp_path) == 9


def test_watcher_reloads_once_per_new_generation(tmp_path):
    seen = {"g": read_generation(tmp_path)}
    calls: list[int] = []

    async def reload(g: int) -> None:
        seen["g"] = g
        calls.append(g)

    async def scenario() -> None:
        task = asyncio.create_task(watch_generation(tmp_path, lambda: seen["g"], reload, 0.01))
        await asyncio.sleep(0.05)
        assert calls == []  # nothing asked yet
        bump_generation(tmp_path)
        await asyncio.sleep(0.05)
        # A generation this worker produced itself (endpoint reload) is not reloaded again.
        seen["g"] = bump_generation(tmp_path)
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    assert calls == [1]


def _fake_workers(dispatcher: Dispatcher, n: int) -> list[socket.socket]:
    """``n`` workers registered with ``dispatcher``, as the channels a worker would hold."""
    before = len(dispatcher.handed_out())
    channels = []
    for _ in range(n):
        ch = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ch.connect(str(dispatcher.control_path))
        channels.append(ch)
    _until(lambda: len(dispatcher.handed_out()) == before + n)
    return channels


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _received(channel: socket.socket) -> list[socket.socket]:
    """The connections handed to a fake worker since the last call."""
    channel.setblocking(False)
    out = []
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 1, 1)
        except BlockingIOError:
            return out
        out.extend(socket.socket(fileno=fd) for fd in fds)


@pytest.fixture
def dispatcher(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    d = Dispatcher(listener, tmp_path / CONTROL_SOCKET)
    d.start()
    yield d
    d.stop()
    listener.close()


def _connect(d: Dispatcher, n: int) -> list[socket.socket]:
    port = d.listener.getsockname()[1]
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_dispatcher_splits_every_burst_evenly(dispatcher):
    """32 connections over 2 workers are 16 / 16 (the kernel's hash gives e.g. 20 / 12), and so
    are the next 32 when all clients reconnect at once, whoever has noticed the closes."""
    a, b = _fake_workers(dispatcher, 2)
    clients = _connect(dispatcher, 32)
    _until(lambda: sum(dispatcher.handed_out()) == 32)
    assert dispatcher.handed_out() == [16, 16]
    got_a, got_b = _received(a), _received(b)
    assert (len(got_a), len(got_b)) == (16, 16)
    # What a worker gets is the client's connection itself.
    clients[5].sendall(b"ping")
    got = got_a + got_b
    for conn in got:
        conn.settimeout(0.5)
    assert [c for c in got if _peer_port(c) == clients[5].getsockname()[1]][0].recv(4) == b"ping"

    for s in clients + got_a[:10]:  # worker a notices 10 closes at once, b none yet
        s.close()
    again = _connect(dispatcher, 32)
    _until(lambda: sum(dispatcher.handed_out()) == 64)
    assert dispatcher.handed_out() == [32, 32]
    assert (len(_received(a)), len(_received(b))) == (16, 16)
    for s in [*again, *got_a[10:], *got_b, a, b]:
        s.close()


def _peer_port(conn: socket.socket) -> int:
    return conn.getpeername()[1]


def test_dispatcher_drops_an_exited_worker_and_waits_for_one(dispatcher):
    """A worker that exits leaves the rotation; with no worker, connections wait in the
    kernel's queue and are handed out once one registers."""
    a, b = _fake_workers(dispatcher, 2)
    a.close()
    _until(lambda: len(dispatcher.handed_out()) == 1)
    first = _connect(dispatcher, 3)
    _until(lambda: dispatcher.handed_out() == [3])  # all to the worker left
    b.close()
    _until(lambda: dispatcher.handed_out() == [])
    client = _connect(dispatcher, 1)[0]
    time.sleep(0.05)
    assert dispatcher.handed_out() == []  # nobody to take it: it waits
    (c,) = _fake_workers(dispatcher, 1)
    _until(lambda: dispatcher.handed_out() == [1])
    (conn,) = _received(c)
    client.sendall(b"x")
    conn.settimeout(2)
    assert conn.recv(1) == b"x"
    for s in (*first, client, conn, c):
        s.close()
