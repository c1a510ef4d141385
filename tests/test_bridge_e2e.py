"""End to end through the real server: signed Twilio webhooks and media stream in, the stand-in
Realtime model (validating every event against the openai SDK) on the other side, real Postgres."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
import websockets

from shim.testing import CALLER_INTERRUPT_TEXT, CALLER_QUESTION_TEXT, load_asset
from shim.testing.fake_realtime import Script
from shim.testing.pg_proxy import PgProxy
from shim.testing.twilio_caller import keep_line_open, sign

from .harness import API_KEY, AUTH_TOKEN, CALLER, SHIM_NUMBER, running_shim

GREETING = "Hi, thanks for calling Brightside Dental, this is Maya. How can I help?"
LONG_ANSWER = "On Saturdays we are open from nine in the morning until one in the afternoon, and we also take walk ins for emergencies."
SHORT_ANSWER = "Sure, I can book a cleaning for you."
MS_PER_CHAR = 20.0


def script(**kw) -> Script:
    return Script(
        replies=[LONG_ANSWER, SHORT_ANSWER],
        user_transcripts=[CALLER_QUESTION_TEXT, CALLER_INTERRUPT_TEXT],
        audio_ms_per_char=MS_PER_CHAR,
        **kw,
    )


async def utterances(dsn: str, call_sid: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT * FROM utterances WHERE call_sid = $1 ORDER BY started_at, seq", call_sid
        )
    finally:
        await conn.close()


async def fetchrow(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def model_events(dsn: str, call_sid: str) -> list[str]:
    """The call's model_* call_events kinds, sorted (rows of one tick may share a timestamp)."""
    conn = await asyncpg.connect(dsn)
    try:
        return sorted(r["kind"] for r in await conn.fetch(
            "SELECT kind FROM call_events WHERE call_sid = $1 AND kind LIKE 'model_%'", call_sid))
    finally:
        await conn.close()


async def converse(caller, session) -> None:
    """Greeting, a question, then an interruption of the answer once it has played a little."""
    await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
    await keep_line_open(caller, caller.wait_until_played(timeout=15))
    await caller.send_audio(load_asset("caller_question"))
    await keep_line_open(caller, session.wait_sent("response.created", count=2, timeout=10))
    await caller.send_silence(700)  # about half a second of the answer is heard
    await caller.send_audio(load_asset("caller_interrupt"))
    await keep_line_open(caller, session.wait_sent("response.done", count=3, timeout=10))
    await keep_line_open(caller, caller.wait_until_played(timeout=15))


async def no_call_left(run) -> None:
    """Every task a call started has ended, and the call is forgotten."""
    for _ in range(200):
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("call:")]
        if not run.shim.bridge.runners and not tasks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"left behind: {run.shim.bridge.runners} {tasks}")


