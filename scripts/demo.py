"""`make demo`: one simulated phone call through the real `shim serve`.

Starts the stand-in Realtime model, runs `shim serve` (embedded PostgreSQL, the picows media
listener) as a subprocess, routes a number to the demo assistant with `shim numbers set`, then
plays Twilio: the signed voice webhook, the signed media stream, the caller's recorded voice.
The call: greeting, a question, the answer, an interruption, the second answer, hang-up.
Writes both sides as a stereo WAV and prints the transcript read back from Postgres with SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from xml.etree import ElementTree

import asyncpg
import httpx

from shim.db import resolve_dsn
from shim.testing import CALLER_INTERRUPT_TEXT, CALLER_QUESTION_TEXT, load_asset
from shim.testing.fake_openai_text import FakeOpenAIText
from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.fake_twilio_api import FakeTwilioApi
from shim.testing.twilio_caller import TwilioCaller, incoming_call_params, keep_line_open, post_twilio_webhook
from shim.testing._serve import free_port

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "demo-out"
AUTH_TOKEN = "demo-auth-token"
SHIM_NUMBER, CALLER = "+15550100200", "+15550100999"


def summarize(body: dict) -> str:
    """The stand-in chat model's answer to the post-call analysis prompts."""
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    if "true" in prompt.lower() and "false" in prompt.lower():
        return "true"
    return "The caller asked about Saturday opening hours, then asked to book a cleaning."


