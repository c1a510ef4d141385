"""Hostile input through the real server (issue 11): oversized webhook bodies, forged and replayed
stream starts, invalid media, huge frames. The live call next to it never notices."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest

from shim.testing.fake_realtime import Script
from shim.testing.twilio_caller import TwilioCaller, keep_line_open
from shim.twilio_media import MAX_FRAME_BYTES

from .harness import AUTH_TOKEN, running_shim


async def fetchrow(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def test_an_oversized_webhook_body_is_refused_before_it_is_parsed(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script()) as run:
        url = run.config.http_url("/twilio/voice")
        declared = await run.http.post(url, content=b"CallSid=CA1&" + b"x" * 300_000,
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})

        async def chunks():  # no Content-Length: the cap applies while the body streams in
            for _ in range(100):
                yield b"x" * 10_000

        chunked = await run.http.post(url, content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"})
        small_unsigned = await run.http.post(url, data={"CallSid": "CA1"})
    assert declared.status_code == 413 and chunked.status_code == 413
    assert small_unsigned.status_code == 403  # an ordinary body still reaches the signature check


@pytest.mark.parametrize("media", ["picows", "starlette"])
async def test_forged_and_replayed_starts_never_touch_the_live_call(tmp_path, db_dsn, media):
    async with running_shim(tmp_path, db_dsn, Script(replies=["Hello there."]), media=media) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
        await run.drain()
        before = await fetchrow(db_dsn, "SELECT from_number, stream_sid, ended_reason, next_action FROM calls WHERE call_sid = $1",
                                caller.call_sid)
        attempts = [  # a signed upgrade (captured), wrong token / the right token replayed for the live CallSid
            dict(caller.custom_parameters, token="0" * 32, **{"from": "+16660000000"}),
            dict(caller.custom_parameters, **{"from": "+16660000000"}),
        ]
        for params in attempts:
            forged = TwilioCaller(caller.media_url, AUTH_TOKEN, custom_parameters=params, call_sid=caller.call_sid)
            await forged.connect()
            await forged.wait_closed(timeout=10)
        await caller.send_silence(300)
        assert not caller.closed
        await run.drain()
        after = await fetchrow(db_dsn, "SELECT from_number, stream_sid, ended_reason, next_action FROM calls WHERE call_sid = $1",
                               caller.call_sid)
        assert run.fake.connections_attempted == 1  # no second model session
        await caller.stop()
        await asyncio.wait_for(session.closed.wait(), 5)
    assert after == before and after["ended_reason"] is None
    stored = await fetchrow(db_dsn, "SELECT custom_parameters FROM calls WHERE call_sid = $1", caller.call_sid)
    assert "token" not in orjson.loads(stored["custom_parameters"])


@pytest.mark.parametrize("media", ["picows", "starlette"])
async def test_invalid_media_and_a_huge_frame_end_only_that_stream(tmp_path, db_dsn, media):
    async with running_shim(tmp_path, db_dsn, Script(replies=["Hello there."]), media=media) as run:
        good, bad, huge = await asyncio.gather(run.place_call(), run.place_call(), run.place_call())
        for _ in range(3):
            await run.fake.wait_for_session()
        await keep_line_open(good, good.wait_for_audio(1, timeout=10))
        for i in range(2000):  # invalid base64, JSON junk, binary: dropped and counted
            await bad._ws.send(orjson.dumps({"event": "media", "streamSid": bad.stream_sid,
                                             "media": {"timestamp": str(i * 20), "payload": "!!not base64!!"}}), text=True)
        await bad._ws.send(b"\x00\x01binary")
        await bad._ws.send("{not json", text=True)
        await bad.send_silence(100)  # its good audio still flows
        await huge._ws.send("x" * (MAX_FRAME_BYTES + 1), text=True)
        await huge.wait_closed(timeout=10)  # that stream is closed (1009); the others go on
        await good.send_silence(300)
        assert not good.closed and not bad.closed
        await good.stop()
        await bad.stop()
        await run.drain()
    assert run.fake.validation_errors == []  # nothing invalid reached the model
    events = await fetchrow(db_dsn, "SELECT detail FROM call_events WHERE call_sid = $1 AND kind = 'twilio_frames_rejected'",
                            bad.call_sid)
    assert orjson.loads(events["detail"]) == {"count": 2002}
    good_end = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", good.call_sid)
    assert good_end["ended_reason"] == "customer-ended-call"


async def test_a_model_that_keeps_going_silent_mid_answer_ends_the_call_with_an_apology(tmp_path, db_dsn, monkeypatch):
    """The model socket stays open (pongs answered) but the answer stops, on every session: the
    no-progress deadline treats it as a lost model (a new session, which stalls again...), and
    after the bounded number of losses the caller hears the apology instead of silence until
    maxDurationSeconds. (A model silent once is reconnected: scripts/drill_model_loss.py.)"""
    monkeypatch.setattr("shim.call.MODEL_STALL_S", 1.5)
    async with running_shim(tmp_path, db_dsn, Script(replies=["A long answer that never finishes " * 5],
                                                     stall_after_responses=0)) as run:
        caller = await run.place_call()
        started = asyncio.get_running_loop().time()
        await caller.wait_closed(timeout=15)
        waited = asyncio.get_running_loop().time() - started
        response = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid})
        await run.drain()
    assert "<Say>" in response.text and waited < 12
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "pipeline-error-openai-llm-failed"
    stalls = await fetchrow(db_dsn, "SELECT count(*) AS n FROM call_events WHERE call_sid = $1 AND kind = 'model_stalled'",
                            caller.call_sid)
    assert stalls["n"] == 3  # model_link.MAX_LOSSES
    turn = await fetchrow(db_dsn, "SELECT interrupted FROM utterances WHERE call_sid = $1 AND role = 'assistant'", caller.call_sid)
    assert turn["interrupted"] is True
