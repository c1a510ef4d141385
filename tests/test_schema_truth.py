"""The schema says what the code writes (migration 0005): every call_events.kind and
tool_calls.status value written is documented in its column comment; assistant turns get
ended_at; the stream token is never stored; tool calls keep the HTTP status."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import orjson

from shim.testing.fake_customer import FakeCustomer, status
from shim.testing.fake_realtime import Script, calls
from shim.testing.twilio_caller import keep_line_open

from .harness import running_shim
from .test_tools_e2e import assistant, function_tool

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((REPO / "shim").glob("*.py")), *sorted((REPO / "tools").glob("*.py"))]


async def comment(dsn: str, table: str, column: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT col_description(to_regclass($1), attnum) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2",
            table, column)
    finally:
        await conn.close()


def written(pattern: str) -> set[str]:
    return {m for path in SOURCES for m in re.findall(pattern, path.read_text())}


async def test_every_call_event_kind_written_is_documented(db_dsn):
    kinds = written(r'record_event\(\s*"([a-z_]+)"')
    assert len(kinds) >= 10  # the grep finds them
    text = await comment(db_dsn, "call_events", "kind")
    missing = sorted(k for k in kinds if not re.search(rf"\b{k}\b", text))
    assert missing == [], f"call_events.kind comment lacks {missing}"


async def test_every_tool_call_status_written_is_documented(db_dsn):
    statuses = (written(r'_tool_output\([^\n]*?,\s*"([a-z]+)"[,)]') | written(r'_fail(?:ed|_all)\([^\n]*status="([a-z]+)"')
                | written(r'"status": "(requested)"'))
    assert {"ok", "error", "timeout", "async", "requested"} <= statuses
    text = await comment(db_dsn, "tool_calls", "status")
    missing = sorted(s for s in statuses if not re.search(rf"\b{s}\b", text))
    assert missing == [], f"tool_calls.status comment lacks {missing}"


async def test_a_call_stores_no_token_assistant_end_times_and_tool_http_status(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        customer.on("/tools", status(503))
        script = Script(replies=[calls(("lookup", {})), "Sorry, I could not look that up."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script,
                                assistant_overrides=assistant(customer, [function_tool("lookup", customer.url("/tools"))])) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await customer.wait_for("tool-calls", timeout=10)
            await session.wait_sent("response.done", count=2, timeout=10)
            await keep_line_open(caller, caller.wait_until_played(timeout=15))
            await caller.stop()
            await run.drain()
    assert caller.custom_parameters.get("token")  # the stream carried one...
    conn = await asyncpg.connect(db_dsn)
    try:
        params = await conn.fetchval("SELECT custom_parameters FROM calls WHERE call_sid = $1", caller.call_sid)
        turns = await conn.fetch("SELECT started_at, ended_at, heard_ms FROM utterances WHERE call_sid = $1 AND role = 'assistant'",
                                 caller.call_sid)
        tool = await conn.fetchrow("SELECT status, http_status FROM tool_calls WHERE call_sid = $1", caller.call_sid)
    finally:
        await conn.close()
    params = orjson.loads(params)
    assert "token" not in params and params["assistant"] == "demo"  # ...which was not stored
    heard = [t for t in turns if t["heard_ms"]]
    assert heard and all(t["ended_at"] is not None for t in heard)
    for turn in heard:
        spoken_ms = (turn["ended_at"] - turn["started_at"]).total_seconds() * 1000
        assert abs(spoken_ms - turn["heard_ms"]) <= 1
    assert tool["status"] == "error" and tool["http_status"] == 503
