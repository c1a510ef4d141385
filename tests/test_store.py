"""shim.store (migrations + Recorder), shim.db helpers and shim.testing.pg_proxy, on a real Postgres."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from shim.db import _clear_stale_state, redact_dsn, resolve_dsn, with_database
from shim.store import _LINKED_BY_TRIGGER, TABLES, Recorder, load_migrations, migrate
from shim.testing.pg_proxy import PgProxy

UTC = dt.UTC
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def ts(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def fetch(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def fetchval(dsn: str, sql: str, *args):
    return (await fetch(dsn, sql, *args))[0][0]


async def wait_until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def recorders(tmp_path):
    """Factory for Recorders with test-friendly timings; all are closed at teardown."""
    made: list[Recorder] = []

    async def make(dsn: str, *, spool: str = "spool.jsonl", start: bool = True, **kw) -> Recorder:
        kw.setdefault("retry_initial", 0.02)
        kw.setdefault("retry_max", 0.1)
        kw.setdefault("flush_interval", 0.005)
        kw.setdefault("connect_timeout", 2.0)
        rec = Recorder(dsn, spool_path=tmp_path / spool, **kw)
        made.append(rec)
        if start:
            await rec.start()
        return rec

    yield make
    for rec in made:
        await rec.close(timeout=0.1)


@pytest.fixture
async def proxy(db_dsn):
    p = PgProxy.from_dsn(db_dsn)
    await p.start()
    yield p
    await p.stop()


# ------------------------------------------------------------------------------------------ migrations


async def test_migrations_idempotent_and_recorded(db_dsn):
    assert await migrate(db_dsn) == []  # the fixture already migrated
    assert await migrate(db_dsn) == []
    rows = await fetch(db_dsn, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in load_migrations()]
    assert all(r["applied_at"] is not None for r in rows)


async def test_migrations_concurrent(empty_db_dsn):
    results = await asyncio.gather(migrate(empty_db_dsn), migrate(empty_db_dsn), migrate(empty_db_dsn))
    versions = [m.version for m in load_migrations()]
    assert sorted(results) == [[], [], versions]
    assert await fetchval(empty_db_dsn, "SELECT count(*) FROM schema_migrations") == len(versions)


async def test_migrate_uses_connection_default_schema(empty_db_dsn):
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute("CREATE SCHEMA app")
        await conn.execute("SET search_path TO app")
        assert await migrate(conn) == [m.version for m in load_migrations()]
        assert not conn.is_closed()  # a passed connection stays open
        schemas = {r["table_schema"] for r in await conn.fetch(
            "SELECT table_schema FROM information_schema.tables WHERE table_name IN ('calls', 'schema_migrations')"
        )}
        assert schemas == {"app"}
    finally:
        await conn.close()


async def test_every_column_is_commented(db_dsn):
    missing = await fetch(
        db_dsn,
        """
        SELECT c.relname, a.attname
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_description d ON d.objoid = c.oid AND d.objsubid = a.attnum
        WHERE c.relkind IN ('r', 'v') AND d.description IS NULL
        """,
    )
    assert [tuple(r) for r in missing] == []


async def test_table_specs_match_database(db_dsn):
    """shim.store.TABLES (used to validate rows at the call site) mirrors the migrated schema."""
    pg_types = {"text": "text", "integer": "integer", "boolean": "boolean", "timestamptz": "timestamp with time zone",
                "jsonb": "jsonb", "uuid": "uuid"}
    for spec in TABLES.values():
        cols = {r["column_name"]: r for r in await fetch(
            db_dsn,
            "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            spec.name,
        )}
        assert set(cols) == set(spec.columns) | set(spec.managed), spec.name
        for name, ctype in spec.columns.items():
            assert cols[name]["data_type"] == pg_types[ctype], (spec.name, name)
        not_null_no_default = {n for n, r in cols.items() if r["is_nullable"] == "NO" and r["column_default"] is None}
        assert not_null_no_default <= set(spec.required) | set(spec.key), spec.name
        pk = await fetch(
            db_dsn,
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = $1::regclass AND i.indisprimary",
            spec.name,
        )
        assert {r["attname"] for r in pk} == set(spec.key), spec.name


# ------------------------------------------------------------------------------------------ upsert semantics


async def test_upsert_coalesces_and_keep_existing(db_dsn, recorders):
    rec = await recorders(db_dsn)
    rec.upsert("calls", {"call_sid": "CA1", "status": "ringing", "model": "m1", "started_at": ts(0)})
    assert await rec.drain(5)
    first = (await fetch(db_dsn, "SELECT * FROM calls WHERE call_sid = 'CA1'"))[0]
    assert first["stack"] == "shim"  # column default on insert

    # None never overwrites; keep_existing keeps a non-null stored value.
    rec.upsert("calls", {"call_sid": "CA1", "status": None, "model": "m2", "started_at": ts(9)}, keep_existing=("started_at",))
    # keep_existing on a column that is still NULL takes the new value.
    rec.upsert("calls", {"call_sid": "CA1", "ended_at": ts(60), "voice": "alloy"}, keep_existing=("ended_at",))
    assert await rec.drain(5)
    row = (await fetch(db_dsn, "SELECT * FROM calls WHERE call_sid = 'CA1'"))[0]
    assert (row["status"], row["model"], row["started_at"], row["ended_at"], row["voice"]) == (
        "ringing", "m2", ts(0), ts(60), "alloy"
    )
    assert row["created_at"] == first["created_at"]
    assert row["updated_at"] > first["updated_at"]

    # Tables with and without updated_at, key-only rows, NOT NULL defaults.
    rec.upsert("utterances", {"call_sid": "CA1", "seq": 1, "role": "assistant", "text": "Hi", "audio_ms": 1200})
    rec.upsert("utterances", {"call_sid": "CA1", "seq": 1, "role": "assistant", "heard_ms": 800, "interrupted": True})
    rec.upsert("tool_calls", {"call_sid": "CA1", "seq": 1, "name": "lookup", "status": "requested"})
    rec.upsert("tool_calls", {"call_sid": "CA1", "seq": 1, "status": "completed", "latency_ms": 42})
    rec.upsert("numbers", {"number": "+14155550100", "assistant_id": "asst_1"})
    rec.upsert("numbers", {"number": "+14155550100"})
    assert await rec.drain(5)
    u = (await fetch(db_dsn, "SELECT * FROM utterances"))[0]
    assert (u["text"], u["audio_ms"], u["heard_ms"], u["interrupted"]) == ("Hi", 1200, 800, True)
    t = (await fetch(db_dsn, "SELECT * FROM tool_calls"))[0]
    assert (t["name"], t["status"], t["latency_ms"]) == ("lookup", "completed", 42)
    n = (await fetch(db_dsn, "SELECT * FROM numbers"))[0]
    assert (n["assistant_id"], n["stack"]) == ("asst_1", "shim")
    assert rec.written == 9 and rec.rejected == 0 and rec.pending == 0 and rec.db_up


async def test_jsonb_round_trip_and_events(db_dsn, recorders):
    rec = await recorders(db_dsn)
    action = {"verb": "dial", "number": "+14155550199", "opts": {"timeout": 20, "record": True, "ratio": 0.5, "x": None}}
    params = [{"name": "lang", "value": "fr"}, {"name": "émoji", "value": "☎️ «ok»"}]
    rec.upsert("calls", {"call_sid": "CA2", "next_action": action, "custom_parameters": params, "metadata": {}})
    event_id = rec.insert("call_events", {"call_sid": "CA2", "kind": "barge_in", "detail": {"at_ms": 1530}})
    rec.insert("call_events", {"id": event_id, "call_sid": "CA2", "kind": "barge_in", "at": ts(1)})  # replayed id
    assert await rec.drain(5)
    row = (await fetch(db_dsn, "SELECT next_action, custom_parameters, metadata, next_action->>'verb' AS verb FROM calls"))[0]
    assert json.loads(row["next_action"]) == action
    assert json.loads(row["custom_parameters"]) == params
    assert json.loads(row["metadata"]) == {}
    assert row["verb"] == "dial"
    events = await fetch(db_dsn, "SELECT id::text, kind, detail, at FROM call_events")
    assert len(events) == 1 and events[0]["id"] == event_id
    assert json.loads(events[0]["detail"]) == {"at_ms": 1530}
    assert abs(events[0]["at"] - dt.datetime.now(UTC)) < dt.timedelta(minutes=1)  # defaults to acceptance time


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda r: r.upsert("callz", {"call_sid": "CA1"}), ["'callz'", "calls"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1", "colour": "red"}), ["calls.colour", "'red'", "unknown column"]),
        (lambda r: r.upsert("calls", {"status": "ringing"}), ["calls.call_sid", "required"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1", "started_at": dt.datetime(2026, 1, 1)}),
         ["calls.started_at", "datetime.datetime(2026, 1, 1, 0, 0)", "timezone-aware datetime"]),
        (lambda r: r.upsert("calls", {"call_sid": 17}), ["calls.call_sid", "17", "str"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1", "metadata": "{}"}), ["calls.metadata", "'{}'", "dict or list"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1", "metadata": {"x": object()}}), ["calls.metadata", "JSON"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1", "stack": "twilio"}), ["calls.stack", "'twilio'", "shim, vapi"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA\x00"}), ["calls.call_sid", "NUL"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1", "updated_at": T0}), ["calls.updated_at", "set by the database"]),
        (lambda r: r.upsert("calls", {"call_sid": "CA1"}, keep_existing=("nope",)), ["calls.nope", "keep_existing"]),
        (lambda r: r.upsert("utterances", {"call_sid": "CA1", "seq": 1, "role": "user", "audio_ms": 1.5}),
         ["utterances.audio_ms", "1.5", "int"]),
        (lambda r: r.upsert("utterances", {"call_sid": "CA1", "seq": True, "role": "user"}), ["utterances.seq", "True", "int"]),
        (lambda r: r.upsert("utterances", {"call_sid": "CA1", "seq": 2**31, "role": "user"}), ["utterances.seq", str(2**31)]),
        (lambda r: r.upsert("utterances", {"call_sid": "CA1", "seq": 1}), ["utterances.role", "required"]),
        (lambda r: r.upsert("utterances", {"call_sid": "CA1", "seq": 1, "role": "bot"}), ["utterances.role", "'bot'", "assistant, user"]),
        (lambda r: r.upsert("utterances", {"call_sid": "CA1", "seq": 1, "role": "user", "interrupted": 1}),
         ["utterances.interrupted", "bool"]),
        (lambda r: r.upsert("call_events", {"call_sid": "CA1", "kind": "x"}), ["call_events", "insert()"]),
        (lambda r: r.insert("calls", {"call_sid": "CA1"}), ["calls", "upsert()"]),
        (lambda r: r.insert("call_events", {"call_sid": "CA1", "kind": "x", "id": "not-a-uuid"}), ["call_events.id", "'not-a-uuid'", "UUID"]),
    ],
)
def test_bad_input_raises_clear_value_error(call, expected, tmp_path):
    rec = Recorder("postgresql://unused@127.0.0.1:1/x", spool_path=tmp_path / "spool.jsonl")  # validation needs no DB
    rec.upsert("calls", {"call_sid": "CA-ok", "status": "accepted-before"})
    with pytest.raises(ValueError) as info:
        call(rec)
    for fragment in expected:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert rec.pending == 1  # the bad row was not queued; the earlier one still is


async def test_bad_input_loses_nothing_already_accepted(db_dsn, recorders):
    rec = await recorders(db_dsn)
    rec.upsert("calls", {"call_sid": "CA-ok", "status": "accepted-before"})
    with pytest.raises(ValueError):
        rec.upsert("utterances", {"call_sid": "CA-ok", "seq": 1, "role": "user", "started_at": "yesterday"})
    rec.upsert("calls", {"call_sid": "CA-ok2", "status": "accepted-after"})
    assert await rec.drain(5)
    rows = await fetch(db_dsn, "SELECT call_sid, status FROM calls ORDER BY call_sid")
    assert [tuple(r) for r in rows] == [("CA-ok", "accepted-before"), ("CA-ok2", "accepted-after")]
    assert await fetchval(db_dsn, "SELECT count(*) FROM utterances") == 0


async def test_rows_gather_for_the_linger_unless_one_is_wanted_soon(db_dsn, recorders):
    rec = await recorders(db_dsn, flush_interval=30)  # (the default is 0.5 s)
    rec.upsert("calls", {"call_sid": "CA-later", "status": "gathering"})
    await asyncio.sleep(0.3)
    assert await fetchval(db_dsn, "SELECT count(*) FROM calls") == 0  # still gathering
    rec.upsert("calls", {"call_sid": "CA-now", "status": "ended", "next_action": {"verb": "hangup"}})
    rec.flush_soon()  # e.g. a next_action: /twilio/stream-ended may read it from another worker
    async with asyncio.timeout(5):
        while await fetchval(db_dsn, "SELECT count(*) FROM calls") < 2:
            await asyncio.sleep(0.02)


async def test_later_upsert_of_same_key_wins_across_groups_and_batches(db_dsn, recorders):
    rec = await recorders(db_dsn, batch_max=3)
    for i in range(50):
        row = {"call_sid": "CA3", "status": f"s{i}"}
        if i % 3 == 0:
            row["model"] = f"m{i}"
        if i % 4 == 0:
            rec.upsert("numbers", {"number": f"+1415555{i:04d}", "assistant_id": f"a{i}"})
        rec.upsert("calls", row)
        rec.upsert("utterances", {"call_sid": "CA3", "seq": i % 5, "role": "user", "text": f"t{i}"})
    assert await rec.drain(5)
    row = (await fetch(db_dsn, "SELECT status, model FROM calls WHERE call_sid = 'CA3'"))[0]
    assert (row["status"], row["model"]) == ("s49", "m48")
    texts = {r["seq"]: r["text"] for r in await fetch(db_dsn, "SELECT seq, text FROM utterances")}
    assert texts == {s: f"t{max(i for i in range(50) if i % 5 == s)}" for s in range(5)}
    assert await fetchval(db_dsn, "SELECT count(*) FROM numbers") == 13


def _apply(state: dict, table: str, cols, keep, vals) -> None:
    """An upsert's effect as Postgres applies it (the row's columns overwrite, except that for
    keep_existing a stored value wins; _encode_row leaves None columns out), an insert's as ON
    CONFLICT DO NOTHING: the model the property checks."""
    spec = TABLES[table]
    key = (table, tuple(vals[cols.index(c)] for c in spec.key))
    row = state.get(key)
    if row is None:
        state[key] = dict(zip(cols, vals))
    elif spec.op == "u":
        for c, v in zip(cols, vals):
            if c not in keep or row.get(c) is None:
                row[c] = v


_CALL_COLUMNS = ("status", "model", "voice", "ended_reason")


def _must_follow(a, b) -> bool:
    """Whether row b (arrived after a) must be applied after a: the same row (table and key),
    or one call's `calls` and `model_usage` rows (0006's cost triggers read across them)."""
    spec_a, spec_b = TABLES[a[1]], TABLES[b[1]]
    key_a = (a[1], tuple(a[4][a[2].index(c)] for c in spec_a.key))
    key_b = (b[1], tuple(b[4][b[2].index(c)] for c in spec_b.key))
    linked = _LINKED_BY_TRIGGER  # (the registry a new cross-table trigger is added to)
    same_call = a[1] in linked and b[1] in linked and a[4][a[2].index("call_sid")] == b[4][b[2].index("call_sid")]
    return key_a == key_b or same_call


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["calls", "utterances", "call_events", "model_usage"]), st.integers(0, 3),
                          st.sets(st.sampled_from(_CALL_COLUMNS)), st.booleans(), st.integers(0, 2)),
                max_size=60))
def test_batch_runs_keep_every_order_that_matters_and_no_other(tmp_path_factory, ops):
    """However rows of several calls and shapes interleave, the writer's runs (a run per shape,
    rows joining earlier runs) apply every pair of rows that must stay in order in order, leave
    every row as applying them one by one would, and split a shape only where order demands."""
    from shim.store import _encode_row

    rec = Recorder("postgresql://u@localhost/db", spool_path=tmp_path_factory.mktemp("runs") / "spool.jsonl")
    entries = []
    for n, (table, call, columns, keep, seq) in enumerate(ops):
        sid = f"CA{call}"
        keep_existing: tuple[str, ...] = ()
        if table == "calls":
            row = {"call_sid": sid, **{c: f"{c}{n}" for c in columns}}
            keep_existing = ("model",) if keep and "model" in columns else ()
        elif table == "utterances":
            row = {"call_sid": sid, "seq": seq, "role": "user", **({"text": f"t{n}"} if keep else {})}
        elif table == "model_usage":
            row = {"call_sid": sid, "response_id": f"resp{seq}", "at": ts(n), "usage": {"n": n}}
        else:  # a few ids reused: ON CONFLICT DO NOTHING keeps the first to arrive
            row = {"id": f"00000000-0000-4000-8000-{seq:012d}", "call_sid": sid, "at": ts(n), "kind": f"k{n}",
                   **({"detail": {"n": n}} if keep else {})}
        entries.append(_encode_row(TABLES[table], row, keep_existing))
    runs = rec._runs(entries)
    placed = {id(e): (r, i) for r, (_, run) in enumerate(runs) for i, e in enumerate(run)}
    assert sorted(placed) == sorted(id(e) for e in entries)
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            if _must_follow(a, b):
                assert placed[id(a)] < placed[id(b)], (a, b)
    one_by_one: dict = {}
    for e in entries:
        _apply(one_by_one, *e[1:])
    by_runs: dict = {}
    for _, run in runs:
        for e in run:
            _apply(by_runs, *e[1:])
    assert by_runs == one_by_one
    previous_of_shape: dict = {}
    for r, (_, run) in enumerate(runs):  # a shape's second run exists only because its first row had to wait
        shape = run[0][:4]
        if shape in previous_of_shape:
            between = [e for _, later in runs[previous_of_shape[shape] + 1:r] for e in later]
            assert any(_must_follow(e, run[0]) for e in between), run[0]
        previous_of_shape[shape] = r


def test_batch_of_interleaved_calls_takes_one_run_per_shape(tmp_path):
    """100 calls' rows interleaved as a live batch has them: one executemany per row shape, not
    one per change of shape (~2 rows each before)."""
    from shim.store import _encode_row

    rec = Recorder("postgresql://u@localhost/db", spool_path=tmp_path / "spool.jsonl")
    entries = []
    for turn in range(3):
        for call in range(100):
            entries.append(_encode_row(TABLES["utterances"], {"call_sid": f"CA{call}", "seq": turn, "role": "user",
                                                               "text": "hello"}, ()))
            entries.append(_encode_row(TABLES["call_events"], {"id": f"00000000-0000-4000-8000-{turn * 100 + call:012d}",
                                                               "call_sid": f"CA{call}", "at": ts(turn), "kind": "barge_in"}, ()))
            entries.append(_encode_row(TABLES["calls"], {"call_sid": f"CA{call}", "status": f"s{turn}"}, ()))
    runs = rec._runs(entries)
    assert [len(run) for _, run in runs] == [300, 300, 300]
    # A same-key row of another shape in between splits the run, so its order holds:
    entries = [_encode_row(TABLES["calls"], {"call_sid": "CA1", "status": "a"}, ()),
               _encode_row(TABLES["calls"], {"call_sid": "CA1", "status": "b", "model": "m"}, ()),
               _encode_row(TABLES["calls"], {"call_sid": "CA2", "status": "c"}, ()),
               _encode_row(TABLES["calls"], {"call_sid": "CA1", "status": "d"}, ())]
    assert [[e[4] for e in run] for _, run in rec._runs(entries)] == [[("CA1", "a"), ("CA2", "c")], [("CA1", "m", "b")],
                                                                       [("CA1", "d")]]


async def test_transcripts_view_orders_by_speech_time(db_dsn, recorders):
    rec = await recorders(db_dsn)
    rec.upsert("utterances", {"call_sid": "CA4", "seq": 1, "role": "assistant", "text": "second", "started_at": ts(5)})
    rec.upsert("utterances", {"call_sid": "CA4", "seq": 2, "role": "user", "text": "first", "started_at": ts(1)})
    rec.upsert("utterances", {"call_sid": "CA4", "seq": 0, "role": "assistant", "text": "unknown time"})
    assert await rec.drain(5)
    rows = await fetch(db_dsn, "SELECT text FROM transcripts")
    assert [r["text"] for r in rows] == ["first", "second", "unknown time"]


# ------------------------------------------------------------------------------------------ failures


async def test_check_violation_goes_to_rejected_and_does_not_block(db_dsn, recorders, tmp_path):
    rec = await recorders(db_dsn)
    rec.upsert("numbers", {"number": "+14155550100"})
    rec.upsert("numbers", {"number": "555-1234", "assistant_id": "a"})  # violates the E.164 CHECK
    rec.upsert("numbers", {"number": "+14155550101"})
    rec.upsert("utterances", {"call_sid": "CA5", "seq": 0, "role": "user", "text": "still written"})
    assert await rec.drain(5)
    assert sorted(r["number"] for r in await fetch(db_dsn, "SELECT number FROM numbers")) == ["+14155550100", "+14155550101"]
    assert await fetchval(db_dsn, "SELECT text FROM utterances") == "still written"
    assert rec.rejected == 1 and rec.written == 3
    lines = rec.rejected_path.read_bytes().splitlines()
    assert len(lines) == 1
    record = orjson.loads(lines[0])
    assert record["table"] == "numbers" and record["row"] == {"number": "555-1234", "assistant_id": "a"}
    assert "23514" in record["error"]  # check_violation
    rec.upsert("numbers", {"number": "+14155550102"})  # and the queue keeps moving
    assert await rec.drain(5)
    assert await fetchval(db_dsn, "SELECT count(*) FROM numbers") == 3


async def test_outage_rows_wait_spill_to_spool_and_land_exactly_once(db_dsn, proxy, recorders):
    secret = "s3cr3t-Pa55"
    dsn = proxy.dsn_for(db_dsn).replace("postgres:@", f"postgres:{secret}@")  # trust auth ignores it
    assert secret not in redact_dsn(dsn)
    with capture_logs() as logs:
        rec = await recorders(dsn, max_memory_rows=40, batch_max=25)
        rec.upsert("calls", {"call_sid": "CA6", "status": "ringing", "started_at": ts(0)})
        assert await rec.drain(5) and rec.db_up

        await proxy.pause()  # Postgres "goes away" in the middle of the call
        ids = []
        for i in range(300):
            rec.upsert("utterances", {"call_sid": "CA6", "seq": i, "role": "user" if i % 2 else "assistant",
                                      "text": f"u{i}", "started_at": ts(i)})
            if i % 10 == 9:
                rec.upsert("utterances", {"call_sid": "CA6", "seq": i - 5, "role": "user" if (i - 5) % 2 else "assistant",
                                          "heard_ms": i, "interrupted": True})
                rec.upsert("calls", {"call_sid": "CA6", "status": f"turn-{i}", "started_at": ts(999)}, keep_existing=("started_at",))
                ids.append(rec.insert("call_events", {"call_sid": "CA6", "kind": "tick", "detail": {"i": i}}))
        rec.upsert("calls", {"call_sid": "CA6", "status": "completed", "ended_at": ts(400)})
        await wait_until(lambda: not rec.db_up and rec.spooled > 0, what="spill")
        assert rec.pending <= 40  # memory is bounded again once the spiller ran
        assert rec.spool_path.exists()
        assert not await rec.drain(0.05)  # nothing can be committed while paused
        accepted_during_outage = 300 + 30 * 3 + 1

        await proxy.resume()
        assert await rec.drain(10)

    assert rec.pending == 0 and rec.spooled == 0 and rec.rejected == 0
    assert rec.written == 1 + accepted_during_outage
    assert not rec.spool_path.exists()
    rows = await fetch(db_dsn, "SELECT seq, text, heard_ms, interrupted FROM utterances ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(300))
    for r in rows:
        updated = (r["seq"] + 5) % 10 == 9
        assert r["text"] == f"u{r['seq']}"
        assert (r["heard_ms"], r["interrupted"]) == ((r["seq"] + 5, True) if updated else (None, False))
    call = (await fetch(db_dsn, "SELECT status, started_at, ended_at FROM calls"))[0]
    assert tuple(call) == ("completed", ts(0), ts(400))
    assert sorted(r["id"] for r in await fetch(db_dsn, "SELECT id::text FROM call_events")) == sorted(ids)
    assert secret not in repr(logs)
    assert any(e["event"] == "recorder.spilled" for e in logs)


async def test_server_side_disconnects_are_retried(db_dsn, recorders):
    """The server killing the writer's session mid-stream (admin shutdown, 57P01) loses nothing."""
    rec = await recorders(db_dsn, batch_max=10)
    admin = await asyncpg.connect(db_dsn)
    kills = 0
    try:
        for round_ in range(3):
            before = rec.written
            for i in range(200):
                seq = round_ * 200 + i
                rec.upsert("utterances", {"call_sid": "CA10", "seq": seq, "role": "user", "text": f"x{seq}"})
            await wait_until(lambda: rec.written > before, what="writing")  # mid-stream
            kills += await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'shim-recorder'"
            )
        assert await rec.drain(5)
    finally:
        await admin.close()
    assert await fetchval(db_dsn, "SELECT count(*) FROM utterances") == 600
    assert rec.written == 600 and rec.rejected == 0
    assert kills >= 2 and rec.connects >= 2


