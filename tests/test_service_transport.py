"""One write per response: ``service.transport`` under uvicorn's real HTTP protocol, on a real
socket, for plain, pipelined, streamed and closing responses (asyncio and uvloop loops)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from uvicorn import Config
from uvicorn.server import ServerState

from service.command import HTTP_PROTOCOL, _uvicorn_options
from service.settings import ServiceSettings
from service.transport import HOLD_MAX, CoalescingHTTPProtocol, CoalescingTransport


class Recorder(asyncio.Transport):
    """The transport under the coalescing one: records what reaches the socket, write by write."""

    def __init__(self, real: asyncio.Transport, writes: list[bytes]) -> None:
        super().__init__()
        self.real = real
        self.writes = writes

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.real.write(data)

    def __getattribute__(self, name: str) -> Any:
        if name in ("write", "real", "writes", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "real"), name)


async def app(scope: dict, receive: Any, send: Any) -> None:
    """Echoes the path; ``/stream`` answers in chunks with a pause between them."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"].encode()
    if path == b"/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.3)  # the header must not wait for the body this long
        await send({"type": "http.response.body", "body": b"part1", "more_body": True})
        await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"part2", "more_body": False})
        return
    body = b"you asked for " + path
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _loops() -> list[Any]:
    loops: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    with contextlib.suppress(ImportError):
        import uvloop

        loops.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return loops


async def _serve(writes: list[bytes]) -> tuple[asyncio.Server, int]:
    config = Config(app, http=HTTP_PROTOCOL, lifespan="off", log_level="warning")
    config.load()
    assert config.http_protocol_class is CoalescingHTTPProtocol
    state = ServerState()
    loop = asyncio.get_running_loop()

    class Recording(CoalescingHTTPProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(Recorder(transport, writes))

    server = await loop.create_server(
        lambda: Recording(config=config, server_state=state, app_state={}), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


def _request(path: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


@pytest.mark.parametrize("new_loop", _loops())
def test_each_response_is_one_write_and_pipelined_ones_keep_their_order(new_loop):
    async def scenario() -> None:
        writes: list[bytes] = []
        server, port = await _serve(writes)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Keep-alive: one request after another on the connection.
            for path in ("/a", "/b"):
                writer.write(_request(path))
                head, body = await _read_response(reader)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert body == b"you asked for " + path.encode()
            # Pipelined: three requests in one segment, answered in order.
            writer.write(b"".join(_request(p) for p in ("/1", "/2", "/3")))
            bodies = [(await _read_response(reader))[1] for _ in range(3)]
            assert bodies == [b"you asked for /1", b"you asked for /2", b"you asked for /3"]
            writer.close()
        # Header block and body left together, once per response.
        assert len(writes) == 5
        for w, path in zip(writes, ("/a", "/b", "/1", "/2", "/3"), strict=True):
            assert w.startswith(b"HTTP/1.1 200 OK\r\n")
            assert w.endswith(b"\r\n\r\nyou asked for " + path.encode())

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("new_loop", _loops())
def test_streamed_response_header_leaves_at_the_end_of_the_turn(new_loop):
    async def scenario() -> None:
        writes: list[bytes] = []
        server, port = await _serve(writes)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = asyncio.get_running_loop().time()
            writer.write(_request("/stream"))
            head = await reader.readuntil(b"\r\n\r\n")
            header_delay = asyncio.get_running_loop().time() - t0
            assert b"transfer-encoding: chunked" in head
            rest = b""
            while not rest.endswith(b"0\r\n\r\n"):
                rest += await reader.read(1024)
            assert rest == b"5\r\npart1\r\n5\r\npart2\r\n0\r\n\r\n"
            writer.close()
        # Not held back until the first chunk (0.3 s later): it went alone, right away.
        assert header_delay < 0.2
        assert writes[0].endswith(b"\r\n\r\n")
        assert b"".join(writes[1:]) == rest

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("new_loop", _loops())
def test_connection_close_sends_the_response_first(new_loop):
    async def scenario() -> None:
        writes: list[bytes] = []
        server, port = await _serve(writes)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request("/bye", close=True))
            data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
            writer.close()
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close" in data.lower()
        assert data.endswith(b"you asked for /bye")
        assert len(writes) == 1

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario())


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 1)})
        self.calls: list[Any] = []
        self.closing = False
        self.buffered = 7

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")


def test_transport_holds_small_writes_and_passes_everything_else_on():
    async def scenario() -> None:
        fake = FakeTransport()
        t = CoalescingTransport(fake, asyncio.get_running_loop())
        t.write(b"head")
        assert fake.calls == [] and t.get_write_buffer_size() == 7 + 4
        t.write(bytearray(b"body"))
        assert fake.calls == [("write", b"headbody")]
        # A lone write leaves at the end of the loop turn.
        t.write(b"alone")
        await asyncio.sleep(0)
        assert fake.calls[-1] == ("write", b"alone")
        # A large write is not held, and what is held goes first.
        big = b"x" * (HOLD_MAX + 1)
        t.write(big)
        assert fake.calls[-1] == ("write", big)
        t.write(b"h")
        t.write(b"y" * (300 * 1024))
        assert fake.calls[-2:] == [("write", b"h"), ("write", b"y" * (300 * 1024))]
        # close and write_eof send what is held first; the rest is forwarded.
        t.write(b"last")
        t.write_eof()
        assert fake.calls[-2:] == [("write", b"last"), "write_eof"]
        t.pause_reading()
        t.resume_reading()
        assert fake.calls[-2:] == ["pause_reading", "resume_reading"]
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        t.write(b"bye")
        t.close()
        assert fake.calls[-2:] == [("write", b"bye"), "close"]
        assert t.is_closing()
        n = len(fake.calls)
        await asyncio.sleep(0)
        assert len(fake.calls) == n  # nothing left to send

        # abort drops what is held, as it drops the transport's own buffer; and nothing is
        # written into a transport closed under us.
        fake2 = FakeTransport()
        t2 = CoalescingTransport(fake2, asyncio.get_running_loop())
        t2.write(b"held")
        t2.abort()
        await asyncio.sleep(0)
        assert fake2.calls == ["abort"]
        fake3 = FakeTransport()
        t3 = CoalescingTransport(fake3, asyncio.get_running_loop())
        t3.write(b"held")
        fake3.closing = True
        await asyncio.sleep(0)
        assert fake3.calls == []

    asyncio.run(scenario())


def test_serve_uses_the_coalescing_protocol():
    assert _uvicorn_options(ServiceSettings())["http"] == HTTP_PROTOCOL
    config = Config(app, http=HTTP_PROTOCOL)
    config.load()
    assert config.http_protocol_class is CoalescingHTTPProtocol
