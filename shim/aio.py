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
    after `recancel_after` seconds (one that swallowed a cancel is caught at its next await). The
    tasks' own outcomes are retrieved, not raised; a cancel of the caller propagates at once
    (asyncio.wait neither raises a task's CancelledError nor absorbs the caller's)."""
    pending = {task for task in tasks if task is not None and not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=recancel_after)
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