@pytest.mark.parametrize("max_memory_rows", [10, 10_000], ids=["spilling", "in-memory"])
async def test_partition_mid_batch_keeps_order_through_spool_and_close(max_memory_rows, db_dsn, proxy, recorders):
    """A write that hangs (network partition) times out and is retried; while it is stuck, newer
    rows spill to the spool behind it, whatever the memory limit (an outage spools at once);
    close() spools it all, the stuck batch included (in front), in acceptance order; a new
    Recorder replays it so the last update of each key wins."""
    rec = await recorders(proxy.dsn_for(db_dsn), spool="part.jsonl", batch_max=5, max_memory_rows=max_memory_rows,
                          command_timeout=0.2, connect_timeout=0.2)
    rec.upsert("calls", {"call_sid": "CA11", "status": "s-first"})
    assert await rec.drain(5)
    await proxy.stall()
    for i in range(40):
        rec.upsert("calls", {"call_sid": "CA11", "status": f"s{i}"})
        rec.upsert("utterances", {"call_sid": "CA11", "seq": i, "role": "user", "text": f"w{i}"})
    await wait_until(lambda: rec.failed_batches >= 1 and rec.spooled > 0,
                     what="timed-out batch (and spill)")
    await rec.close(timeout=0.05)
    assert rec.spooled == 80 and rec.pending == 0  # the stuck batch too
    lines = [orjson.loads(x) for x in rec.spool_path.read_bytes().splitlines()]
    assert [v for op, t, cols, keep, vals in lines if t == "calls" for v in vals if v.startswith("s")] == [
        f"s{i}" for i in range(40)
    ]
    await proxy.resume()
    again = await recorders(db_dsn, spool="part.jsonl")
    assert await again.drain(5)
    assert await fetchval(db_dsn, "SELECT status FROM calls") == "s39"
    assert await fetchval(db_dsn, "SELECT count(*) FROM utterances") == 40


