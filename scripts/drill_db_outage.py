"""Fault drill: Postgres goes away during a call, and `shim serve` is killed with SIGKILL mid-outage.

Bounded, loopback only: an embedded PostgreSQL behind a TCP proxy (shim.testing.pg_proxy), the
stand-in Realtime model, a real `shim serve` subprocess, the simulated Twilio caller.

  1. `shim serve` starts with DATABASE_URL pointing at the proxy; a call is placed.
  2. The proxy cuts Postgres off; the call goes on (greeting, a question, the answer, hang-up).
  3. Once the call's rows are in the spool file, `shim serve` is killed with SIGKILL.
  4. Postgres comes back; `shim serve` is started again and replays the spool.
  5. The call's rows are counted in Postgres: every row written during the outage is there,
     once (idempotent writes: keyed upserts, call_events with client ids and ON CONFLICT).

Usage: .venv/bin/python scripts/drill_db_outage.py   (exit 0 when nothing was lost; ~30 s)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from xml.etree import ElementTree

import asyncpg
import httpx

from shim.db import resolve_dsn
from shim.testing import CALLER_QUESTION_TEXT, load_asset
from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.pg_proxy import PgProxy
from shim.testing.twilio_caller import TwilioCaller, incoming_call_params, keep_line_open, post_twilio_webhook
from shim.testing._serve import free_port

REPO = Path(__file__).resolve().parents[1]
AUTH_TOKEN = "drill-auth-token"
SHIM_NUMBER, CALLER = "+15550100300", "+15550100301"


def spool_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


async def start_serve(env: dict[str, str], http_port: int, media_port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "shim.cli", "serve", "--host", "127.0.0.1", "--port", str(http_port),
         "--media-port", str(media_port)], env=env, stdout=subprocess.DEVNULL,
        # SHIM_DRILL_LOG=FILE keeps the server's log (stderr) for a drill that fails
        stderr=open(os.environ["SHIM_DRILL_LOG"], "ab") if os.environ.get("SHIM_DRILL_LOG") else subprocess.DEVNULL,
    )
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{http_port}/healthz")).status_code == 200:
                    return server
            if server.poll() is not None:
                raise SystemExit("shim serve exited during start-up")
            await asyncio.sleep(0.1)
    server.kill()
    raise SystemExit("shim serve did not start within 30 s")


def serve_env(model_url: str, http_port: int, media_port: int, data_dir: Path, *, assistants: Path,
              assistant: str, log_level: str = os.environ.get("SHIM_DRILL_LOG_LEVEL", "warning"), **extra: str) -> dict[str, str]:
    """The environment of a drill's `shim serve`: stand-in model, loopback URLs, the stand-in tool
    servers allowed (they listen on loopback), no post-call analysis reachable."""
    return dict(
        os.environ,
        OPENAI_API_KEY="sk-drill", OPENAI_REALTIME_URL=model_url, TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        PUBLIC_URL=f"http://127.0.0.1:{http_port}", PUBLIC_MEDIA_URL=f"ws://127.0.0.1:{media_port}/twilio/media",
        SHIM_DATA_DIR=str(data_dir), SHIM_ASSISTANTS_DIR=str(assistants), SHIM_DEFAULT_ASSISTANT=assistant,
        SHIM_LOG_LEVEL=log_level, SHIM_TOOL_URL_ALLOW="127.0.0.1", OPENAI_BASE_URL="http://127.0.0.1:9/v1",
        SHIM_WORKERS="1",  # the drills kill and read the spool of the one serving process
        **extra,
    )


async def stop_serve(server: subprocess.Popen) -> None:
    """SIGTERM (the drain), then SIGKILL if it has not exited in 30 s."""
    server.terminate()
    try:
        await asyncio.to_thread(server.wait, 30)
    except subprocess.TimeoutExpired:
        server.kill()


def report(checks: dict[str, bool]) -> int:
    """Print each check; the drill's exit code: 0 when all passed."""
    for name, ok in checks.items():
        print(f"   {'ok ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


async def place_call(http: httpx.AsyncClient, env: dict[str, str], caller_number: str, shim_number: str,
                     call_sid: str | None = None) -> TwilioCaller:
    """What Twilio does for an incoming call: the signed /twilio/voice, then the <Stream> it
    answered, with its <Parameter>s."""
    call_sid = call_sid or "CA" + uuid.uuid4().hex
    params = incoming_call_params(call_sid, caller_number, shim_number, "AC" + "0" * 32)
    twiml = (await post_twilio_webhook(http, f"{env['PUBLIC_URL']}/twilio/voice", params, AUTH_TOKEN)).text
    stream = ElementTree.fromstring(twiml).find("./Connect/Stream")
    custom = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    caller = TwilioCaller(stream.attrib["url"], AUTH_TOKEN, custom_parameters=custom, call_sid=call_sid)
    await caller.connect()
    return caller


async def read_stopped_db(data_dir: Path, read):
    """After `shim serve` stopped: start its embedded Postgres on `data_dir`, `await read(conn)`, stop it."""
    dsn, embedded = resolve_dsn("", data_dir)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            return await read(conn)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()


def run_drill(main) -> None:
    started = time.monotonic()
    code = asyncio.run(main())
    print(f"(drill took {time.monotonic() - started:.1f} s)")
    sys.exit(code)


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="shim-drill-db-"))
    dsn, embedded = resolve_dsn("", work / "pg")
    proxy = PgProxy.from_dsn(dsn)
    await proxy.start()
    model = FakeRealtime(Script(replies=["On Saturdays we are open from nine until one."],
                                user_transcripts=[CALLER_QUESTION_TEXT], audio_ms_per_char=20))
    await model.start()
    http_port, media_port = free_port(), free_port()
    data_dir = work / "data"
    env = serve_env(model.url, http_port, media_port, data_dir, assistants=REPO / "assistants", assistant="demo",
                    DATABASE_URL=proxy.dsn_for(dsn))
    spool = data_dir / "spool.jsonl"
    server = await start_serve(env, http_port, media_port)
    call_sid = "CA" + uuid.uuid4().hex
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await proxy.pause()
            outage_at = time.monotonic()
            print("== Postgres cut off; placing the call")
            caller = await place_call(http, env, CALLER, SHIM_NUMBER, call_sid)
            session = await model.wait_for_session()
            await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
            await keep_line_open(caller, caller.wait_until_played(timeout=20))
            await caller.send_audio(load_asset("caller_question"))
            await keep_line_open(caller, session.wait_sent("response.done", count=2, timeout=15))
            await keep_line_open(caller, caller.wait_until_played(timeout=20))
            await caller.stop()
            await asyncio.wait_for(session.closed.wait(), 10)
            for _ in range(100):  # the last rows of the call reach the spool (fsync'd)
                before = spool_rows(spool)
                await asyncio.sleep(0.2)
                if before and spool_rows(spool) == before:
                    break
        spooled = spool_rows(spool)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        print(f"== shim serve killed with SIGKILL {time.monotonic() - outage_at:.1f} s into the outage; "
              f"{spooled} rows in {spool.name}")
        saved = work / "spool.at-kill.jsonl"
        shutil.copyfile(spool, saved)
        await proxy.resume()
        server = await start_serve(env, http_port, media_port)
        for _ in range(300):
            if not spool.exists():
                break
            await asyncio.sleep(0.1)
        replayed = not spool.exists()
        conn = await asyncpg.connect(dsn)
        try:
            counts = {
                table: await conn.fetchval(f"SELECT count(*) FROM {table} WHERE call_sid = $1", call_sid)
                for table in ("calls", "utterances", "call_events", "webhook_deliveries")
            }
            call = await conn.fetchrow("SELECT ended_reason, from_number FROM calls WHERE call_sid = $1", call_sid)
            roles = [r["role"] for r in await conn.fetch(
                "SELECT role FROM utterances WHERE call_sid = $1 ORDER BY started_at, seq", call_sid)]
        finally:
            await conn.close()
        # What the spool held at the kill, key by key: each must be in Postgres exactly once.
        import orjson

        keys = set()
        for line in saved.read_bytes().splitlines():
            op, table, cols, _keep, vals = orjson.loads(line)
            if table in ("utterances", "call_events", "calls"):
                row = dict(zip(cols, vals))
                keys.add((table, row.get("seq") or row.get("id") or row["call_sid"]))
        expected = {t: len({k for k in keys if k[0] == t}) for t in ("calls", "utterances", "call_events")}
        print(f"== after restart: spool replayed={replayed}; rows for the call: {counts}")
        print(f"   distinct rows the spool held: {expected}; call: {dict(call) if call else None}; turns: {roles}")
        ok = (replayed and call is not None and call["ended_reason"] == "customer-ended-call"
              and counts["utterances"] == expected["utterances"] >= 3
              and counts["call_events"] >= expected["call_events"] and spooled > 0)
        print("== RESULT:", "nothing lost, nothing duplicated" if ok else "ROWS LOST OR DUPLICATED")
        return 0 if ok else 1
    finally:
        if server.poll() is None:
            await stop_serve(server)
        await model.stop()
        await proxy.stop()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_drill(main)
