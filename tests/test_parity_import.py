"""shim parity import-vapi: paging, 429, idempotence, rows; and the report over real traffic."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import asyncpg
import pytest

from shim.parity.vapi_client import VapiClient
from shim.parity.vapi_import import import_calls, map_call
from shim.testing.fake_vapi import FakeVapi
from shim.testing.fake_vapi_agent import vapi_call

T0 = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
KEY = "test-vapi-key"


def _calls(n: int, base_url: str, *, start: dt.datetime = T0) -> list[dict]:
    out = []
    for i in range(n):
        created = (start + dt.timedelta(minutes=10 * i)).timestamp() * 1000
        tools = [("check_availability", {"date": f"2026-12-0{1 + i % 3}"}, '{"slots": ["9am"]}')] if i % 2 == 0 else []
        out.append(vapi_call(f"vc-{i:03d}", created_ms=created, base_url=base_url, cost=0.2 + i / 100, turns=[
            {"role": "bot", "text": "Hi, this is Maya.", "ms": 1200},
            {"role": "user", "text": "Can I book a cleaning?", "ms": 1500, "gap_ms": 700},
            {"role": "bot", "text": "Sure, let me check.", "ms": 1000, "tools": tools},
        ]))
    return out


@pytest.fixture
async def fake():
    async with FakeVapi(api_key=KEY) as f:
        yield f


async def test_map_call_pairs_tools_and_measures_latency():
    call = _calls(1, "https://api.vapi.ai")[0]
    imported = map_call(call)
    assert imported.call["stack"] == "vapi" and imported.call["call_sid"] == "vc-000"
    assert imported.call["cost_usd"] == 0.2 and imported.call["costs"] == call["costs"]
    assert imported.call["stereo_recording_url"].endswith("/recording/vc-000.wav")
    assert [u["role"] for u in imported.utterances] == ["assistant", "user", "assistant"]
    # the bot message starts after the tool call (300 ms) + result (50 ms) following the 700 ms gap
    assert imported.utterances[2]["latency_ms"] == 700 + 350
    [tool] = imported.tool_calls
    assert tool["name"] == "check_availability" and tool["arguments"] == {"date": "2026-12-01"}
    assert tool["status"] == "ok" and tool["latency_ms"] == 300


async def test_import_pages_retries_429_and_is_idempotent(db_dsn, fake):
    for call in _calls(7, fake.base_url):
        fake.add_call(call)
    fake.add_call(vapi_call("vc-live", created_ms=(T0 + dt.timedelta(hours=2)).timestamp() * 1000, status="in-progress"))
    fake.add_call(vapi_call("vc-old", created_ms=(T0 - dt.timedelta(days=1)).timestamp() * 1000))
    fake.add_call(vapi_call("vc-other", created_ms=(T0 + dt.timedelta(hours=3)).timestamp() * 1000, assistant_id="asst-2"))
    fake.fail_next("/call", 429, retry_after=0)
    conn = await asyncpg.connect(db_dsn)
    try:
        async with VapiClient(fake.base_url, KEY) as client:
            client.backoff = 0.01
            stats = await _import(conn, client, limit=3)
        assert (stats.seen, stats.inserted, stats.skipped) == (8, 7, 1)  # paged by 3; not vc-old, not asst-2
        assert [r.status for r in fake.requests if r.path == "/call"][0] == 429
        counts = await _counts(conn)
        assert counts == {"calls": 7, "utterances": 21, "tool_calls": 4}
        async with VapiClient(fake.base_url, KEY) as client:
            again = await _import(conn, client, limit=3)
        assert (again.inserted, again.updated) == (0, 7)
        assert await _counts(conn) == counts
        row = await conn.fetchrow("SELECT stack, cost_usd, costs, recording_url, ended_reason FROM calls WHERE call_sid = 'vc-002'")
        assert row["stack"] == "vapi" and float(row["cost_usd"]) == 0.22
        assert json.loads(row["costs"])[1]["type"] == "vapi"
        assert row["recording_url"] == f"{fake.base_url}/recording/vc-002.wav"
        rollup = await conn.fetchrow("SELECT turns, tool_calls, latency_p50_ms FROM call_rollup WHERE call_sid = 'vc-002'")
        assert (rollup["turns"], rollup["tool_calls"], rollup["latency_p50_ms"]) == (3, 1, 1050)
    finally:
        await conn.close()


async def _import(conn, client, limit):
    orig = client.list_calls

    def list_calls(**kw):
        return orig(limit=limit, **kw)

    client.list_calls = list_calls
    return await import_calls(conn, client, since=T0, assistant_id="asst-1")


async def _counts(conn):
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE call_sid LIKE 'vc-%'")
            for t in ("calls", "utterances", "tool_calls")}


def _cli(db_dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "DATABASE_URL": db_dsn, "SHIM_LOG_FORMAT": "console", **env}
    return subprocess.run([sys.executable, "-m", "shim.cli", "parity", *args], capture_output=True, text=True,
                          env=environ, timeout=120)


async def test_cli_import_then_traffic_report(db_dsn, fake):
    for call in _calls(4, fake.base_url):
        fake.add_call(call)
    env = {"VAPI_API_KEY": KEY, "VAPI_BASE_URL": fake.base_url}
    import asyncio

    done = await asyncio.to_thread(_cli, db_dsn, "import-vapi", "--since", "2026-11-23", "--assistant", "asst-1", **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"seen": 4, "inserted": 4, "updated": 0, "skipped_not_ended": 0}
    missing = await asyncio.to_thread(_cli, db_dsn, "import-vapi", "--since", "2026-11-23", VAPI_API_KEY="")
    assert missing.returncode == 2 and "VAPI_API_KEY" in missing.stderr
    report = await asyncio.to_thread(_cli, db_dsn, "report", "--format", "json")
    assert report.returncode == 0, report.stderr
    [traffic] = json.loads(report.stdout)
    assert {k: traffic[k] for k in ("scenario", "stack", "runs", "agreement", "drift")} == {
        "scenario": "traffic", "stack": "vapi", "runs": 4, "agreement": None, "drift": False}
    assert traffic["modal_tools"] == []  # 2 calls with check_availability, 2 without: a tie, no tools sorts first
    assert traffic["latency_p50_ms"] is not None and traffic["cost_per_minute_usd"] > 0
