"""One write per HTTP response: uvicorn's protocol with a transport that joins its writes.

uvicorn writes a response's header block and its body in two ``transport.write`` calls, and on
an idle socket each goes straight to the kernel: two syscalls, and on loopback two segments
for the client to wake up for. Under load the header write was about 5 % of a worker's time
in py-spy, more than the body's. ``CoalescingTransport`` holds a small write until the next
write or the end of the loop turn (``call_soon``), whichever comes first, and sends what it
holds with that next write in one call. A response whose body follows its header in the same
turn (every non-streaming response) leaves in one write; a lone write (a streaming response's
header whose first chunk is not ready yet, ``100 Continue``) leaves at the end of the turn, so
nothing waits on a timer.

Everything else is passed through: ``close`` and ``write_eof`` send what is held first,
``abort`` drops it (as abort drops the transport's own buffer), and the write-buffer size
counts it. Writes keep their order, so pipelined responses do too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

# Hold writes up to this size (a header block is a few hundred bytes); larger ones go at once.
HOLD_MAX = 16 * 1024
# Join the held bytes with a following write up to this size; beyond it copying would cost
# more than the extra syscall saves (a 6 MB batch response), so the two go separately.
JOIN_MAX = 256 * 1024


class CoalescingTransport(asyncio.Transport):
    """Wraps ``transport``; see the module docstring."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_scheduled = False

    # Writing.
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        held = self._held
        if held is None:
            if len(data) <= HOLD_MAX:
                self._held = bytes(data)  # a copy, as the transport's buffer makes one
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._end_of_turn)
            else:
                self._transport.write(data)
            return
        self._held = None
        if len(held) + len(data) <= JOIN_MAX:
            self._transport.write(b"".join((held, data)))
        else:
            self._transport.write(held)
            self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def flush(self) -> None:
        """Send what is held now."""
        held = self._held
        if held is not None:
            self._held = None
            # A transport closed under us (the peer went away) could not deliver it anyway.
            if not self._transport.is_closing():
                self._transport.write(held)

    def _end_of_turn(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # Closing.
    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # Reading and the rest.
    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def __getattr__(self, name: str) -> Any:
        # Anything a particular loop's transport adds (uvloop has a few more methods).
        if name == "_transport":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._transport, name)


class CoalescingHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol (httptools when installed, else h11) on a
    ``CoalescingTransport``. ``icu-forecast serve`` passes it to uvicorn as ``http=``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        super().connection_made(CoalescingTransport(transport, loop))  # type: ignore[arg-type]
