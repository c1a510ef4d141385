"""`shim serve` as deployed: one public port routed by path, /readyz, private /metrics, and the
SIGTERM drain (readiness off at once, the port open for Twilio's callbacks, live calls finish,
the rest end with the apology inside SHIM_DRAIN_TIMEOUT). The server is a real subprocess; the
model and Twilio are the stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import asyncpg
import httpx
import pytest

from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.twilio_caller import TwilioCaller, incoming_call_params, keep_line_open, post_twilio_webhook
from shim.testing._serve import free_port

REPO = Path(__file__).resolve().parents[1]
AUTH_TOKEN = "serve-test-token"
ACCOUNT_SID = "AC" + "0" * 32
CALLER, SHIM_NUMBER = "+15550001111", "+15550002222"


@dataclass
class Served:
    proc: subprocess.Popen
    base: str
    http: httpx.AsyncClient
    fake: FakeRealtime

    async def post(self, path: str, params: dict[str, str]) -> httpx.Response:
        return await post_twilio_webhook(self.http, self.base + path, params, AUTH_TOKEN)

    async def call(self) -> tuple[TwilioCaller, dict[str, str]]:
        return await greeted_call(self.http, self.base, greeting_timeout=10)

    def terminate(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def exit_code(self, timeout: float) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)


async def greeted_call(http: httpx.AsyncClient, base: str, *, greeting_timeout: float) -> tuple[TwilioCaller, dict[str, str]]:
    """Twilio's side of an incoming call: the signed voice webhook, the <Stream> it answered,
    then the line kept open until the greeting is heard."""
    call_sid = "CA" + uuid.uuid4().hex
    params = incoming_call_params(call_sid, CALLER, SHIM_NUMBER, ACCOUNT_SID)
    twiml = (await post_twilio_webhook(http, base + "/twilio/voice", params, AUTH_TOKEN)).text
    stream = ElementTree.fromstring(twiml).find("./Connect/Stream")
    assert stream is not None, twiml
    custom = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    caller = TwilioCaller(stream.attrib["url"], AUTH_TOKEN, custom_parameters=custom, call_sid=call_sid,
                          account_sid=ACCOUNT_SID)
    await caller.connect()
    await keep_line_open(caller, caller.wait_for_audio(1, timeout=greeting_timeout))
    return caller, params


def serve_test_env(tmp_path: Path, dsn: str, model_url: str, port: int, **env: str) -> dict[str, str]:
    """The environment of a `shim serve` under test: the stand-in model, loopback URLs, the demo
    assistant, and nothing inherited that could point it elsewhere."""
    assistants = tmp_path / "assistants"
    assistants.mkdir(exist_ok=True)
    (assistants / "demo.json").write_bytes((REPO / "assistants" / "demo.json").read_bytes())
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "TWILIO_", "OPENAI_", "PUBLIC_"))},
        "OPENAI_API_KEY": "sk-test", "OPENAI_REALTIME_URL": model_url, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_API_BASE": "http://127.0.0.1:9",
        "PUBLIC_URL": f"http://127.0.0.1:{port}", "DATABASE_URL": dsn, "SHIM_DEFAULT_ASSISTANT": "demo",
        "SHIM_ASSISTANTS_DIR": str(assistants), "SHIM_DATA_DIR": str(tmp_path / "data"), **env,
    }


@contextlib.asynccontextmanager
async def served(tmp_path: Path, dsn: str, **env: str):
    fake = FakeRealtime(Script(replies=["Sure."]))
    await fake.start()
    port = free_port()
    # one process, as these tests read it (tests/test_serve_workers.py: several)
    full = serve_test_env(tmp_path, dsn, fake.url, port, SHIM_LOG_LEVEL="warning", SHIM_LOG_FORMAT="console",
                          SHIM_WORKERS="1", **env)
    proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=full)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                assert proc.poll() is None, "shim serve exited during start-up"
                await asyncio.sleep(0.05)
            yield Served(proc, f"http://127.0.0.1:{port}", http, fake)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await fake.stop()


async def row(dsn: str, call_sid: str):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow("SELECT status, ended_reason, next_action FROM calls WHERE call_sid = $1", call_sid)
    finally:
        await conn.close()


async def test_one_port_serves_webhooks_health_and_the_media_stream(tmp_path, db_dsn):
    async with served(tmp_path, db_dsn, SHIM_METRICS_TOKEN="scrape-me") as s:
        caller, params = await s.call()
        assert caller.media_url == f"{s.base.replace('http', 'ws')}/twilio/media"  # the same port
        ready = await s.http.get(s.base + "/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["ready"] is True and body["live_calls"] == 1 and body["model"]["ok"] is True
        assert body["database"]["state"] == "up"
        assert (await s.http.get(s.base + "/metrics")).status_code == 401
        wrong = await s.http.get(s.base + "/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        scraped = await s.http.get(s.base + "/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert scraped.status_code == 200 and "shim_active_calls 1.0" in scraped.text
        assert (await s.http.get(s.base + "/nothing-here")).status_code == 404
        await caller.stop()


async def test_metrics_on_a_private_port_only(tmp_path, db_dsn):
    metrics_port = free_port()
    async with served(tmp_path, db_dsn, SHIM_METRICS_PORT=str(metrics_port)) as s:
        assert (await s.http.get(s.base + "/metrics")).status_code == 404
        private = await s.http.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert private.status_code == 200 and "shim_frames_relayed" in private.text


async def test_sigterm_stops_taking_calls_keeps_the_port_open_and_lets_live_calls_finish(tmp_path, db_dsn):
    async with served(tmp_path, db_dsn, SHIM_DRAIN_TIMEOUT="60") as s:
        caller, params = await s.call()
        s.terminate()
        await asyncio.sleep(0.5)
        ready = await s.http.get(s.base + "/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        # The live call goes on: the caller talks, the model answers.
        before = len(caller.received_audio)
        await caller.send_silence(200)
        assert not caller.closed and s.proc.poll() is None
        await caller.stop()  # the caller hangs up during the drain
        # Twilio's callbacks for it still reach the shim.
        ended = await s.post("/twilio/stream-ended", params)
        assert ended.status_code == 200 and "<Hangup" in ended.text and "<Say" not in ended.text
        status = await s.post("/twilio/status", {"CallSid": caller.call_sid, "CallStatus": "completed"})
        assert status.status_code == 204
        # No live call left: the process exits at once, not at the drain limit.
        started = time.monotonic()
        assert await s.exit_code(timeout=20) == 0
        assert time.monotonic() - started < 15
        assert before >= 1
    stored = await row(db_dsn, caller.call_sid)
    assert stored["ended_reason"] == "customer-ended-call" and stored["status"] == "completed"


async def test_calls_still_live_at_the_drain_limit_hear_the_apology_and_nothing_is_lost(tmp_path, db_dsn):
    # SHIM_DRAIN_TIMEOUT=4: live calls get 3 s (a quarter is kept for callbacks and rows).
    async with served(tmp_path, db_dsn, SHIM_DRAIN_TIMEOUT="4") as s:
        caller, params = await s.call()
        sigterm = s.terminate()
        await keep_line_open(caller, caller.wait_closed(timeout=10))
        cut_after = time.monotonic() - sigterm
        assert 2.5 < cut_after < 4.5, cut_after
        ended = await s.post("/twilio/stream-ended", params)  # the port is still open
        assert ended.status_code == 200 and "<Say>" in ended.text and "<Hangup" in ended.text
        await asyncio.sleep(0.2)  # Twilio says the apology, then reports the call completed
        status = await s.post("/twilio/status", {"CallSid": caller.call_sid, "CallStatus": "completed"})
        assert status.status_code == 204
        assert await s.exit_code(timeout=10) == 0
        assert time.monotonic() - sigterm < 4 + 2  # within the platform's kill timeout (+ process exit)
    stored = await row(db_dsn, caller.call_sid)
    assert stored["ended_reason"] == "worker-shutdown" and stored["status"] == "completed"


@pytest.mark.parametrize("timeout", ["0"])
async def test_a_zero_drain_ends_calls_at_once_but_still_cleanly(tmp_path, db_dsn, timeout):
    async with served(tmp_path, db_dsn, SHIM_DRAIN_TIMEOUT=timeout) as s:
        caller, _params = await s.call()
        s.terminate()
        await keep_line_open(caller, caller.wait_closed(timeout=10))
        assert await s.exit_code(timeout=15) == 0
    assert (await row(db_dsn, caller.call_sid))["ended_reason"] == "worker-shutdown"


async def test_the_starlette_media_fallback_gets_the_same_drain(tmp_path, db_dsn):
    """Media through Starlette's WebSocket route (the portable ASGI path) is drained like picows:
    no 1012 at SIGTERM, the apology, `worker-shutdown`, and the port open for stream-ended."""
    import uvicorn

    from shim.app import create_app
    from shim.config import Config
    from shim.serve import DrainingServer, FrontDoor

    fake = FakeRealtime(Script())
    await fake.start()
    port = free_port()
    assistants = tmp_path / "assistants"
    assistants.mkdir()
    (assistants / "demo.json").write_bytes((REPO / "assistants" / "demo.json").read_bytes())
    config = Config(openai_api_key="sk-test", openai_realtime_url=fake.url, twilio_auth_token=AUTH_TOKEN,
                    public_url=f"http://127.0.0.1:{port}", database_url=db_dsn, data_dir=tmp_path / "data",
                    assistants_dir=assistants, default_assistant="demo", log_format="console", drain_timeout_s=2,
                    openai_base_url="http://127.0.0.1:9/v1", twilio_api_base="http://127.0.0.1:9")
    app = create_app(config, media_host="127.0.0.1")
    front = FrontDoor()
    front.bind("127.0.0.1", port)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None,
                                           ws="websockets-sansio"),
                            app.state.shim, front, media_via_picows=False)
    task = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(300):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.02)
            s = Served(proc=None, base=f"http://127.0.0.1:{port}", http=http, fake=fake)  # type: ignore[arg-type]
            caller, params = await s.call()
            server.handle_exit(signal.SIGTERM, None)  # what the platform's SIGTERM does
            assert (await http.get(s.base + "/readyz")).status_code == 503
            await keep_line_open(caller, caller.wait_closed(timeout=10))
            assert caller.close_code != 1012
            ended = await s.post("/twilio/stream-ended", params)
            assert ended.status_code == 200 and "<Say>" in ended.text
        await asyncio.wait_for(task, 15)
    finally:
        if not task.done():
            server.force_exit = server.should_exit = True
            await asyncio.wait_for(task, 15)
        await fake.stop()
    assert (await row(db_dsn, caller.call_sid))["ended_reason"] == "worker-shutdown"


def test_the_image_smoke_script_passes_against_the_local_server():
    """scripts/docker_smoke.py --local: the steps `make docker-smoke` runs against the image
    (CI has no docker), so the script itself cannot rot."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "docker_smoke.py"), "--local"], cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "smoke test passed" in out.stdout