async def main() -> int:
    OUT.mkdir(exist_ok=True)
    data_dir = REPO / ".shim" / "demo"
    http_port = free_port()
    model = FakeRealtime(
        Script(
            replies=[
                "On Saturdays we are open from nine in the morning until one in the afternoon. "
                "Is there anything else I can help you with today?",
                "Of course. I can book a cleaning for you. What day works best?",
            ],
            user_transcripts=[CALLER_QUESTION_TEXT, CALLER_INTERRUPT_TEXT],
            audio_ms_per_char=45,
        )
    )
    await model.start()
    # Twilio's REST API (the call recording) and OpenAI's chat model (the post-call summary)
    # are stand-ins too: the demo never leaves this machine.
    account_sid = "AC" + "0" * 32
    twilio_api = FakeTwilioApi(account_sid, AUTH_TOKEN)
    await twilio_api.start()
    text_model = FakeOpenAIText(api_key="sk-demo-not-a-real-key", reply=summarize)
    await text_model.start()
    env = dict(
        os.environ,
        OPENAI_API_KEY="sk-demo-not-a-real-key",
        OPENAI_REALTIME_URL=model.url,
        TWILIO_ACCOUNT_SID=account_sid,
        TWILIO_API_BASE=twilio_api.url,
        OPENAI_BASE_URL=text_model.base_url,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        PUBLIC_URL=f"http://127.0.0.1:{http_port}",
        SHIM_DATA_DIR=str(data_dir),
        SHIM_ASSISTANTS_DIR=str(REPO / "assistants"),
        SHIM_LOG_FORMAT="console",
        SHIM_LOG_LEVEL=os.environ.get("SHIM_LOG_LEVEL", "warning"),
        SHIM_TOOL_URL_ALLOW="127.0.0.1",  # the stand-ins listen on loopback, refused by default
    )
    env.pop("DATABASE_URL", None)
    shim = [sys.executable, "-m", "shim.cli"]
    subprocess.run([*shim, "numbers", "set", SHIM_NUMBER, "--assistant", "demo"], env=env, check=True)
    print(f"== shim serve on :{http_port} (webhooks, and the media stream on /twilio/media), model stand-in at {model.url}")
    server = subprocess.Popen(
        [*shim, "serve", "--host", "127.0.0.1", "--port", str(http_port)], env=env
    )
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{http_port}/healthz")).status_code == 200:
                        break
                if server.poll() is not None:
                    raise SystemExit("shim serve exited during start-up")
                await asyncio.sleep(0.1)

            call_sid = "CA" + uuid.uuid4().hex
            params = incoming_call_params(call_sid, CALLER, SHIM_NUMBER, env["TWILIO_ACCOUNT_SID"])
            twiml = (await post_twilio_webhook(http, f"{env['PUBLIC_URL']}/twilio/voice", params, AUTH_TOKEN)).text
            print("== Twilio asked /twilio/voice and got:\n" + twiml)
            stream = ElementTree.fromstring(twiml).find("./Connect/Stream")
            custom = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
            caller = TwilioCaller(stream.attrib["url"], AUTH_TOKEN, custom_parameters=custom, call_sid=call_sid,
                                  account_sid=account_sid)
            await caller.connect()
            session = await model.wait_for_session()
            print("== call connected; the assistant greets the caller")
            await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
            await keep_line_open(caller, caller.wait_until_played(timeout=20))
            print(f"== caller: {CALLER_QUESTION_TEXT!r}")
            await caller.send_audio(load_asset("caller_question"))
            await keep_line_open(caller, session.wait_sent("response.created", count=2, timeout=10))
            await caller.send_silence(1500)  # the caller hears the start of the answer...
            print(f"== caller interrupts: {CALLER_INTERRUPT_TEXT!r}")
            await caller.send_audio(load_asset("caller_interrupt"))
            await keep_line_open(caller, session.wait_sent("response.done", count=3, timeout=10))
            await keep_line_open(caller, caller.wait_until_played(timeout=20))
            await caller.send_silence(300)
            await caller.stop()
            await post_twilio_webhook(http, f"{env['PUBLIC_URL']}/twilio/status",
                                      {"CallSid": call_sid, "CallStatus": "completed"}, AUTH_TOKEN)
            wav = OUT / "call.wav"
            caller.write_wav(wav)
            print(f"== both sides written to {wav.relative_to(REPO)} (left: caller, right: assistant)")
    finally:
        server.terminate()  # SIGTERM: drains calls, end-of-call work and the writer; stops Postgres
        try:
            # Wait without blocking this loop: the stand-ins living in it still answer the
            # server's post-call requests (the summary) while it shuts down.
            await asyncio.to_thread(server.wait, 30)
        except subprocess.TimeoutExpired:
            server.kill()
        await model.stop()
        await twilio_api.stop()
        await text_model.stop()

    dsn, embedded = resolve_dsn("", data_dir)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                """SELECT role, text, interrupted, full_text, heard_ms, latency_ms
                     FROM utterances WHERE call_sid = $1 ORDER BY started_at, seq""",
                call_sid,
            )
            call = None
            for _ in range(50):  # the summary lands a moment after the hang-up
                call = await conn.fetchrow(
                    "SELECT assistant_id, from_number, to_number, ended_reason, ended_at - started_at AS duration, "
                    "recording_url, summary FROM calls WHERE call_sid = $1",
                    call_sid,
                )
                if call is not None and call["summary"]:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"\n== transcript from Postgres (SELECT … FROM utterances WHERE call_sid = '{call_sid}' ORDER BY started_at)")
    for r in rows:
        notes = []
        if r["latency_ms"] is not None:
            notes.append(f"first audio {r['latency_ms']} ms after the caller stopped")
        if r["interrupted"]:
            notes.append(f"interrupted after {r['heard_ms']} ms; the model had said: {r['full_text']!r}")
        note = f"   [{'; '.join(notes)}]" if notes else ""
        print(f"  {r['role']:>9}: {r['text']}{note}")
    print(f"\n== call row: {dict(call)}")
    ok = len(rows) == 5 and call["ended_reason"] == "customer-ended-call" and rows[2]["interrupted"]
    if not ok:
        print("demo: the call did not go as scripted", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    started = time.monotonic()
    code = asyncio.run(main())
    print(f"(demo took {time.monotonic() - started:.1f} s)")
    sys.exit(code)
