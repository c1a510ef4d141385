"""Smoke test of the production image: `docker build`, then the container serves one simulated
call end to end, and drains on `docker stop`.

    make docker-smoke            # or: .venv/bin/python scripts/docker_smoke.py [--no-build]
    .venv/bin/python scripts/docker_smoke.py --local   # the same checks against `shim serve`
                                                       # from this venv (what CI runs; no docker)

Needs docker on Linux (`--network host`: the container reaches the stand-ins on 127.0.0.1 and
they reach it). Runs a throwaway `postgres:16-alpine` container for DATABASE_URL (the image has
no embedded PostgreSQL), the stand-in Realtime model from shim/testing, and plays Twilio with
the simulated caller: /healthz, /readyz, the signed voice webhook, the media stream on the SAME
port (wss path routing), the greeting heard, hang-up, the status callback, then SIGTERM and a
clean exit with the call row in Postgres. Exit 0 on success, 1 on any failed step.
"""

from __future__ import annotations

import argparse
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

from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.twilio_caller import TwilioCaller, incoming_call_params, keep_line_open, post_twilio_webhook
from shim.testing._serve import free_port

REPO = Path(__file__).resolve().parents[1]
IMAGE = "shim:smoke"
AUTH_TOKEN = "smoke-auth-token"
ACCOUNT_SID = "AC" + "0" * 32
CALLER, SHIM_NUMBER = "+15550100999", "+15550100200"


def step(text: str) -> None:
    print(f"== {text}", flush=True)


def docker(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, text=True, capture_output=capture)


async def wait_http(http: httpx.AsyncClient, url: str, alive, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = await http.get(url)
            if response.status_code in (200, 503):
                return response
        if not alive():
            raise SystemExit(f"the server exited before {url} answered")
        await asyncio.sleep(0.25)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


@contextlib.asynccontextmanager
async def postgres(local: bool):
    """DATABASE_URL for the server: a throwaway postgres container, or (--local) the embedded wheel."""
    if local:
        from shim.db import resolve_dsn

        data = REPO / ".shim" / "smoke"
        dsn, embedded = await asyncio.to_thread(resolve_dsn, "", data)
        try:
            yield dsn
        finally:
            await asyncio.to_thread(embedded.stop)
        return
    port = free_port()
    name = f"shim-smoke-pg-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--rm", "--name", name, "--network", "host", "-e", "POSTGRES_PASSWORD=smoke",
           "postgres:16-alpine", "-p", str(port))
    dsn = f"postgresql://postgres:smoke@127.0.0.1:{port}/postgres"
    try:
        for _ in range(120):
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await (await asyncpg.connect(dsn, timeout=2)).close()
                break
            await asyncio.sleep(0.5)
        else:
            raise SystemExit("postgres container did not start")
        yield dsn
    finally:
        docker("rm", "-f", name, check=False, capture=True)