async def test_a_call_end_to_end(tmp_path, db_dsn, capsys, caplog):
    async with running_shim(tmp_path, db_dsn, script()) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await converse(caller, session)
        await caller.stop()
        await asyncio.wait_for(session.closed.wait(), 5)  # the model socket closes with the call
        await no_call_left(run)
        await run.drain()
        metrics = (await run.http.get(run.config.http_url("/metrics"))).text

    logs = capsys.readouterr().out + caplog.text
    assert caller.call_sid in logs  # call_sid is bound on the call's log lines...
    assert API_KEY not in logs and AUTH_TOKEN not in logs  # ...and secrets are on none

    # every event the shim sent validated against the openai SDK's GA types, and it connected right
    assert run.fake.validation_errors == []
    assert session.headers["authorization"] == f"Bearer {API_KEY}"
    assert session.model == "gpt-realtime-2.1"
    update = session.events_of("session.update")[0]["session"]
    assert update["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert update["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert update["audio"]["output"]["voice"] == "marin"  # 11labs "sarah"
    assert update["instructions"].startswith("You are Maya") and CALLER in update["instructions"]
    # caller audio is not appended before the session is configured
    first_append = next(i for i, e in enumerate(session.received) if e["type"] == "input_audio_buffer.append")
    assert first_append > session.received.index(session.events_of("session.update")[0])

    # caller -> model: byte-identical, in order, none dropped
    assert bytes(session.audio_in) == bytes(caller.sent_audio)

    # model -> caller: greeting and second answer whole; the interrupted answer is a prefix
    items = list(session.audio_out.values())
    assert len(items) == 3
    greeting, answer, second = (bytes(a) for a in items)
    received = bytes(caller.received_audio)
    cut = len(received) - len(greeting) - len(second)
    assert received[: len(greeting)] == greeting
    assert 0 < cut <= len(answer)  # what was generated before the barge-in was forwarded
    assert received[len(greeting) : len(greeting) + cut] == answer[:cut]
    assert received[len(greeting) + cut :] == second
    assert caller.protocol_errors == []
    media = [m for m in caller.received if m["event"] == "media"]
    marks = [m for m in caller.received if m["event"] == "mark"]
    assert len(marks) == len(media)
    assert caller.clears == 1

    # greeting word for word first; barge-in truncated at what Twilio confirmed played
    assert session.events_of("response.create")[0]["response"]["instructions"].endswith(f'"{GREETING}"')
    (truncate,) = session.truncations
    played_of_answer = len(caller.played_audio) - len(greeting) - len(second)
    assert 0 < played_of_answer < len(answer)  # ...but the caller heard only part of it
    assert truncate["audio_end_ms"] * 8 <= played_of_answer
    assert played_of_answer - truncate["audio_end_ms"] * 8 < 8 * 400  # within a chunk + detection delay

    rows = await utterances(db_dsn, caller.call_sid)
    assert [(r["role"], r["interrupted"]) for r in rows] == [
        ("assistant", False), ("user", False), ("assistant", True), ("user", False), ("assistant", False)
    ]
    assert rows[0]["text"] == GREETING
    assert rows[1]["text"] == CALLER_QUESTION_TEXT and rows[3]["text"] == CALLER_INTERRUPT_TEXT
    interrupted = rows[2]
    assert interrupted["full_text"] == LONG_ANSWER
    assert interrupted["heard_ms"] == truncate["audio_end_ms"]
    assert 0 < len(interrupted["text"]) < len(LONG_ANSWER) and LONG_ANSWER.startswith(interrupted["text"])
    assert rows[4]["text"] == SHORT_ANSWER
    assert rows[2]["latency_ms"] is not None and 0 <= rows[2]["latency_ms"] < 5000
    assert rows[4]["latency_ms"] is not None

    call = await fetchrow(db_dsn, "SELECT * FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "customer-ended-call" and call["ended_at"] is not None
    assert (call["assistant_id"], call["from_number"], call["to_number"]) == ("demo", CALLER, SHIM_NUMBER)
    assert call["stream_sid"] == caller.stream_sid and call["model"] == "gpt-realtime-2.1"

    assert "shim_barge_ins_total 1.0" in metrics
    assert 'shim_frames_relayed_total{direction="caller_to_model"}' in metrics


@pytest.mark.parametrize("media", ["picows", "starlette"])
async def test_bad_signature_is_refused_before_any_model_connection(tmp_path, db_dsn, media):
    async with running_shim(tmp_path, db_dsn, script(), media=media) as run:
        url = run.config.media_stream_url
        from shim.testing.twilio_caller import TwilioCaller

        for signature in ("", "bm90IGEgc2lnbmF0dXJl", sign("wrong-token", url), sign(AUTH_TOKEN, url.replace("ws://", "http://"))):
            caller = TwilioCaller(url, AUTH_TOKEN, custom_parameters={"assistant": "demo"}, signature=signature)
            with pytest.raises(websockets.InvalidStatus) as refused:
                await caller.connect()
            assert refused.value.response.status_code == 403
        assert run.fake.connections_attempted == 0

        bad = await run.http.post(run.config.http_url("/twilio/voice"), data={"CallSid": "CA1", "To": SHIM_NUMBER},
                                  headers={"X-Twilio-Signature": sign(AUTH_TOKEN, "https://elsewhere.example/twilio/voice")})
        assert bad.status_code == 403


async def test_single_port_fallback_relays_the_same_way(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, script(), media="starlette") as run:
        caller = await run.place_call()
        assert caller.media_url.endswith(f"{run.config.public_url.split('//')[1]}/twilio/media")
        session = await run.fake.wait_for_session()
        await caller.send_silence(200)
        await caller.wait_for_audio(1, timeout=10)
        await caller.wait_until_played(timeout=15)
        await caller.stop()
        await asyncio.wait_for(session.closed.wait(), 5)
    assert bytes(caller.received_audio) == bytes(next(iter(session.audio_out.values())))
    assert bytes(session.audio_in) == bytes(caller.sent_audio)
    assert caller.protocol_errors == [] and run.fake.validation_errors == []


async def test_many_calls_at_once_without_cross_talk(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, script()) as run:
        callers = await asyncio.gather(*(run.place_call(from_=f"+1555000{1000 + i}") for i in range(12)))

        async def talk(i, caller):
            # each caller sends its own byte pattern (a quiet, distinct value: no speech detected)
            await caller.send_audio(bytes([0x70 + i]) * 160 * 25)
            await caller.wait_for_audio(1, timeout=15)
            await caller.wait_until_played(timeout=20)
            await caller.stop()

        await asyncio.gather(*(talk(i, c) for i, c in enumerate(callers)))
        await run.drain()
    by_call = {}
    for session in run.fake.sessions:
        patterns = set(session.audio_in)
        assert len(patterns) == 1, "a session received audio from more than one caller"
        by_call[patterns.pop()] = session
    for i, caller in enumerate(callers):
        session = by_call[0x70 + i]
        assert bytes(session.audio_in) == bytes(caller.sent_audio)
        assert bytes(caller.received_audio) == b"".join(bytes(a) for a in session.audio_out.values())
        assert caller.protocol_errors == []
    assert run.fake.validation_errors == []
    conn = await asyncpg.connect(db_dsn)
    try:
        ended = await conn.fetchval(
            "SELECT count(*) FROM calls WHERE call_sid = ANY($1) AND ended_reason = 'customer-ended-call'",
            [c.call_sid for c in callers],
        )
    finally:
        await conn.close()
    assert ended == len(callers)


async def test_postgres_outage_during_a_call_loses_no_rows(tmp_path, db_dsn):
    proxy = PgProxy.from_dsn(db_dsn)
    await proxy.start()
    try:
        async with running_shim(tmp_path, proxy.dsn_for(db_dsn), script()) as run:
            await proxy.pause()  # Postgres goes away as the call starts
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await converse(caller, session)
            await caller.stop()
            await asyncio.wait_for(session.closed.wait(), 5)
            health = run.shim.recorder.health()  # rows are on disk, the call went on
            assert health.state == "degraded" and health.spooled > 0 and str(health).startswith("degraded: spooling")
            await proxy.resume()
            await run.drain()
    finally:
        await proxy.stop()
    rows = await utterances(db_dsn, caller.call_sid)
    assert [r["role"] for r in rows] == ["assistant", "user", "assistant", "user", "assistant"]
    assert all(r["text"] for r in rows)
    call = await fetchrow(db_dsn, "SELECT * FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "customer-ended-call"


async def test_model_refusing_the_key_ends_the_call_with_an_apology(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, script(require_api_key="sk-other")) as run:
        caller = await run.place_call()
        await caller.wait_closed(timeout=10)  # the shim hangs up rather than leaving silence
        response = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid, "CallStatus": "in-progress"})
        await run.drain()
    assert "<Say>" in response.text and "<Hangup" in response.text
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "pipeline-error-openai-401-unauthorized"


async def test_a_lost_model_socket_is_reconnected_and_the_call_goes_on(tmp_path, db_dsn):
    """The model socket drops (1011) after the greeting: a new connection opens within 1.5 s,
    is configured with the same session, and the caller's next words reach it and are answered;
    the Twilio stream stays up and the call row stays open until the caller hangs up."""
    loop = asyncio.get_running_loop()
    async with running_shim(tmp_path, db_dsn, script(drop_after_responses=1, faulty_sessions=1)) as run:
        caller = await run.place_call()
        first = await run.fake.wait_for_session()
        await keep_line_open(caller, first.closed.wait())
        lost_at = loop.time()
        await keep_line_open(caller, run.fake.wait_for_session(2, timeout=5))
        assert loop.time() - lost_at < 1.5
        second = run.fake.sessions[1]
        update = await second.wait_for("session.update")
        assert update["session"] == first.events_of("session.update")[0]["session"]
        await second.wait_for("conversation.item.create")
        replayed = [e["item"] for e in second.events_of("conversation.item.create")]
        assert [(i["role"], i["content"][0]["text"]) for i in replayed] == [("assistant", GREETING)]
        await keep_line_open(caller, caller.wait_until_played(timeout=15))
        heard = len(caller.timeline()[1])
        appended = len(second.audio_in)
        await caller.send_audio(load_asset("caller_question"))
        await keep_line_open(caller, second.wait_sent("response.done", count=1, timeout=15))
        await keep_line_open(caller, caller.wait_until_played(timeout=15))
        assert len(second.audio_in) > appended  # the caller's audio reached the new session...
        assert len(caller.timeline()[1]) > heard  # ...and its answer reached the caller
        assert not caller.closed
        row = await fetchrow(db_dsn, "SELECT ended_at FROM calls WHERE call_sid = $1", caller.call_sid)
        assert row["ended_at"] is None
        await caller.stop()
        await run.drain()
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "customer-ended-call"
    kinds = await model_events(db_dsn, caller.call_sid)
    assert kinds == ["model_reconnected", "model_reconnecting", "model_socket_closed"]  # one loss, attempt, recovery
    assert run.fake.validation_errors == []


async def test_a_model_that_cannot_be_reached_again_ends_the_call_with_the_apology(tmp_path, db_dsn):
    refused = frozenset(range(2, 50))  # every connection after the first is refused (HTTP 503)
    async with running_shim(tmp_path, db_dsn, script(drop_after_responses=1, refuse_connections=refused)) as run:
        caller = await run.place_call()
        await keep_line_open(caller, caller.wait_closed(timeout=15))
        response = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid})
        await run.drain()
        attempts = run.fake.connections_attempted
    assert "<Say>" in response.text
    assert 2 < attempts <= 8  # bounded
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "pipeline-error-openai-llm-failed"
    event = await fetchrow(db_dsn, "SELECT kind FROM call_events WHERE call_sid = $1 AND kind = 'model_reconnect_abandoned'", caller.call_sid)
    assert event is not None