async def test_close_with_db_down_spools_rows_and_next_recorder_replays(db_dsn, proxy, recorders):
    await proxy.pause()
    down = await recorders(proxy.dsn_for(db_dsn), spool="down.jsonl")
    for i in range(30):
        down.upsert("utterances", {"call_sid": "CA7", "seq": i, "role": "user", "text": f"v1-{i}"})
    down.upsert("utterances", {"call_sid": "CA7", "seq": 0, "role": "user", "text": "v2-0"})
    await down.close(timeout=0.1)
    assert down.spooled == 31 and down.pending == 0
    assert len(down.spool_path.read_bytes().splitlines()) == 31
    with pytest.raises(RuntimeError):
        down.upsert("calls", {"call_sid": "CA7"})  # closed: refuse rather than lose

    up = await recorders(db_dsn, spool="down.jsonl")  # same spool file, database reachable
    assert up.spooled == 31
    assert await up.drain(5)
    texts = {r["seq"]: r["text"] for r in await fetch(db_dsn, "SELECT seq, text FROM utterances")}
    assert texts == {0: "v2-0", **{i: f"v1-{i}" for i in range(1, 30)}}
    assert not up.spool_path.exists() and up.spooled == 0


async def test_spool_left_by_a_crash_is_replayed(db_dsn, proxy, recorders, tmp_path):
    await proxy.pause()
    doomed = await recorders(proxy.dsn_for(db_dsn), spool="doomed.jsonl", max_memory_rows=10, batch_max=5)
    for i in range(60):
        doomed.upsert("calls", {"call_sid": f"CA8-{i}", "status": "ringing", "metadata": {"i": i}})
    await wait_until(lambda: doomed.spooled >= 40, what="spill")
    # "Crash": the process dies now; what survives is the spool file as it is, maybe with a torn last line.
    crashed = tmp_path / "crashed.jsonl"
    shutil.copyfile(doomed.spool_path, crashed)
    survived = len(crashed.read_bytes().splitlines())
    with open(crashed, "ab") as f:
        f.write(b'["u","calls",["call_sid"],[],["CA8-torn')

    rec = await recorders(db_dsn, spool="crashed.jsonl")
    assert await rec.drain(5)
    rows = await fetch(db_dsn, "SELECT call_sid, metadata FROM calls")
    assert len(rows) == survived >= 40
    assert all(json.loads(r["metadata"])["i"] == int(r["call_sid"].split("-")[1]) for r in rows)
    assert not crashed.exists()
    torn = rec.rejected_path.read_text()
    assert "CA8-torn" in torn and "torn" in orjson.loads(torn.splitlines()[0])["error"]


