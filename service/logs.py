"""``icu-forecast serve`` writes its log through the stdlib's QueueHandler / QueueListener.

The request path only puts a record on a queue; a listener thread formats and writes it with
the handlers the root logger had (same formatter, level and filters), so a slow log reader never
stalls the event loop. The app's shutdown stops the listener, which writes every queued line
before it returns: uvicorn ends a process stopped by SIGTERM / SIGINT by raising that signal
again, which skips ``logging.shutdown``, so this is where no line may be left behind. A process
killed with SIGKILL can lose the lines still queued (normally none: the thread writes at once).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener


def queue_log_writes() -> Callable[[], None]:
    """Route the root logger's handlers through a queue and a listener thread.

    Returns a function that writes what is queued, stops the thread and puts the handlers back.
    """
    logger = logging.getLogger()
    handlers = list(logger.handlers)
    if not handlers:
        return lambda: None
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, *handlers, respect_handler_level=True)
    queued = QueueHandler(records)
    for h in handlers:
        logger.removeHandler(h)
    logger.addHandler(queued)
    listener.start()

    def stop() -> None:
        if queued not in logger.handlers:
            return  # stopped already
        for h in handlers:  # new records go straight to the handlers again...
            logger.addHandler(h)
        logger.removeHandler(queued)
        listener.stop()  # ...and the queued ones are all written before this returns

    return stop