async def test_a_session_at_its_time_limit_is_rolled_over_at_a_pause(tmp_path, db_dsn):
    """The stand-in's sessions last 8 s (the API's: 60 minutes): the shim replaces the session at
    a pause before the limit, and the caller's next turn is answered on the new one."""
    async with running_shim(tmp_path, db_dsn, script(session_max_s=8.0)) as run:
        caller = await run.place_call()
        first = await run.fake.wait_for_session()
        await keep_line_open(caller, caller.wait_until_played(timeout=15))
        await keep_line_open(caller, run.fake.wait_for_session(2, timeout=12))
        second = run.fake.sessions[1]
        await first.closed.wait()
        await second.wait_for("session.update")
        await caller.send_audio(load_asset("caller_question"))
        await keep_line_open(caller, second.wait_sent("response.done", count=1, timeout=15))
        assert not caller.closed
        await caller.stop()
        await run.drain()
    kinds = await model_events(db_dsn, caller.call_sid)
    assert kinds == ["model_rollover", "model_session_rolled_over"]  # before the cap: no socket lost
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "customer-ended-call"


async def test_numbers_route_calls_and_unknown_numbers_get_an_apology(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, script(), default_assistant="") as run:
        conn = await asyncpg.connect(db_dsn)
        await conn.execute("INSERT INTO numbers (number, assistant_id) VALUES ($1, 'demo')", SHIM_NUMBER)
        await conn.close()
        routed = await run.voice_webhook(f"CA{uuid.uuid4().hex}")
        unknown = await run.voice_webhook(f"CA{uuid.uuid4().hex}", to="+15559999999")
    assert routed.status_code == 200 and '<Parameter name="assistant" value="demo"' in routed.text
    assert 'action="' + run.config.http_url("/twilio/stream-ended") + '"' in routed.text
    assert unknown.status_code == 200
    assert "<Say>" in unknown.text and "<Hangup" in unknown.text and "<Connect" not in unknown.text


