"""Waiting and stopping that a cancel cannot slip past, on every Python the shim supports.

On Python 3.11, `asyncio.wait_for` returns the awaited result and drops the caller's cancel when
both land in the same turn of the loop (https://github.com/python/cpython/issues/86296; 3.12
rebuilt wait_for on asyncio.timeout). A loop that waits for an event between polls and is stopped
by a cancel then runs for ever, and whoever awaits it hangs: a NOTIFY arriving with shutdown did
that to the routing refresh. `wait_event` is the loop-safe wait; `cancel_and_wait` stops a task
even if something inside it (a library's own wait_for) swallowed one cancel.
"""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("shim.aio")

RECANCEL_AFTER_S = 1.0


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True once `event` is set, False when `timeout` seconds pass first. A cancel of the caller
    always propagates (asyncio.timeout tells its own expiry from a cancel from outside)."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Task | None, recancel_after: float = RECANCEL_AFTER_S) -> None:
    """Cancel the tasks and return once every one has ended, cancelling again any still running
    after `recancel_after` seconds (one that swallowed a cancel is caught at its next await). A
    task whose own clean-up after a cancel takes longer than `recancel_after` is interrupted in
    it: give such tasks a longer `recancel_after`. A task's exception is logged, not raised; a
    cancel of the caller propagates at once (asyncio.wait neither raises a task's CancelledError
    nor absorbs the caller's)."""
    pending = {task for task in tasks if task is not None and not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _done, pending = await asyncio.wait(pending, timeout=recancel_after)
        for task in pending:
            log.warning("task_cancelled_again", task=task.get_name(), after_s=recancel_after)
            task.cancel()
    for task in {task for task in tasks if task is not None}:
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_failed", task=task.get_name(), error=f"{type(exc).__name__}: {exc}"[:300])
