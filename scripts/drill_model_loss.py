"""Fault drill: the model side fails mid-call, and the call goes on.

Bounded, loopback only: a real `shim serve` (embedded PostgreSQL), the stand-in Realtime model
(every event validated against the openai SDK), the simulated Twilio caller. Five calls:

  1. reset: the model's TCP connection drops without a close frame (1006) after the greeting;
  2. close 1011 ("Internal server error") in the middle of an answer;
  3. silent: the socket stays open but the model stops mid-answer (no progress for 10 s);
  4. rollover: the model's sessions last 12 s (the API's: 60 minutes) and the call lasts longer;
  5. gone: the model drops and every reconnect is refused (HTTP 503).

For 1-4 it checks that a new session opened (how long after the loss), got the same
`session.update` and the conversation, that the caller's next question was answered on it and
the Twilio stream stayed up; for 5, that the caller heard the apology within the bounded window.
Figures: loss -> new connection, loss -> session ready (`gap_ms` of the call_events row), loss -> the
cut-off answer's next byte, and the turn latency of the question asked on the new session.

Usage: .venv/bin/python scripts/drill_model_loss.py   (exit 0 when every check holds; ~70 s)
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drill_db_outage import place_call, read_stopped_db, report, run_drill, serve_env, start_serve, stop_serve  # noqa: E402

from shim.testing import CALLER_QUESTION_TEXT, load_asset  # noqa: E402
from shim.testing.fake_realtime import FakeRealtime, Script  # noqa: E402
from shim.testing.twilio_caller import keep_line_open  # noqa: E402
from shim.testing._serve import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIM_NUMBER = "+15550100500"
ANSWER = "On Saturdays we are open from nine in the morning until one in the afternoon."


async def scenario(name: str, script: Script, fault, work: Path, results: dict, *, mid_answer: bool = False) -> str:
    """One call against a fresh stand-in model with `script`; `fault(model, session, caller)`
    breaks the first session and returns when it is broken."""
    model = FakeRealtime(script)
    await model.start()
    http_port, media_port = free_port(), free_port()
    env = serve_env(model.url, http_port, media_port, work / "data", assistants=REPO / "assistants", assistant="demo")
    server = await start_serve(env, http_port, media_port)
    loop = asyncio.get_running_loop()
    out: dict = {"name": name}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            caller = await place_call(http, env, "+15550100501", SHIM_NUMBER)
            first = await model.wait_for_session(timeout=10)
            await keep_line_open(caller, caller.wait_for_audio(1, timeout=15))
            await keep_line_open(caller, fault(model, first, caller))
            lost_at = loop.time()
            if script.refuse_connections:
                await keep_line_open(caller, caller.wait_closed(timeout=20))
                out["hung_up_after_s"] = round(loop.time() - lost_at, 2)
                out["stream_closed"] = True
            else:
                await keep_line_open(caller, model.wait_for_session(2, timeout=15))
                out["reconnect_ms"] = round((loop.time() - lost_at) * 1000)
                second = model.sessions[1]
                await keep_line_open(caller, second.wait_for("session.update", timeout=10))
                out["same_config"] = second.events_of("session.update")[0]["session"] == \
                    first.events_of("session.update")[0]["session"]
                if mid_answer:  # the cut-off answer goes on: its first new byte, after the loss
                    await keep_line_open(caller, second.wait_sent("response.output_audio.delta", timeout=10))
                    out["loss_to_voice_ms"] = round((loop.time() - lost_at) * 1000)
                await keep_line_open(caller, caller.wait_until_played(timeout=20))
                await keep_line_open(caller, asyncio.sleep(0.5))
                heard = len(caller.received_audio)
                await caller.send_audio(load_asset("caller_question"))
                await keep_line_open(caller, second.wait_sent("response.done", count=1 + len(
                    [e for e in second.sent if e.get("type") == "response.done"]), timeout=20))
                await keep_line_open(caller, caller.wait_until_played(timeout=20))
                out["answered_on_new_session"] = len(caller.received_audio) > heard
                out["stream_closed"] = caller.closed
                await caller.stop()
            await asyncio.sleep(1.0)
        out["validation_errors"] = model.validation_errors
    finally:
        await stop_serve(server)
        await model.stop()
    async def read(conn):
        out["ended_reason"] = await conn.fetchval("SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
        # the answer to the question asked on the new session: caller's end of speech -> first byte
        out["turn_latency_ms"] = await conn.fetchval(
            "SELECT latency_ms FROM utterances WHERE call_sid = $1 AND role = 'assistant' AND latency_ms IS NOT NULL "
            "ORDER BY seq DESC LIMIT 1", caller.call_sid)
        return await conn.fetch("SELECT kind, detail FROM call_events WHERE call_sid = $1 AND kind LIKE 'model_%' "
                                "ORDER BY at", caller.call_sid)

    rows = await read_stopped_db(work / "data", read)
    out["events"] = [r["kind"] for r in rows]
    gaps = [orjson.loads(r["detail"]).get("gap_ms") for r in rows if r["kind"] in ("model_reconnected", "model_session_rolled_over")]
    out["gap_ms"] = gaps[0] if gaps else None
    results[name] = out
    print(f"== {name}: {out}")
    return name


async def reset_after_greeting(model, session, caller):
    await caller.wait_until_played(timeout=20)
    session.reset()
    await session.closed.wait()


async def wait_closed(model, session, caller):
    await session.closed.wait()


async def close_mid_greeting(model, session, caller):
    await session.wait_sent("response.output_audio.delta", count=10, timeout=10)  # 1 s of it sent
    await session.close(1011, "Internal server error")
    await session.closed.wait()


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="shim-drill-model-"))
    base = dict(replies=[ANSWER], user_transcripts=[CALLER_QUESTION_TEXT], audio_ms_per_char=20)
    results: dict[str, dict] = {}
    try:
        await scenario("reset", Script(**base), reset_after_greeting, work, results)
        await scenario("close 1011 mid-answer", Script(**base, generation_speed=1.0), close_mid_greeting, work, results,
                       mid_answer=True)
        await scenario("silent mid-answer", Script(**base, stall_after_responses=0, faulty_sessions=1), 
                       lambda m, s, c: m.wait_for_session(2, timeout=20), work, results)
        await scenario("rollover", Script(**base, session_max_s=12.0),
                       lambda m, s, c: m.wait_for_session(2, timeout=20), work, results)
        await scenario("gone", Script(**base, drop_after_responses=1, refuse_connections=frozenset(range(2, 100))),
                       wait_closed, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checks: dict[str, bool] = {}
    for name in ("reset", "close 1011 mid-answer", "silent mid-answer"):
        r = results.get(name, {})
        checks[f"{name}: new session within 1.5 s of the loss"] = name == "silent mid-answer" or r.get("reconnect_ms", 1e9) < 1500
        checks[f"{name}: same session.update, answered on the new session, stream up"] = bool(
            r.get("same_config") and r.get("answered_on_new_session") and not r.get("stream_closed"))
        checks[f"{name}: reconnect recorded"] = "model_reconnected" in r.get("events", [])
        checks[f"{name}: call ended by the caller"] = r.get("ended_reason") == "customer-ended-call"
    r = results.get("rollover", {})
    checks["rollover: before the cap, at a pause, call goes on"] = (
        r.get("events", [])[:2] == ["model_rollover", "model_session_rolled_over"] and bool(r.get("answered_on_new_session"))
        and r.get("ended_reason") == "customer-ended-call")
    r = results.get("gone", {})
    checks["gone: the apology, bounded"] = (r.get("ended_reason") == "pipeline-error-openai-llm-failed"
                                            and r.get("hung_up_after_s", 99) < 12 and "model_reconnect_abandoned" in r.get("events", []))
    checks["nothing invalid reached the model"] = all(not r.get("validation_errors") for r in results.values())
    return report(checks)


if __name__ == "__main__":
    run_drill(main)
