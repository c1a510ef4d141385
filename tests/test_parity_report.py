"""parity_report() (migration 0006) on hand-made rows: the agreement definition against
hand-computed figures, ties, runs that are not ok, real traffic of several assistants, no data."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import pytest

from shim.parity.report import as_json, as_table, fetch_report

T0 = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)


@pytest.fixture
async def conn(db_dsn):
    c = await asyncpg.connect(db_dsn)
    yield c
    await c.close()


async def run(conn, scenario: str, stack: str, tools: list[str], *, n: int = 1, status: str = "ok") -> None:
    for _ in range(n):
        await conn.execute(
            """INSERT INTO parity_runs (run_id, batch_id, scenario, stack, status, tools, turn_latency_ms,
                                        cost_usd, started_at, ended_at)
               VALUES ($1, $2, $3, $4, $5, $6, '{500}', 0.05, $7, $8)""",
            uuid.uuid4(), uuid.uuid4(), scenario, stack, status, tools, T0, T0 + dt.timedelta(seconds=30))


async def real_call(conn, stack: str, assistant: str, tools: list[str]) -> str:
    sid = ("CA" if stack == "shim" else "vapi-") + uuid.uuid4().hex
    await conn.execute("INSERT INTO calls (call_sid, stack, assistant_id, started_at, ended_at) VALUES ($1, $2, $3, $4, $5)",
                       sid, stack, assistant, T0, T0 + dt.timedelta(seconds=60))
    for seq, name in enumerate(tools):
        await conn.execute("INSERT INTO tool_calls (call_sid, seq, name) VALUES ($1, $2, $3)", sid, seq, name)
    return sid


async def report(conn, **filters) -> dict[tuple[str, str], dict]:
    rows = await fetch_report(conn, assistant=filters.get("assistant"), since=None)
    return {(r["scenario"], r["stack"]): r for r in rows}


async def test_agreement_is_the_share_of_runs_matching_the_other_stacks_modal_sequence(conn):
    await run(conn, "s", "shim", ["A", "B"], n=9)
    await run(conn, "s", "shim", ["A"])
    await run(conn, "s", "vapi", ["A", "B"], n=6)
    await run(conn, "s", "vapi", ["B", "A"], n=4)
    # partial and failed runs are reported, never counted in the figures
    await run(conn, "s", "shim", ["B", "A"], n=3, status="partial")
    await run(conn, "s", "vapi", [], n=2, status="failed")
    rows = await report(conn)
    shim, vapi = rows["s", "shim"], rows["s", "vapi"]
    assert (shim["runs"], shim["partial"], shim["failed"]) == (10, 3, 0)
    assert (vapi["runs"], vapi["partial"], vapi["failed"]) == (10, 0, 2)
    assert shim["modal_tools"] == vapi["modal_tools"] == ["A", "B"]
    assert shim["agreement"] == 0.9 and shim["drift"] is True  # 9 of 10 equal Vapi's modal [A, B]
    assert vapi["agreement"] == 0.6 and vapi["drift"] is True  # 6 of 10 equal the shim's modal [A, B]
    assert shim["cost_per_minute_usd"] == 0.1  # $0.05 per 30 s run


async def test_one_stack_only_has_no_agreement_and_no_drift(conn):
    await run(conn, "solo", "shim", ["A"], n=3)
    await run(conn, "solo", "vapi", ["A"], n=2, status="partial")
    rows = await report(conn)
    assert rows["solo", "shim"]["agreement"] is None and rows["solo", "shim"]["drift"] is False
    assert rows["solo", "vapi"]["runs"] == 0 and rows["solo", "vapi"]["modal_tools"] is None


async def test_a_tie_for_the_modal_sequence_goes_to_the_first_in_byte_order(conn):
    # one run called nothing, one called A: the empty sequence sorts first (as an array, whatever
    # the collation; as text '{}' would sort after '{A}')
    await run(conn, "tie", "shim", ["A"])
    await run(conn, "tie", "shim", [])
    await run(conn, "tie", "vapi", ["b"])
    await run(conn, "tie", "vapi", ["B"])
    rows = await report(conn)
    assert rows["tie", "shim"]["modal_tools"] == []
    assert rows["tie", "vapi"]["modal_tools"] == ["B"]  # byte order: upper case first
    assert rows["tie", "shim"]["agreement"] == 0.0 and rows["tie", "vapi"]["agreement"] == 0.0


async def test_traffic_compares_calls_of_the_same_assistant(conn):
    for _ in range(3):
        await real_call(conn, "shim", "asst-1", ["A"])
        await real_call(conn, "vapi", "asst-2", ["B"])
    await real_call(conn, "vapi", "asst-1", ["A"])
    await real_call(conn, "shim", "asst-2", ["B"])
    await real_call(conn, "shim", "asst-3", ["C"])  # no Vapi traffic to compare with: not in the agreement
    rows = await report(conn)
    assert rows["traffic", "shim"]["runs"] == 5 and rows["traffic", "vapi"]["runs"] == 4
    # each stack's overall modal differs ([A] vs [B]), yet per assistant both stacks agree fully
    assert rows["traffic", "shim"]["modal_tools"] == ["A"] and rows["traffic", "vapi"]["modal_tools"] == ["B"]
    assert rows["traffic", "shim"]["agreement"] == 1.0 and rows["traffic", "vapi"]["agreement"] == 1.0
    only = await report(conn, assistant="asst-2")
    assert only["traffic", "shim"]["runs"] == 1 and only["traffic", "shim"]["agreement"] == 1.0


async def test_replayed_real_calls_stay_in_traffic_and_calls_made_by_runs_do_not(conn):
    original = await real_call(conn, "vapi", "asst-1", ["A"])
    by_vapi_run = await real_call(conn, "vapi", "asst-1", ["A"])  # a parity run's Vapi call, imported
    by_replay = await real_call(conn, "shim", "asst-1", ["A"])  # the shim call the replay placed
    for stack, scenario, call_sid, vapi_call_id in (("vapi", f"replay:{original}", None, original),
                                                    ("shim", f"replay:{original}", by_replay, None),
                                                    ("vapi", "s", None, by_vapi_run)):
        await conn.execute(
            """INSERT INTO parity_runs (run_id, batch_id, scenario, stack, call_sid, vapi_call_id, status, tools, started_at)
               VALUES ($1, $2, $3, $4, $5, $6, 'ok', '{A}', $7)""",
            uuid.uuid4(), uuid.uuid4(), scenario, stack, call_sid, vapi_call_id, T0)
    rows = await report(conn)
    assert rows["traffic", "vapi"]["runs"] == 1  # the real call, though replayed
    assert ("traffic", "shim") not in rows


async def test_an_empty_database_reports_nothing(conn):
    rows = await fetch_report(conn, assistant=None, since=None)
    assert rows == [] and as_json(rows) == "[]\n"
    assert as_table(rows).splitlines()[0].startswith("scenario")


def test_an_unreachable_database_is_one_clear_line_without_the_password(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": f"postgresql://u:hunter2secret@127.0.0.1:{port}/x", "SHIM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "shim.cli", "parity", "report", "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "cannot use postgresql://u:***@127.0.0.1" in done.stderr and "Traceback" not in done.stderr
    assert "hunter2secret" not in done.stderr


async def test_duration_and_cost_per_minute_are_the_calls_not_the_runs_bookkeeping(conn):
    # the run spans 90 s (placing the call, then polling for its outcome); the call itself 60 s
    await conn.execute("INSERT INTO calls (call_sid, stack, started_at, ended_at, cost_usd) VALUES "
                       "('vapi-call-1', 'vapi', $1, $2, 0.12)", T0 + dt.timedelta(seconds=10), T0 + dt.timedelta(seconds=70))
    await conn.execute(
        """INSERT INTO parity_runs (run_id, batch_id, scenario, stack, vapi_call_id, status, tools, cost_usd, started_at, ended_at)
           VALUES ($1, $2, 'timed', 'vapi', 'vapi-call-1', 'ok', '{}', 0.10, $3, $4)""",
        uuid.uuid4(), uuid.uuid4(), T0, T0 + dt.timedelta(seconds=90))
    row = (await report(conn))["timed", "vapi"]
    assert row["duration_p50_s"] == 60.0
    assert row["cost_per_minute_usd"] == 0.12  # the call's current cost over its 1 minute


async def test_scenario_names_are_kept_as_written(conn):
    await run(conn, "{}", "shim", ["A"])
    await run(conn, '{"a": 1}', "shim", ["A"])
    rows = await fetch_report(conn, assistant=None, since=None)
    assert sorted(r["scenario"] for r in rows) == sorted(["{}", '{"a": 1}'])  # not parsed as JSON
    assert rows[0]["ended_reasons"] == {"unknown": 1}
    as_table(rows)
