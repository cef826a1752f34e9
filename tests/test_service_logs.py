"""Batched log writes (``service.logs``): the same lines as a plain handler, fewer writes, none
lost, errors never late."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from service.logs import BatchedStreamHandler, batch_log_writes, flush_all

FORMAT = "%(levelname)s %(name)s: %(message)s"


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture()
def logger():
    log = logging.getLogger("icu_forecast.test.batched")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)
    log.propagate = True


def _handler(logger: logging.Logger, **kw) -> tuple[BatchedStreamHandler, CountingStream]:
    stream = CountingStream()
    h = BatchedStreamHandler(stream, **kw)
    h.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(h)
    return h, stream


def test_lines_wait_for_the_timer_and_leave_in_one_write(logger):
    h, stream = _handler(logger, interval_s=0.05)

    async def scenario() -> None:
        for i in range(5):
            logger.info("request_id=%d status=200", i)
        assert stream.getvalue() == ""
        await asyncio.sleep(0.1)
        assert stream.writes == 1
        # More lines after a flush start a new timer.
        logger.info("later")
        await asyncio.sleep(0.1)
        assert stream.writes == 2

    asyncio.run(scenario())
    expected = "".join(f"INFO {logger.name}: request_id={i} status=200\n" for i in range(5))
    assert stream.getvalue() == expected + f"INFO {logger.name}: later\n"


def test_warnings_outside_a_loop_and_full_batches_are_written_at_once(logger):
    h, stream = _handler(logger, interval_s=60, max_lines=3)

    async def scenario() -> None:
        logger.info("one")
        logger.warning("two")  # written at once, after the line waiting before it
        assert stream.getvalue().splitlines() == [
            f"INFO {logger.name}: one",
            f"WARNING {logger.name}: two",
        ]
        logger.info("a")
        logger.info("b")
        assert stream.getvalue().count("\n") == 2
        logger.info("c")  # the third waiting line fills the batch
        assert stream.getvalue().count("\n") == 5

    asyncio.run(scenario())
    logger.info("no loop here")
    assert stream.getvalue().endswith("no loop here\n")

    # A line left waiting is written by flush_all (the app's shutdown) or close.
    async def waiting() -> None:
        logger.info("waiting")

    asyncio.run(waiting())
    assert "waiting" not in stream.getvalue()
    flush_all()
    assert stream.getvalue().endswith("waiting\n")


def test_batch_log_writes_swaps_only_plain_stream_handlers_and_restores_them(logger):
    stream = io.StringIO()
    plain = logging.StreamHandler(stream)
    plain.setFormatter(logging.Formatter(FORMAT))
    plain.setLevel(logging.INFO)

    class Capture(logging.StreamHandler):  # like pytest's caplog handler: left alone
        pass

    capture = Capture(io.StringIO())
    others = list(logger.handlers)  # pytest's own capture handlers, if any
    logger.addHandler(plain)
    logger.addHandler(capture)
    assert batch_log_writes(0, logger=logger)() is None and logger.handlers[-1] is capture
    restore = batch_log_writes(logger=logger)
    batched, kept = logger.handlers[len(others) :]
    assert logger.handlers[: len(others)] == others
    assert type(batched) is BatchedStreamHandler and kept is capture
    assert batched.stream is stream and batched.formatter is plain.formatter
    assert batched.level == logging.INFO

    async def scenario() -> None:
        logger.debug("below the level")
        logger.info("kept for later")

    asyncio.run(scenario())
    assert stream.getvalue() == ""
    restore()  # writes what waits, then puts the original back
    assert stream.getvalue() == f"INFO {logger.name}: kept for later\n"
    assert logger.handlers == [*others, plain, capture]
