"""`shim serve --workers 2` as a real subprocess: both workers take calls on the one port, a
scrape of /metrics (whichever worker answers) reports the totals of both, a killed worker is
restarted without the totals going down, and SIGTERM drains every worker and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shim.testing._serve import free_port
from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.twilio_caller import TwilioCaller, post_twilio_webhook

from .test_serve import AUTH_TOKEN, greeted_call, serve_test_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT load balancing is Linux's")



def samples(text: str | bytes) -> dict[tuple, float]:
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}


def value(text: str | bytes, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


class Workers:
    def __init__(self, proc: subprocess.Popen, log_path: Path, port: int, http: httpx.AsyncClient):
        self.proc, self.log_path, self.port, self.http = proc, log_path, port, http
        self.base = f"http://127.0.0.1:{port}"

    def lines(self) -> list[dict]:
        out = []
        for raw in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                line = orjson.loads(raw)
                if isinstance(line, dict):
                    out.append(line)
        return out

    def events(self, event: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == event]

    async def wait_for(self, predicate, what: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (found := predicate()):
                return found
            assert self.proc.poll() is None, f"shim serve exited ({self.proc.returncode}) waiting for {what}"
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; log:\n{self.log_path.read_text()[-3000:]}")

    @property
    def run_dir(self) -> Path:
        return Path(self.events("workers_starting")[0]["run_dir"])

    def snapshots(self, kind: str = "metrics") -> dict[int, str]:
        """Each live worker's own metrics (the files the scrape sums), by worker index."""
        return {int(p.name.split(".")[1][1:]): p.read_text() for p in self.run_dir.glob(f"{kind}.w*.prom")}

    async def scrape(self) -> str:
        # A new connection each time (no keep-alive): the kernel picks the worker anew.
        async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            response = await fresh.get(self.base + "/metrics")
        assert response.status_code == 200
        return response.text

    async def call(self) -> tuple[TwilioCaller, dict[str, str]]:
        return await greeted_call(self.http, self.base, greeting_timeout=15)


@contextlib.asynccontextmanager
async def workers(tmp_path: Path, dsn: str, count: int = 2, **env: str):
    fake = FakeRealtime(Script(replies=["Sure."]))
    await fake.start()
    port = free_port()
    full = serve_test_env(tmp_path, dsn, fake.url, port, SHIM_LOG_LEVEL="info", SHIM_LOG_FORMAT="json", **env)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(count)], env=full, stdout=subprocess.DEVNULL, stderr=log)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            served = Workers(proc, log_path, port, http)
            await served.wait_for(lambda: len({e["worker"] for e in served.events("listening")}) == count,
                                  f"{count} workers listening", timeout=60)
            yield served
    finally:
        if proc.poll() is None:
            proc.kill()  # (the workers follow: PR_SET_PDEATHSIG)
            proc.wait()
        await fake.stop()