async def test_recorder_starts_without_database_and_connects_later(empty_db_dsn, recorders, pg_server):
    """The writer connects lazily and applies migrations itself (a fresh database comes up empty)."""
    p = PgProxy.from_dsn(empty_db_dsn)
    await p.start()
    try:
        await p.pause()
        rec = await recorders(p.dsn_for(empty_db_dsn))
        rec.upsert("calls", {"call_sid": "CA9", "status": "ringing"})
        await wait_until(lambda: rec.failed_batches > 0 or p.connections_total > 0, what="connect attempt")
        assert not rec.db_up
        await p.resume()
        assert await rec.drain(5)
        assert await fetchval(empty_db_dsn, "SELECT status FROM calls") == "ringing"
    finally:
        await p.stop()


async def test_one_recorder_per_spool(db_dsn, recorders):
    await recorders(db_dsn, spool="shared.jsonl")
    with pytest.raises(RuntimeError, match="in use"):
        await recorders(db_dsn, spool="shared.jsonl")


# ------------------------------------------------------------------------------------------ shim.db


def test_redact_dsn():
    assert redact_dsn("postgresql://app:hunter2@db.example:5432/shim") == "postgresql://app:***@db.example:5432/shim"
    assert redact_dsn("postgres://app:p%40ss@db/shim?sslmode=require") == "postgres://app:***@db/shim?sslmode=require"
    assert "hunter2" not in redact_dsn("postgresql://app@db/shim?password=hunter2&sslmode=require")
    assert "hunter2" not in redact_dsn("host=db user=app password=hunter2 dbname=shim")
    assert "hunter 2" not in redact_dsn("host=db password='hunter 2' dbname=shim")
    embedded = "postgresql://postgres:@/postgres?host=/tmp/x/pgdata"
    assert redact_dsn(embedded) == embedded


