"""Fault drill: hostile input against a real `shim serve` while another call is live.

Bounded, loopback only (embedded PostgreSQL, the stand-in Realtime model, the simulated Twilio
caller). Call A talks normally throughout; meanwhile:

  1. call B floods 10,000 media frames whose payload is not base64, plus junk JSON, a binary
     frame and a duplicate `start`;
  2. a signed stream upgrade replays A's CallSid with a wrong token (a forged `start`);
  3. a third stream sends a 1 MB frame;
  4. an unsigned 200 MB form POST hits /twilio/voice.

It then checks: nothing invalid reached the model (the stand-in validates every event against
the openai SDK), B's rejected frames are one call_events row (not 10,000), A's row is untouched
and A heard all of its greeting, the huge frame closed only its own stream, the 200 MB
body was refused (413) without the server's memory growing.

Usage: .venv/bin/python scripts/drill_bad_input.py   (exit 0 when every check holds; ~30 s)
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drill_db_outage import AUTH_TOKEN, place_call, read_stopped_db, report, run_drill, serve_env, start_serve, stop_serve  # noqa: E402

from shim.testing.fake_realtime import FakeRealtime, Script  # noqa: E402
from shim.testing.twilio_caller import TwilioCaller, keep_line_open  # noqa: E402
from shim.testing._serve import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIM_NUMBER = "+15550100400"


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="shim-drill-input-"))
    model = FakeRealtime(Script(replies=["Thanks for waiting."], audio_ms_per_char=20))
    await model.start()
    http_port, media_port = free_port(), free_port()
    env = serve_env(model.url, http_port, media_port, work / "data", assistants=REPO / "assistants", assistant="demo")
    env.pop("DATABASE_URL", None)
    server = await start_serve(env, http_port, media_port)
    checks: dict[str, bool] = {}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            a = await place_call(http, env, "+15550100401", SHIM_NUMBER)
            b = await place_call(http, env, "+15550100402", SHIM_NUMBER)
            for _ in range(2):
                await model.wait_for_session()

            async def talk() -> None:  # call A: the line stays open, the greeting plays
                await keep_line_open(a, a.wait_for_audio(1, timeout=15))
                await keep_line_open(a, a.wait_until_played(timeout=20))

            async def flood() -> float:
                t0 = time.monotonic()
                ws = b._ws
                for i in range(10_000):
                    await ws.send(orjson.dumps({"event": "media", "streamSid": b.stream_sid, "media": {
                        "track": "inbound", "timestamp": str(i * 20), "payload": "@@ not base64 @@"}}), text=True)
                await ws.send(b"\x00\x01 binary")
                await ws.send("{not json", text=True)
                await ws.send(orjson.dumps({"event": "start", "start": {"streamSid": b.stream_sid, "callSid": a.call_sid,
                                                                          "customParameters": {}}}), text=True)
                return time.monotonic() - t0

            _, flood_s = await asyncio.gather(talk(), flood())
            print(f"== call B sent 10,003 bad frames in {flood_s:.2f} s while call A was greeted")

            forged = TwilioCaller(a.media_url, AUTH_TOKEN, call_sid=a.call_sid,
                                  custom_parameters=dict(a.custom_parameters, token="0" * 32, **{"from": "+16660000000"}))
            sessions_before = model.connections_attempted
            await forged.connect()
            await forged.wait_closed(timeout=10)
            await asyncio.sleep(0.5)
            forged_sessions = model.connections_attempted - sessions_before
            huge = await place_call(http, env, "+15550100403", SHIM_NUMBER)
            t0 = time.monotonic()
            await huge._ws.send("x" * 1_000_000, text=True)
            await huge.wait_closed(timeout=10)
            print(f"== forged start refused; 1 MB frame closed its stream (code {huge.close_code}) in "
                  f"{(time.monotonic() - t0) * 1000:.0f} ms")

            proc = psutil.Process(server.pid)
            rss_before = proc.memory_info().rss

            async def body():
                chunk = b"x" * (1 << 20)
                for _ in range(200):
                    yield chunk

            t0 = time.monotonic()
            try:
                status = (await http.post(f"{env['PUBLIC_URL']}/twilio/voice", content=body(),
                                          headers={"Content-Type": "application/x-www-form-urlencoded"})).status_code
            except httpx.HTTPError as exc:  # the server may close before the client finished sending
                status = type(exc).__name__
            big_s = time.monotonic() - t0
            rss_after = proc.memory_info().rss
            print(f"== unsigned 200 MB POST: {status} after {big_s:.2f} s; server RSS {rss_before / 2**20:.0f} -> "
                  f"{rss_after / 2**20:.0f} MiB")
            checks["200 MB body refused, RSS grew < 20 MiB"] = status in (413, "RemoteProtocolError", "WriteError",
                                                                         "ReadError") and rss_after - rss_before < 20 * 2**20

            await keep_line_open(a, a.send_silence(400))
            checks["call A still up"] = not a.closed and not b.closed
            for c in (a, b):
                await c.stop()
            await asyncio.sleep(1.0)
    finally:
        await stop_serve(server)
        await model.stop()

    async def read(conn):
        rejected = await conn.fetch("SELECT detail FROM call_events WHERE call_sid = $1 AND kind = 'twilio_frames_rejected'",
                                    b.call_sid)
        return rejected, await conn.fetchrow("SELECT from_number, ended_reason FROM calls WHERE call_sid = $1", a.call_sid)

    try:
        rejected, row_a = await read_stopped_db(work / "data", read)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    heard = bytes(a.received_audio)
    model_said = [b"".join(bytes(v) for v in s.audio_out.values()) for s in model.sessions]
    checks["nothing invalid reached the model"] = model.validation_errors == []
    checks["B's bad frames: one call_events row"] = (len(rejected) == 1
                                                    and orjson.loads(rejected[0]["detail"])["count"] >= 10_002)
    checks["A's row untouched by the forged start"] = row_a is not None and row_a["from_number"] == "+15550100401" \
        and row_a["ended_reason"] == "customer-ended-call"
    # the demo assistant plays the office ambience under the voice: same length, other bytes
    checks["A heard all of its greeting"] = bool(heard) and len(heard) in {len(m) for m in model_said}
    checks["no model session for the forged start"] = forged_sessions == 0
    checks["huge frame closed with 1009"] = huge.close_code == 1009
    return report(checks)


if __name__ == "__main__":
    run_drill(main)