async def test_two_workers_share_the_port_sum_their_metrics_survive_a_crash_and_drain(tmp_path, db_dsn):
    async with workers(tmp_path, db_dsn, SHIM_DRAIN_TIMEOUT="20") as s:
        # Calls until both workers carry some (the kernel spreads connections by a hash of the
        # client's port: usually a handful; 2^-23 odds of needing more than 24).
        callers = []
        while len(callers) < 24:
            callers += [c for c, _ in await asyncio.gather(*(s.call() for _ in range(4)))]
            await asyncio.sleep(1.2)  # a fresh snapshot from each worker
            per_worker = {w: value(text, "shim_active_calls") for w, text in s.snapshots().items()}
            if len(per_worker) == 2 and all(per_worker.values()):
                break
        assert sum(per_worker.values()) == len(callers) and all(per_worker.values()), per_worker

        # Any worker's answer counts both workers' live calls (each alone has only its own).
        for _ in range(4):
            assert value(await s.scrape(), "shim_active_calls") == len(callers)

        await asyncio.gather(*(c.stop() for c in callers))
        await asyncio.sleep(1.5)  # the calls' ends reach each worker's snapshot
        own = s.snapshots()
        served_calls = {w: sum(v for (name, _), v in samples(text).items() if name == "shim_calls_total")
                        for w, text in own.items()}
        assert sum(served_calls.values()) == len(callers) and all(served_calls.values()), served_calls
        scraped = await s.scrape()
        for name, labels in [("shim_frames_relayed_total", {"direction": "caller_to_model"}),
                             ("shim_frames_relayed_total", {"direction": "model_to_caller"}),
                             ("shim_turn_latency_seconds_count", {})]:
            assert value(scraped, name, **labels) == sum(value(t, name, **labels) for t in own.values()), name
        assert value(scraped, "shim_frames_relayed_total", direction="caller_to_model") > 0
        assert sum(v for (name, _), v in samples(scraped).items() if name == "shim_calls_total") == len(callers)

        # A worker killed outright is restarted (same index: its spool); its counts stay in the totals.
        victim = s.events("worker_started")[1]
        os.kill(victim["pid"], signal.SIGKILL)
        await s.wait_for(lambda: s.events("worker_died"), "the parent to see the worker die")
        died = s.events("worker_died")[0]
        assert died["worker"] == victim["worker"] and died["exit"] == "killed by SIGKILL"
        await s.wait_for(lambda: len(s.events("worker_started")) == 3, "the restart")
        await s.wait_for(lambda: sum(e["worker"] == victim["worker"] for e in s.events("listening")) == 2,
                         "the new worker listening")
        assert s.events("worker_started")[2]["worker"] == victim["worker"]
        for _ in range(4):
            scraped = await s.scrape()
            assert sum(v for (name, _), v in samples(scraped).items() if name == "shim_calls_total") == len(callers)
            assert value(scraped, "shim_active_calls") == 0
        assert (await s.http.get(s.base + "/readyz")).status_code == 200

        # SIGTERM: every worker drains (readiness off everywhere), a live call finishes, and
        # its callbacks are answered by whichever worker gets them; then exit 0.
        caller, params = await s.call()
        sigterm = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        await s.wait_for(lambda: len(s.events("drain_started")) == 2, "both workers draining")
        for _ in range(4):
            async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
                ready = await fresh.get(s.base + "/readyz")
            assert ready.status_code == 503 and ready.json()["draining"] is True
        await caller.send_silence(200)
        assert not caller.closed
        await caller.stop()
        ended = await post_twilio_webhook(s.http, s.base + "/twilio/stream-ended", params, AUTH_TOKEN)
        assert ended.status_code == 200 and "<Hangup" in ended.text and "<Say" not in ended.text
        status = await post_twilio_webhook(s.http, s.base + "/twilio/status",
                                           {"CallSid": caller.call_sid, "CallStatus": "completed"}, AUTH_TOKEN)
        assert status.status_code == 204
        assert await asyncio.to_thread(s.proc.wait, 20) == 0
        # Not at the drain limit (15 s of calls + callbacks): the answers were shared.
        assert time.monotonic() - sigterm < 10
        exited = s.events("worker_exited")
        assert sorted(e["worker"] for e in exited) == [0, 1] and all(e["exit"] == "exit 0" for e in exited)
        assert not s.run_dir.exists()  # the parent cleaned up
    conn = await asyncpg.connect(db_dsn)
    try:
        stored = await conn.fetchrow("SELECT status, ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
        ended_calls = await conn.fetchval("SELECT count(*) FROM calls WHERE ended_reason = 'customer-ended-call'")
    finally:
        await conn.close()
    assert stored["ended_reason"] == "customer-ended-call" and stored["status"] == "completed"
    assert ended_calls == len(callers) + 1  # every worker's rows reached Postgres


@pytest.mark.parametrize("raw", ["0", "-2", "two", "100000"])
def test_a_bad_worker_count_is_named_with_what_was_expected(raw, capsys):
    from shim.cli import build_parser
    from shim.config import Config

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--workers", raw])
    assert exited.value.code == 2
    assert f"argument --workers: {raw!r}: expected a positive number of worker processes (1-256)" in capsys.readouterr().err
    problems = Config.from_env({"SHIM_WORKERS": raw}, strict=False).parse_problems
    assert problems == (f"SHIM_WORKERS={raw!r}: expected a positive number of worker processes (1-256)",)


def test_shim_workers_invalid_exits_2_before_anything_starts(tmp_path):
    env = {**os.environ, "SHIM_WORKERS": "0", "SHIM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "shim.cli", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "SHIM_WORKERS='0': expected a positive number" in done.stderr
    assert not (tmp_path / "pgdata").exists()


def test_the_totals_keep_a_retired_workers_counts_but_not_its_gauges(monkeypatch):
    from shim import metrics

    monkeypatch.setattr(metrics, "PER_WORKER_GAUGES", {"shim_loop_lag_seconds"})

    def text(calls: float, active: float, lag: float, le1: float) -> bytes:
        return (f'# HELP shim_calls_total Calls\n# TYPE shim_calls_total counter\nshim_calls_total{{ended_reason="x"}} {calls}\n'
                f'shim_calls_created{{ended_reason="x"}} 1.7e9\n'
                f'# HELP shim_active_calls Live\n# TYPE shim_active_calls gauge\nshim_active_calls {active}\n'
                f'# HELP shim_loop_lag_seconds Lag\n# TYPE shim_loop_lag_seconds gauge\nshim_loop_lag_seconds {lag}\n'
                f'# HELP shim_turn_seconds Turns\n# TYPE shim_turn_seconds histogram\nshim_turn_seconds_bucket{{le="1.0"}} {le1}\n'
                f'shim_turn_seconds_bucket{{le="+Inf"}} {le1 + 1}\nshim_turn_seconds_count {le1 + 1}\nshim_turn_seconds_sum 2.5\n').encode()

    merged = metrics.merge_expositions([("0", True, text(2, 3, 0.01, 4)), ("1", True, text(5, 1, 0.2, 1)),
                                        ("1", False, text(7, 9, 9.0, 2))])  # worker 1's predecessor
    assert value(merged, "shim_calls_total", ended_reason="x") == 2 + 5 + 7
    assert value(merged, "shim_active_calls") == 3 + 1  # the dead worker's calls are not live
    assert value(merged, "shim_loop_lag_seconds", worker="0") == 0.01  # per worker, not summed
    assert value(merged, "shim_loop_lag_seconds", worker="1") == 0.2
    assert value(merged, "shim_turn_seconds_bucket", le="1.0") == 4 + 1 + 2
    assert value(merged, "shim_turn_seconds_count") == 5 + 2 + 3
    assert b"_created" not in merged  # a creation time summed would mean nothing


async def test_spools_of_workers_that_no_longer_run_are_replayed_once(tmp_path, db_dsn):
    from shim.store import Recorder, orphan_spools, replay_orphan_spools, spool_path

    assert spool_path(tmp_path, 0).name == "spool.jsonl"  # worker 0 and the single process share it
    # Last time, four workers ran and worker 3 spooled rows while Postgres was away.
    down = Recorder("postgresql://shim@127.0.0.1:9/none", spool_path=spool_path(tmp_path, 3), connect_timeout=0.2)
    await down.start()
    for i in range(5):
        down.upsert("calls", {"call_sid": f"CA-orphan-{i}", "status": "ringing"})
    await down.close(timeout=0.2)
    assert down.spooled == 5
    spool_path(tmp_path, 1).write_bytes(b"")  # index 1 still runs: its spool is its own
    assert orphan_spools(tmp_path, 0, 2) == [] and orphan_spools(tmp_path, 1, 2) == [spool_path(tmp_path, 3)]
    assert orphan_spools(tmp_path, 0, 1) == [spool_path(tmp_path, 1), spool_path(tmp_path, 3)]  # one process: all
    await asyncio.wait_for(replay_orphan_spools(db_dsn, orphan_spools(tmp_path, 1, 2)), 15)
    assert not spool_path(tmp_path, 3).exists()
    conn = await asyncpg.connect(db_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM calls WHERE call_sid LIKE 'CA-orphan-%'") == 5
    finally:
        await conn.close()


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", 8), ("150000 100000\n", 2), ("50000 100000\n", 1), (None, 8)])
def test_the_default_is_one_worker_per_usable_core(cpu_max, expected, tmp_path, monkeypatch):
    from shim import config

    monkeypatch.setattr(config.os, "sched_getaffinity", lambda _pid: set(range(8)))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    monkeypatch.setattr(config, "CGROUP_CPU_MAX", path)
    assert config.default_workers() == expected  # `docker run --cpus 1.5` on 8 cores: 2 workers


async def test_workers_of_a_killed_parent_drain_and_leave_nothing_behind(tmp_path, db_dsn):
    async with workers(tmp_path, db_dsn, SHIM_DRAIN_TIMEOUT="5") as s:
        run_dir = s.run_dir
        pids = [e["pid"] for e in s.events("worker_started")]
        s.proc.kill()  # SIGKILL: the parent cannot forward anything
        s.proc.wait()
        await asyncio.sleep(0.2)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "a worker outlived its parent"
        assert len(s.events("drain_done")) == 2  # each drained (PR_SET_PDEATHSIG sent SIGTERM)
        assert not run_dir.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_live_call_is_claimed_across_workers_and_freed_when_it_or_its_worker_ends(tmp_path):
    from shim.workers import LiveCalls, release_worker_calls

    a, b = LiveCalls(tmp_path, 0), LiveCalls(tmp_path, 1)
    sid = "CA" + "1" * 32
    assert a.claim(sid)
    assert not b.claim(sid)  # a replayed start landing on the other worker is refused
    b.release(sid)  # not b's to release
    assert not b.claim(sid)
    a.release(sid)
    assert b.claim(sid)  # the call ended: a later stream for it may start
    release_worker_calls(tmp_path, 1)  # worker 1 exited: its calls ended with it
    assert a.claim(sid)
    assert not a.claim("../../etc/passwd") and not a.claim("")  # never a path