async def smoke(local: bool) -> None:
    port = free_port()
    model = FakeRealtime(Script())
    await model.start()
    async with postgres(local) as dsn:
        env = {
            "OPENAI_API_KEY": "sk-smoke", "OPENAI_REALTIME_URL": model.url,
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # no post-call analysis leaves the machine
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_API_BASE": "http://127.0.0.1:9",
            "PUBLIC_URL": f"http://127.0.0.1:{port}", "DATABASE_URL": dsn, "PORT": str(port),
            "SHIM_DEFAULT_ASSISTANT": "demo", "SHIM_DRAIN_TIMEOUT": "20", "SHIM_LOG_LEVEL": "warning",
        }
        if local:
            env.update(SHIM_ASSISTANTS_DIR=str(REPO / "assistants"), SHIM_DATA_DIR=str(REPO / ".shim" / "smoke-data"))
            server = subprocess.Popen([sys.executable, "-m", "shim.cli", "serve", "--host", "127.0.0.1"],
                                      env={**os.environ, **env})
            alive, stop = (lambda: server.poll() is None), server.terminate

            def exit_code() -> int:
                return server.wait(30)
        else:
            name = f"shim-smoke-{uuid.uuid4().hex[:8]}"
            args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
            # /data as a fresh root-owned mount, as platform volumes come: the entrypoint must hand it over.
            docker("run", "-d", "--name", name, "--network", "host", "--mount", "type=tmpfs,destination=/data",
                   *args, IMAGE)

            def alive() -> bool:
                out = docker("inspect", "-f", "{{.State.Running}}", name, check=False, capture=True).stdout
                return out.strip() == "true"

            def stop() -> None:
                docker("stop", "-t", "30", name, check=False, capture=True)  # SIGTERM, then the drain

            def exit_code() -> int:
                code = int(docker("wait", name, capture=True).stdout.strip() or 1)
                print(docker("logs", "--tail", "20", name, check=False, capture=True).stderr, file=sys.stderr)
                docker("rm", "-f", name, check=False, capture=True)
                return code
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                base = env["PUBLIC_URL"]
                health = await wait_http(http, f"{base}/healthz", alive)
                assert health.status_code == 200, health.text
                ready = await http.get(f"{base}/readyz")
                step(f"/healthz ok; /readyz {ready.status_code} {ready.json()}")
                assert ready.status_code == 200 and ready.json()["ready"] is True
                if not local:  # the service runs unprivileged, and owns the data volume
                    status = docker("exec", name, "cat", "/proc/1/status", capture=True).stdout
                    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
                    owner = docker("exec", name, "stat", "-c", "%u", "/data", capture=True).stdout.strip()
                    assert uid == owner == "10001", (uid, owner)
                    step("PID 1 runs as uid 10001 (shim), which owns /data")

                call_sid = "CA" + uuid.uuid4().hex
                params = incoming_call_params(call_sid, CALLER, SHIM_NUMBER, ACCOUNT_SID)
                twiml = (await post_twilio_webhook(http, f"{base}/twilio/voice", params, AUTH_TOKEN)).text
                stream = ElementTree.fromstring(twiml).find("./Connect/Stream")
                assert stream is not None, twiml
                assert stream.attrib["url"] == f"ws://127.0.0.1:{port}/twilio/media", stream.attrib["url"]
                step(f"voice webhook answered <Stream url={stream.attrib['url']}> (the same port)")
                custom = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
                caller = TwilioCaller(stream.attrib["url"], AUTH_TOKEN, custom_parameters=custom, call_sid=call_sid,
                                      account_sid=ACCOUNT_SID)
                await caller.connect()
                await keep_line_open(caller, caller.wait_for_audio(1, timeout=15))
                step("media stream connected; the greeting is heard")
                await caller.send_silence(300)
                await caller.stop()
                answer = await post_twilio_webhook(http, f"{base}/twilio/stream-ended", params, AUTH_TOKEN)
                assert answer.status_code == 200 and "<Hangup" in answer.text, answer.text
                status = await post_twilio_webhook(http, f"{base}/twilio/status",
                                                   {"CallSid": call_sid, "CallStatus": "completed"}, AUTH_TOKEN)
                assert status.status_code == 204, status.text
                step("hang-up: /twilio/stream-ended and /twilio/status answered")
        finally:
            stop()
        code = await asyncio.to_thread(exit_code)
        step(f"SIGTERM: the server exited with {code}")
        assert code == 0, f"exit code {code}"
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow("SELECT assistant_id, ended_reason FROM calls WHERE call_sid = $1", call_sid)
        finally:
            await conn.close()
        assert row is not None and row["ended_reason"], row
        step(f"call row in Postgres: {dict(row)}")
    await model.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true", help="run `shim serve` from this venv instead of the image")
    parser.add_argument("--no-build", action="store_true", help="use the existing shim:smoke image")
    args = parser.parse_args()
    if not args.local and not args.no_build:
        step(f"docker build -t {IMAGE} .")
        docker("build", "-t", IMAGE, str(REPO))
    try:
        asyncio.run(smoke(args.local))
    except (AssertionError, SystemExit, subprocess.CalledProcessError) as exc:
        print(f"docker_smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    step("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
