"""Pre-warmed model sessions: the registry policy and the hand-over (sans-I/O), then through the
real server (signed /twilio/voice, then the stream) against the Realtime stand-in."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from shim.call import Phase
from shim.openai_realtime import OpenAIRealtime, counter_ids
from shim.prewarm import Registry, WarmSession
from shim.testing.fake_realtime import Script
from shim.testing.twilio_caller import TwilioCaller, keep_line_open

from .harness import AUTH_TOKEN, parse_stream, running_shim
from .test_call import Clock, ev, make_call, start_frame, twilio

PCMU_BOTH = {"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}


# --- the registry ---------------------------------------------------------------------------


def test_registry_hands_a_session_out_once_and_not_after_its_ttl():
    clock = Clock()
    reg: Registry[str] = Registry(ttl_s=10, cap=5, clock=clock)
    assert reg.add("CA1", "one") == [] and reg.add("CA2", "two") == []
    assert reg.take("CA1") == "one" and reg.take("CA1") is None  # adopted once
    clock.t += 9.9
    assert reg.expired() == [] and reg.next_expiry() == pytest.approx(clock.t + 0.1)
    assert "CA2" in reg
    clock.t += 0.1
    assert "CA2" not in reg  # a call does not wait for its set-up to adopt an expired session
    assert reg.take("CA2") is None  # past its TTL: never adopted...
    assert reg.expired() == ["two"] and len(reg) == 0 and reg.next_expiry() is None  # ...but closed


def test_registry_cap_drops_the_oldest_and_a_repeated_webhook_replaces():
    clock = Clock()
    reg: Registry[str] = Registry(ttl_s=10, cap=2, clock=clock)
    reg.add("CA1", "a")
    clock.t += 1
    reg.add("CA2", "b")
    assert reg.add("CA3", "c") == ["a"]  # over the cap: the oldest goes
    assert reg.add("CA2", "b2") == ["b"]  # the same CallSid again: the earlier session goes
    assert "CA1" not in reg and reg.take("CA2") == "b2"
    clock.t += 10
    assert reg.expired() == ["c"]


def test_registry_discards_only_the_session_it_holds():
    reg: Registry[str] = Registry(clock=Clock())
    reg.add("CA1", "new")
    assert not reg.discard("CA1", "old") and reg.discard("CA1", "new") and not reg.discard("CA1", "new")
    with pytest.raises(ValueError, match="cap=0"):
        Registry(cap=0)


# --- the hand-over: the call ends as a fresh connect leaves it ---------------------------------

HANDSHAKE = [ev("session.created", session={}), ev("session.updated", session=PCMU_BOTH)]


def configuring_call():
    call, rows, clock = make_call()
    twilio(call, start_frame())
    assert call.phase is Phase.CONFIGURING
    return call


def test_hand_over_replays_the_handshake_and_skips_what_was_sent_already():
    fresh, adopting = configuring_call(), configuring_call()
    fresh_sent = []
    for frame in HANDSHAKE:  # a fresh connect: every frame fed, every answer sent
        fresh.on_model_text(frame)
        fresh_sent += fresh.take_model_out()

    warm = WarmSession(OpenAIRealtime(counter_ids("warm_")), adopting.setup.session)
    wire = warm.take_out()
    for frame in HANDSHAKE:
        warm.on_model_text(frame)
        wire += warm.take_out()
    assert warm.ready and [orjson.loads(f)["type"] for f in wire] == ["session.update"]
    assert orjson.loads(wire[0])["session"] == orjson.loads(fresh_sent[0])["session"]

    assert warm.adoptable(adopting) is None
    send, diverged = warm.hand_over(adopting)
    assert not diverged
    assert send == fresh_sent[1:]  # the greeting, without a second session.update
    assert [orjson.loads(f)["type"] for f in send][-1] == "response.create"
    # the same state as the fresh call: live, the backend's session and id counter alike
    assert adopting.phase is fresh.phase is Phase.LIVE
    assert adopting.model_events == fresh.model_events == 2
    assert adopting.backend._created and adopting.backend._session == fresh.backend._session
    adopting.backend.add_message("user", "x")
    fresh.backend.add_message("user", "x")
    assert adopting.take_model_out() == fresh.take_model_out()


def test_a_session_not_matching_the_call_or_overflowing_is_not_adoptable():
    call = configuring_call()
    other = dict(call.setup.session, instructions="rendered a minute earlier")
    assert "differs" in WarmSession(OpenAIRealtime(), other).adoptable(call)
    full = WarmSession(OpenAIRealtime(), call.setup.session, max_frames=2)
    for frame in [*HANDSHAKE, ev("rate_limits.updated", rate_limits=[])]:
        full.on_model_text(frame)
    assert full.frames == HANDSHAKE and "more than 2 frames" in full.adoptable(call)


def test_a_diverging_answer_is_sent_rather_than_skipped():
    call = configuring_call()
    warm = WarmSession(OpenAIRealtime(), call.setup.session)
    warm.on_model_text(HANDSHAKE[0])
    warm._sent_per_frame[0] = ['{"type":"something.else"}']  # what a buggy backend would have sent
    send, diverged = warm.hand_over(call)
    assert diverged and [orjson.loads(f)["type"] for f in send] == ["session.update"]


async def test_only_a_calls_first_connect_can_adopt_a_session():
    from types import SimpleNamespace

    from shim.config import Config
    from shim.prewarm_io import Prewarmer, Warm

    counted: list[str] = []
    prewarmer = Prewarmer(SimpleNamespace(config=Config(), metrics=SimpleNamespace(prewarm=counted.append)), enabled=True)
    call = configuring_call()

    def ready_session() -> Warm:
        warm = Warm(prewarmer, call.call_sid)
        warm.transport, warm.session = object(), WarmSession(OpenAIRealtime(), call.setup.session)
        warm.opened.set_result(True)
        prewarmer.registry.add(call.call_sid, warm)
        return warm

    first = ready_session()
    assert await prewarmer.take(call) is first
    ready_session()  # (a repeated webhook, say) ...
    assert await prewarmer.take(call) is None  # ... a reconnect of the same call never adopts it
    assert call.call_sid in prewarmer.registry  # left for the TTL to close
    prewarmer.registry.drain()
    assert await prewarmer.take(configuring_call()) is None and counted == ["missed"]  # a new call, no session


# --- through the real server ----------------------------------------------------------------


def outcomes(run) -> dict[str, float]:
    registry = run.shim.metrics.registry
    return {o: registry.get_sample_value("shim_prewarm_total", {"outcome": o}) or 0.0
            for o in ("adopted", "expired", "failed", "missed")}


async def webhook_then_stream(run, call_sid: str, **params) -> TwilioCaller:
    response = await run.voice_webhook(call_sid)
    assert response.status_code == 200, response.text
    url, stream_params = parse_stream(response.text)
    return TwilioCaller(url, AUTH_TOKEN, custom_parameters={**stream_params, **params}, call_sid=call_sid)


async def test_the_stream_adopts_the_session_opened_from_the_voice_webhook(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script(replies=["Fine."])) as run:
        caller = await webhook_then_stream(run, f"CA{uuid.uuid4().hex}")
        session = await run.fake.wait_for_session()
        await session.wait_for("session.update")  # configured before the stream even started
        await asyncio.sleep(0.05)  # session.updated is in the pre-warm's buffer
        assert not session.events_of("response.create")
        await caller.connect()
        greeting = await session.wait_for("response.create")
        assert greeting["response"]["metadata"]["purpose"] == "greeting"
        await keep_line_open(caller, caller.wait_for_audio(800, timeout=10))
        assert run.fake.connections_attempted == 1 and len(session.events_of("session.update")) == 1
        assert run.fake.validation_errors == []
        assert outcomes(run) == {"adopted": 1, "expired": 0, "failed": 0, "missed": 0}
        await caller.stop()
        await asyncio.wait_for(session.closed.wait(), 5)


async def test_a_stream_arriving_while_the_session_still_opens_waits_for_it(tmp_path, db_dsn):
    # 150 ms round trips: the socket takes ~450 ms to open, the stream starts right away.
    async with running_shim(tmp_path, db_dsn, Script(replies=["Fine."], network_delay_ms=150)) as run:
        caller = await webhook_then_stream(run, f"CA{uuid.uuid4().hex}")
        await caller.connect()
        session = await run.fake.wait_for_session()
        await keep_line_open(caller, caller.wait_for_audio(800, timeout=10))
        assert run.fake.connections_attempted == 1 and len(session.events_of("session.update")) == 1
        assert outcomes(run)["adopted"] == 1
        await caller.stop()


async def test_without_a_session_for_the_call_the_stream_connects_afresh(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script(replies=["Fine."])) as run:
        call_sid = f"CA{uuid.uuid4().hex}"  # e.g. the webhook was answered by another instance
        caller = TwilioCaller(run.config.media_stream_url, AUTH_TOKEN, call_sid=call_sid, custom_parameters={
            "assistant": "demo", "from": "+15550001111", "to": "+15550002222",
            "token": run.shim.bridge.stream_token(call_sid)})
        await caller.connect()
        await keep_line_open(caller, caller.wait_for_audio(800, timeout=10))
        assert run.fake.connections_attempted == 1
        assert outcomes(run) == {"adopted": 0, "expired": 0, "failed": 0, "missed": 1}
        await caller.stop()


async def test_a_wrong_token_never_adopts_and_an_unclaimed_session_is_closed_at_its_ttl(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script()) as run:
        prewarm = run.shim.bridge.prewarm
        prewarm.registry.ttl_s = 1.0
        call_sid = f"CA{uuid.uuid4().hex}"
        forged = await webhook_then_stream(run, call_sid, token="0" * 32)
        session = await run.fake.wait_for_session()
        await forged.connect()
        await forged.wait_closed(timeout=5)  # refused at `start`
        assert call_sid in prewarm.registry and not session.closed.is_set()
        await asyncio.wait_for(session.closed.wait(), 5)  # the TTL closed the model socket
        assert call_sid not in prewarm.registry and run.fake.connections_attempted == 1
        assert outcomes(run) == {"adopted": 0, "expired": 1, "failed": 0, "missed": 0}


async def test_a_session_lost_before_the_stream_falls_back_to_a_fresh_connect(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script(replies=["Fine."])) as run:
        caller = await webhook_then_stream(run, f"CA{uuid.uuid4().hex}")
        first = await run.fake.wait_for_session()
        await first.wait_for("session.update")
        await first.close(1011, "gone")
        for _ in range(100):
            if outcomes(run)["failed"]:
                break
            await asyncio.sleep(0.02)
        await caller.connect()
        second = await run.fake.wait_for_session(2)
        await keep_line_open(caller, caller.wait_for_audio(800, timeout=10))
        assert len(second.events_of("session.update")) == 1 and run.fake.connections_attempted == 2
        assert outcomes(run) == {"adopted": 0, "expired": 0, "failed": 1, "missed": 1}
        await caller.stop()


async def test_shim_prewarm_off_opens_nothing_before_the_stream(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script(replies=["Fine."]), prewarm=False) as run:
        caller = await webhook_then_stream(run, f"CA{uuid.uuid4().hex}")
        await asyncio.sleep(0.2)
        assert run.fake.connections_attempted == 0
        await caller.connect()
        await keep_line_open(caller, caller.wait_for_audio(800, timeout=10))
        assert run.fake.connections_attempted == 1 and outcomes(run) == dict.fromkeys(outcomes(run), 0.0)
        await caller.stop()


async def test_an_assistant_request_answer_is_pre_warmed_with_its_overrides(tmp_path, db_dsn):
    import asyncpg

    from shim.testing.fake_customer import FakeCustomer

    from .harness import SHIM_NUMBER

    async with FakeCustomer() as customer:
        answer = {"assistant": {"name": "Inline", "model": {"provider": "openai", "model": "gpt-4o", "messages": [
            {"role": "system", "content": "Inline prompt for {{caller_name}}."}]}, "firstMessage": "Hello from inline."},
            "assistantOverrides": {"variableValues": {"caller_name": "Bo"}}}
        customer.on("/route", lambda message: (200, answer if message.get("type") == "assistant-request" else {}))
        async with running_shim(tmp_path, db_dsn, Script(), default_assistant="") as run:
            conn = await asyncpg.connect(db_dsn)
            await conn.execute("INSERT INTO numbers (number, server_url) VALUES ($1, $2)", SHIM_NUMBER, customer.url("/route"))
            await conn.close()
            caller = await webhook_then_stream(run, f"CA{uuid.uuid4().hex}")
            assert caller.custom_parameters["assistant"] == "@request"
            session = await run.fake.wait_for_session()
            update = await session.wait_for("session.update")  # before the stream starts
            assert update["session"]["instructions"] == "Inline prompt for Bo."
            await caller.connect()
            await keep_line_open(caller, caller.wait_for_audio(800, timeout=10))
            assert run.fake.connections_attempted == 1 and outcomes(run)["adopted"] == 1
            await caller.stop()
    assert len(customer.matching("assistant-request")) == 1