def test_resolve_dsn_prefers_database_url(tmp_path):
    dsn, embedded = resolve_dsn("postgresql://u:pw@db/x", tmp_path)
    assert (dsn, embedded) == ("postgresql://u:pw@db/x", None)
    assert not (tmp_path / "pgdata").exists()
    assert with_database("postgresql://u:pw@db:5/x?sslmode=require", "y") == "postgresql://u:pw@db:5/y?sslmode=require"


def test_stale_state_guard(tmp_path):
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (pgdata / "postmaster.pid").write_text(f"{decoy.pid}\n{pgdata}\n")  # PID reused by a non-postgres
        (pgdata / ".handle_pids.json").write_text(json.dumps([os.getpid(), 2**22 + 12345]))
        _clear_stale_state(pgdata)
        assert not (pgdata / "postmaster.pid").exists()
        assert json.loads((pgdata / ".handle_pids.json").read_text()) == [os.getpid()]
        assert decoy.poll() is None  # the decoy is untouched
        (pgdata / ".handle_pids.json").write_text("")  # torn ref-count file
        _clear_stale_state(pgdata)
        assert json.loads((pgdata / ".handle_pids.json").read_text()) == []
    finally:
        decoy.kill()
        decoy.wait()


async def test_outage_spools_every_row_at_once_and_health_says_so(db_dsn, proxy, recorders):
    """As soon as Postgres is unreachable, rows go to the spool (a kill -9 must not lose them),
    whatever max_memory_rows allows; health() reports it; all are written once it returns."""
    rec = await recorders(proxy.dsn_for(db_dsn), spool="outage.jsonl", max_memory_rows=50_000, batch_max=5,
                          connect_timeout=0.2, command_timeout=0.2, retry_max=0.2)
    rec.upsert("calls", {"call_sid": "CA20", "status": "ringing"})
    assert await rec.drain(5)
    assert rec.health().connected and str(rec.health()) == "connected"
    await proxy.pause()
    for i in range(30):
        rec.upsert("utterances", {"call_sid": "CA20", "seq": i, "role": "user", "text": f"t{i}"})
    await wait_until(lambda: rec.spooled == 30 and rec.pending == 0, what="every row spooled")
    health = rec.health()
    assert (health.state, health.spooled, str(health)) == ("degraded", 30, "degraded: spooling 30 rows")
    assert len(rec.spool_path.read_bytes().splitlines()) == 30  # on disk, fsync'd
    for i in range(30, 40):  # rows of a call still going on during the outage
        rec.upsert("utterances", {"call_sid": "CA20", "seq": i, "role": "user", "text": f"t{i}"})
    await wait_until(lambda: rec.spooled == 40 and rec.pending == 0, what="later rows spooled too")
    await proxy.resume()
    assert await rec.drain(10)
    assert rec.health().connected and rec.spooled == 0
    assert await fetchval(db_dsn, "SELECT count(*) FROM utterances WHERE call_sid = 'CA20'") == 40


_KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from shim.store import Recorder

async def main():
    rec = Recorder(sys.argv[1], spool_path=Path(sys.argv[2]), connect_timeout=0.2, retry_max=0.2)
    await rec.start()
    for i in range(25):
        rec.insert("call_events", {"call_sid": "CA21", "kind": "k", "detail": {"i": i}})
        rec.upsert("utterances", {"call_sid": "CA21", "seq": i, "role": "user", "text": f"t{i}"})
    spool = Path(sys.argv[2])
    # on disk, not merely counted: `spooled` includes rows whose append is still under way
    while not spool.exists() or len(spool.read_bytes().splitlines()) < 50:
        await asyncio.sleep(0.01)
    print("SPOOLED", flush=True)
    await asyncio.sleep(3600)  # killed here with SIGKILL: no close(), no drain

asyncio.run(main())
"""


async def test_kill_9_during_an_outage_loses_nothing(db_dsn, proxy, recorders, tmp_path):
    """A writer process killed with SIGKILL while Postgres is down: its rows are in the spool,
    replayed by the next Recorder, each written once (call_events keep their ids)."""
    await proxy.pause()
    spool = tmp_path / "killed.jsonl"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_WRITER, proxy.dsn_for(db_dsn), str(spool), stdout=subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            while (line := await child.stdout.readline()) not in (b"SPOOLED\n", b""):
                pass  # log lines
        assert line == b"SPOOLED\n"
    finally:
        child.kill()
        await child.wait()
    await proxy.resume()
    shutil.copyfile(spool, tmp_path / "again.jsonl")
    rec = await recorders(db_dsn, spool="killed.jsonl")
    assert await rec.drain(10)
    assert await fetchval(db_dsn, "SELECT count(*) FROM utterances WHERE call_sid = 'CA21'") == 25
    assert await fetchval(db_dsn, "SELECT count(*) FROM call_events WHERE call_sid = 'CA21'") == 25
    # the same rows replayed again (a crash after writing, before the spool was removed): no duplicates
    again = await recorders(db_dsn, spool="again.jsonl")
    assert again.spooled == 50 and await again.drain(10)
    assert await fetchval(db_dsn, "SELECT count(*) FROM call_events WHERE call_sid = 'CA21'") == 25
    assert await fetchval(db_dsn, "SELECT count(*) FROM utterances WHERE call_sid = 'CA21'") == 25


async def test_a_write_that_hangs_counts_as_an_outage_after_stall_seconds(db_dsn, proxy, recorders):
    """A network partition: the write neither fails nor finishes (a long command timeout). After
    stall_seconds the rows behind the hung batch go to disk anyway; the hung batch is the only
    thing in memory, and everything is written once, in order, when the network heals."""
    rec = await recorders(proxy.dsn_for(db_dsn), spool="hang.jsonl", batch_max=5, stall_seconds=0.3,
                          command_timeout=30, connect_timeout=0.5, retry_max=0.2)
    rec.upsert("calls", {"call_sid": "CA30", "status": "first"})
    assert await rec.drain(5)
    await proxy.stall()
    for i in range(20):
        rec.upsert("utterances", {"call_sid": "CA30", "seq": i, "role": "user", "text": f"t{i}"})
    await wait_until(lambda: rec.spooled >= 15 and rec.failed_batches == 0, what="spooled while the write hangs")
    assert rec.pending <= 5 and rec.health().state == "degraded"
    await proxy.resume()
    assert await rec.drain(15)
    texts = [r["text"] for r in await fetch(db_dsn, "SELECT text FROM utterances WHERE call_sid = 'CA30' ORDER BY seq")]
    assert texts == [f"t{i}" for i in range(20)]


def test_a_calls_next_action_ends_the_writers_gather_other_rows_wait_for_it():
    from types import SimpleNamespace

    from shim.app import _DeferredRecords

    flushed, rows = [], []
    recorder = SimpleNamespace(upsert=lambda table, row, keep_existing=(): rows.append(table),
                               flush_soon=lambda: flushed.append(True))
    shim = SimpleNamespace(endings={}, remember_end=lambda sid, action: shim.endings.update({sid: action}),
                           recorder=recorder)
    records = _DeferredRecords(shim)
    records.upsert("utterances", {"call_sid": "CA1", "seq": 1, "role": "user"})
    records.upsert("calls", {"call_sid": "CA1", "status": "in-progress"})
    assert flushed == []
    records.upsert("calls", {"call_sid": "CA1", "next_action": {"verb": "hangup"}})
    assert flushed == [True] and rows == ["utterances", "calls", "calls"]