async def test_status_callback_records_the_end_of_a_call_that_never_streamed(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, script()) as run:
        call_sid = f"CA{uuid.uuid4().hex}"
        await run.voice_webhook(call_sid)
        response = await run.twilio_post("/twilio/status", {"CallSid": call_sid, "CallStatus": "busy"})
        await run.drain()
    assert response.status_code == 204
    call = await fetchrow(db_dsn, "SELECT ended_reason, ended_at FROM calls WHERE call_sid = $1", call_sid)
    assert call["ended_reason"] == "customer-busy" and call["ended_at"] is not None


async def test_shutdown_ends_live_calls_with_an_apology_and_keeps_their_rows(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, script(), drain_timeout_s=0.3) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
    # leaving the block stops the server (as SIGTERM does) with the call still up
    await caller.wait_closed(timeout=5)
    await asyncio.wait_for(session.closed.wait(), 5)
    call = await fetchrow(db_dsn, "SELECT ended_reason, next_action FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "worker-shutdown"
    rows = await utterances(db_dsn, caller.call_sid)
    assert rows and rows[0]["role"] == "assistant"


async def test_a_number_with_a_fallback_destination_is_transferred_when_the_model_is_gone(tmp_path, db_dsn):
    refused = frozenset(range(2, 50))
    async with running_shim(tmp_path, db_dsn, script(drop_after_responses=1, refuse_connections=refused),
                            default_assistant="") as run:
        conn = await asyncpg.connect(db_dsn)
        await conn.execute("INSERT INTO numbers (number, assistant_id, fallback_destination) VALUES ($1, 'demo', $2::jsonb)",
                           SHIM_NUMBER, '{"type": "number", "number": "+15557654321"}')
        await conn.close()
        await asyncio.sleep(0.5)  # NOTIFY reaches the routing table
        caller = await run.place_call()
        await keep_line_open(caller, caller.wait_closed(timeout=15))
        response = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid, "To": SHIM_NUMBER})
        await run.drain()
    assert "<Say>" in response.text and "transfer" in response.text
    assert "<Dial" in response.text and "+15557654321</Number>" in response.text
    call = await fetchrow(db_dsn, "SELECT ended_reason, transfer FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "pipeline-error-openai-llm-failed" and "+15557654321" in call["transfer"]