async def test_the_front_door_routes_by_path_even_when_the_request_line_comes_in_pieces():
    from shim.serve import FrontDoor, request_path

    assert request_path(b"GET /twilio/media?x=1 HTTP/1.1\r\nHost: a\r\n") == b"/twilio/media"
    assert request_path(b"GET /twilio/media/ HTTP/1.1\r\n") == b"/twilio/media"
    assert request_path(b"POST /twilio/voice HTTP/1.1\r\n") == b"/twilio/voice"
    assert request_path(b"GET /twilio/me") is None

    seen: dict[str, bytes] = {}

    class Recorder(asyncio.Protocol):
        def __init__(self, name: str):
            self.name = name

        def data_received(self, data: bytes) -> None:  # the whole request reaches the chosen protocol
            seen[self.name] = seen.get(self.name, b"") + data

    front = FrontDoor()
    front.bind("127.0.0.1", 0)
    front.start(lambda: Recorder("http"), lambda: Recorder("media"))
    try:
        for path, pieces in ((b"/twilio/media", 3), (b"/twilio/voice", 1)):
            _reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            request = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            step = len(request) // pieces + 1
            for i in range(0, len(request), step):
                writer.write(request[i:i + step])
                await writer.drain()
                await asyncio.sleep(0.02)
            for _ in range(100):
                if any(v.endswith(b"\r\n\r\n") and path in v for v in seen.values()):
                    break
                await asyncio.sleep(0.01)
            writer.close()
        assert seen["media"].startswith(b"GET /twilio/media HTTP/1.1\r\n")
        assert seen["http"].startswith(b"GET /twilio/voice HTTP/1.1\r\n")
        assert front.routed == {"media": 1, "http": 1, "dropped": 0}
        _reader, writer = await asyncio.open_connection("127.0.0.1", front.port)  # says nothing, hangs up
        writer.close()
        for _ in range(100):
            if front.routed["dropped"]:
                break
            await asyncio.sleep(0.01)
        assert front.routed == {"media": 1, "http": 1, "dropped": 1} and set(seen) == {"media", "http"}
    finally:
        await front.close()
