"""Where a call's assistant is resolved (shim.bridge.BridgeState.resolve_setup): a cheap one on
the event loop after its first resolution, an expensive one and assistant-request answers in a
worker thread, and a failure is the same either way."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from shim import twilio_media as tw
from shim.assistant import AssistantNotFound
from shim.bridge import INLINE_RESOLVE_S, BridgeState
from shim.config import Config

REPO = Path(__file__).resolve().parents[1]


def state() -> BridgeState:
    return BridgeState(Config(assistants_dir=REPO / "assistants"), records=None, metrics=None)


def start(assistant: str = "demo") -> tw.Start:
    return tw.Start("MZ1", "CA1", "AC1", {"assistant": assistant, "from": "+15550001111", "to": "+15550002222"})


async def resolved_on(bridge: BridgeState, assistant: str = "demo") -> str:
    """Which thread resolved the assistant: "loop" or "worker"."""
    loop_thread = threading.get_ident()
    seen = []
    real = bridge._resolve_setup

    def spy(s, requested=None):
        seen.append("loop" if threading.get_ident() == loop_thread else "worker")
        return real(s, requested)

    bridge._resolve_setup = spy  # type: ignore[method-assign]
    try:
        setup = await bridge.resolve_setup(start(assistant))
        assert setup.session["type"] == "realtime"
    finally:
        bridge._resolve_setup = real  # type: ignore[method-assign]
    return seen[0]


async def test_a_cheap_assistant_is_resolved_on_the_loop_after_its_first_resolution() -> None:
    bridge = state()
    assert await resolved_on(bridge) == "worker"  # unknown cost: the thread, measured
    # (a process's first translation also compiles its templates: it may take over 1 ms)
    places = [await resolved_on(bridge) for _ in range(3)]
    assert 0 < bridge.resolve_cost["demo"] < INLINE_RESOLVE_S
    assert places[-2:] == ["loop", "loop"]


async def test_an_expensive_assistant_stays_in_the_worker_thread() -> None:
    bridge = state()
    bridge.resolve_cost["demo"] = INLINE_RESOLVE_S  # e.g. a big template took 1 ms last time
    assert await resolved_on(bridge) == "worker"


async def test_an_inline_resolution_that_held_the_loop_too_long_sends_the_next_one_back() -> None:
    bridge = state()
    bridge.resolve_cost["demo"] = 0.0
    real = bridge._resolve_setup

    def slow_disk(s, requested=None):
        import time

        time.sleep(INLINE_RESOLVE_S * 3)  # waiting on I/O: no CPU time, but the loop was held
        return real(s, requested)

    bridge._resolve_setup = slow_disk  # type: ignore[method-assign]
    await bridge.resolve_setup(start())
    bridge._resolve_setup = real  # type: ignore[method-assign]
    assert bridge.resolve_cost["demo"] >= INLINE_RESOLVE_S * 3
    assert await resolved_on(bridge) == "worker"


async def test_a_missing_assistant_fails_the_same_on_the_loop_as_in_the_thread() -> None:
    bridge = state()
    errors = []
    for _ in range(2):
        with pytest.raises(AssistantNotFound) as caught:
            await bridge.resolve_setup(start("nope"))
        errors.append(str(caught.value))
    assert "nope" in bridge.resolve_cost and errors[0] == errors[1]


async def test_assistant_request_answers_are_resolved_in_the_worker_thread() -> None:
    bridge = state()
    loop_thread = threading.get_ident()
    threads = []

    async def answer(call_sid):
        return {"assistantId": "demo"}

    bridge.request_lookup = answer
    real = bridge._resolve_setup
    bridge._resolve_setup = lambda s, requested=None: threads.append(threading.get_ident()) or real(s, requested)
    bridge.resolve_cost["@request"] = 0.0
    await bridge.resolve_setup(start("@request"))
    assert threads and threads[0] != loop_thread
    await asyncio.sleep(0)
