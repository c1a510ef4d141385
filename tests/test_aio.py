"""shim/aio.py: waits and stops that a cancel cannot slip past (Python 3.11's wait_for drops a
cancel landing in the same turn as the result it waited for: cpython#86296)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from structlog.testing import capture_logs

from shim.aio import cancel_and_wait, wait_event


async def _poll_forever(event: asyncio.Event, wait) -> None:
    while True:  # the shape of the routing refresh and the recorder's writer: stopped by a cancel
        await wait(event)
        event.clear()
        await asyncio.sleep(0)


async def _set_and_cancel_in_one_turn(wait) -> bool:
    """Whether a loop waiting with `wait` ends when its event is set in the turn it is cancelled."""
    event = asyncio.Event()
    task = asyncio.create_task(_poll_forever(event, wait))
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    task.cancel()  # (the swallowing case: end it for good)
    await asyncio.wait({task})
    return task in done


async def test_a_cancel_landing_with_the_event_ends_the_loop():
    assert await _set_and_cancel_in_one_turn(lambda event: wait_event(event, 2))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12 rebuilt wait_for on asyncio.timeout")
async def test_the_same_loop_on_wait_for_runs_on_after_the_cancel():
    """The hazard the helper exists for (if this passes on 3.11 the helper could go)."""
    assert not await _set_and_cancel_in_one_turn(lambda event: asyncio.wait_for(event.wait(), 2))


async def test_wait_event_tells_set_from_timed_out():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True
    assert await wait_event(event, 0) is True  # already set: no wait at all


async def test_cancel_and_wait_stops_a_task_that_swallowed_the_first_cancel():
    swallowed = []

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # what a library's wait_for does on 3.11, once

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await asyncio.wait_for(cancel_and_wait(task, recancel_after=0.05), 2)
    assert swallowed and task.cancelled()
    assert [e["event"] for e in logs] == ["task_cancelled_again"]


async def test_cancel_and_wait_retrieves_outcomes_and_skips_none():
    async def fails():
        raise ValueError("boom")

    failed = asyncio.create_task(fails())
    sleeper = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await cancel_and_wait(None, failed, sleeper, failed)  # no ValueError raised here
    assert sleeper.cancelled() and isinstance(failed.exception(), ValueError)
    assert [(e["event"], e["error"]) for e in logs] == [("task_failed", "ValueError: boom")]  # once


async def test_the_callers_own_cancel_is_not_absorbed():
    giving_up = asyncio.Event()

    async def ignores_cancels_until_told():
        while not giving_up.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    stubborn = asyncio.create_task(ignores_cancels_until_told())
    try:
        stopper = asyncio.create_task(cancel_and_wait(stubborn, recancel_after=10))
        await asyncio.sleep(0.01)
        stopper.cancel()
        done, _ = await asyncio.wait({stopper}, timeout=2)  # bounded: a stopper that absorbed it hangs
        assert stopper in done and stopper.cancelled()
        assert not stubborn.done()
    finally:
        giving_up.set()
        stubborn.cancel()
        await asyncio.wait({stubborn})
