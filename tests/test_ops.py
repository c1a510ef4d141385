"""The operator's view of calls (shim/ops.py): argument parsing and formatting on plain rows, and
the queries against the real Postgres with rows written the way a call writes them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import asyncpg
import orjson
import pytest

from shim import ops
from tests.calls_seed import T0, XSS, seed

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


# --- pure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2h", NOW - timedelta(hours=2)),
    ("7d", NOW - timedelta(days=7)),
    ("30m", NOW - timedelta(minutes=30)),
    ("1w", NOW - timedelta(weeks=1)),
    ("45s", NOW - timedelta(seconds=45)),
    ("2026-12-01", datetime(2026, 12, 1, tzinfo=timezone.utc)),
    ("2026-12-01T08:30", datetime(2026, 12, 1, 8, 30, tzinfo=timezone.utc)),
    ("2026-12-01T08:30Z", datetime(2026, 12, 1, 8, 30, tzinfo=timezone.utc)),
    ("2026-12-01 09:30+01:00", datetime(2026, 12, 1, 8, 30, tzinfo=timezone.utc)),
])
def test_since_accepts_ages_and_iso_times(text, expected):
    assert ops.parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "2026-13-01", "", "7x"])
def test_since_rejects_anything_else_naming_the_value(text):
    with pytest.raises(ops.UsageError) as err:
        ops.parse_since(text, NOW)
    assert repr(text) in str(err.value) and "2h" in str(err.value)


@pytest.mark.parametrize("limit", [0, -1, ops.MAX_LIMIT + 1])
def test_limit_out_of_range_is_a_usage_error(limit):
    with pytest.raises(ops.UsageError, match="--limit"):
        ops.CallFilter(limit=limit)


def test_ended_reason_prefix_escapes_like_wildcards():
    sql, args = ops.calls_query(ops.CallFilter(ended_reason="pipeline_error-*"))
    assert "LIKE" in sql and args[-1] == "pipeline\\_error-%"
    sql, args = ops.calls_query(ops.CallFilter(ended_reason="customer-ended-call"))
    assert "LIKE" not in sql and args[-1] == "customer-ended-call"


def _row(**kw):
    base = {"call_sid": "CA1", "at": T0, "started_at": T0, "ended_at": T0 + timedelta(seconds=83), "from_number": "+15550001111",
            "to_number": "+15557654321", "assistant_id": "dental", "duration_s": 83.0, "turns": 6, "p50_latency_ms": 420.0,
            "tools_ok": 1, "tools_failed": 1, "tools_pending": 0, "ended_reason": "customer-ended-call", "recording_url": None}
    return base | kw


def test_calls_table_has_every_column_aligned():
    table = ops.format_calls_table([_row(), _row(call_sid="CA2", duration_s=3725.0, p50_latency_ms=None, tools_pending=2)])
    header, rule, first, second = table.splitlines()
    for name in ("when (UTC)", "from", "to", "assistant", "duration", "turns", "p50 latency", "tools ok/failed", "ended reason"):
        assert name in header
    assert "2026-12-01 09:00:00Z" in first and "1m23s" in first and "420 ms" in first and "1/1" in first
    assert "1h02m05s" in second and " - " in second and "1/1 (+2 pending)" in second
    # columns line up: "ended reason" starts at the same offset on every line
    col = header.index("ended reason")
    assert first[col:].startswith("customer-ended-call") and second[col:].startswith("customer-ended-call")


def test_calls_table_defuses_terminal_escapes():
    table = ops.format_calls_table([_row(from_number="\x1b[2J+1555", ended_reason="a\nb")])
    assert "\x1b" not in table and "\\x1b[2J+1555" in table and "a b" in table


def test_in_progress_call_says_so():
    cells = ops.call_table_cells(_row(ended_at=None, ended_reason=None, duration_s=None))
    assert cells[-1] == "(in progress)" and cells[5] == "-"


def test_json_line_hides_the_stream_token_and_marks_the_recording():
    line = orjson.loads(ops.call_summary_json(_row(custom_parameters='{"token": "s3cret"}', recording_url="https://x/Recordings/RE1")))
    assert "custom_parameters" not in line and "s3cret" not in orjson.dumps(line).decode()
    assert line["has_recording"] is True and line["turns"] == 6 and line["started_at"].startswith("2026-12-01T09:00:00")


def _transcript():
    start = T0
    return ops.Transcript(
        call={"call_sid": "CA1", "from_number": "+1555", "to_number": "+1666", "assistant_id": "dental", "started_at": start,
              "ended_at": start + timedelta(seconds=20), "ended_reason": "customer-ended-call", "recording_url": None,
              "custom_parameters": {"token": "s3cret"}},
        utterances=[
            {"seq": 2, "role": "user", "text": "Hours?", "started_at": start + timedelta(seconds=4)},
            {"seq": 1, "role": "assistant", "text": "Hello", "started_at": start + timedelta(seconds=0.5), "latency_ms": None},
            {"seq": 3, "role": "assistant", "text": "We open at", "full_text": "We open at nine.", "interrupted": True,
             "audio_ms": 3000, "heard_ms": 900, "latency_ms": 450, "started_at": start + timedelta(seconds=6)},
            {"seq": 4, "role": "user", "text": None, "started_at": None},
        ],
        tool_calls=[{"seq": 1, "name": "lookup", "arguments": {"day": "sat"}, "status": "ok", "result": "9-1", "latency_ms": 120,
                     "requested_at": start + timedelta(seconds=5), "http_status": 200}],
        events=[{"kind": "barge_in", "at": start + timedelta(seconds=6.9), "detail": {"response_id": "r1"}}],
    )


def test_timeline_is_spoken_order_with_tools_and_events_inline():
    kinds = [(e["type"], e.get("seq")) for e in ops.timeline(_transcript())]
    assert kinds == [("utterance", 1), ("utterance", 2), ("tool_call", 1), ("utterance", 3), ("event", None), ("utterance", 4)]


def test_transcript_text_marks_interruptions_and_tools():
    text = ops.format_transcript(_transcript())
    lines = text.splitlines()
    said = next(line for line in lines if "We open at" in line)
    assert "interrupted: heard 900 ms of 3000 ms" in said and "latency 450 ms" in said and "+6.0s" in said
    assert lines[lines.index(said) + 1].strip() == "full text: We open at nine."
    tool = next(line for line in lines if "lookup(" in line)
    assert '{"day":"sat"}' in tool and "ok in 120 ms (HTTP 200)" in tool and "+5.0s" in tool
    assert "result: 9-1" in text and "barge_in response_id=r1" in text
    assert text.index("Hello") < text.index("Hours?") < text.index("lookup(") < text.index("We open at")


def test_transcript_json_is_the_timeline_without_secrets():
    body = orjson.loads(ops.transcript_json(_transcript()))
    assert [e["type"] for e in body["timeline"]][:3] == ["utterance", "utterance", "tool_call"]
    assert body["timeline"][2]["arguments"] == {"day": "sat"}
    assert "custom_parameters" not in body["call"] and "s3cret" not in orjson.dumps(body).decode()


@pytest.mark.parametrize("url, expected", [
    ("https://api.twilio.com/2010-04-01/Accounts/AC" + "a" * 32 + "/Recordings/RE" + "b" * 32, ("AC" + "a" * 32, "RE" + "b" * 32)),
    ("http://127.0.0.1:9/2010-04-01/Accounts/AC" + "a" * 32 + "/Recordings/RE" + "b" * 32 + ".mp3", ("AC" + "a" * 32, "RE" + "b" * 32)),
    ("https://example.com/recording.wav", None),
    (None, None),
])
def test_recording_sid_comes_from_the_stored_url(url, expected):
    assert ops.recording_sid(url) == expected


# --- against Postgres -----------------------------------------------------------------------


async def _with(dsn, work):
    conn = await asyncpg.connect(dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


async def test_calls_query_aggregates_per_call(db_dsn, tmp_path):
    s = await seed(db_dsn, tmp_path)
    rows = await _with(db_dsn, lambda c: ops.fetch_calls(c, ops.CallFilter()))
    assert [r["call_sid"] for r in rows] == [s.failed, s.xss, s.dental, s.old]  # newest first
    dental = next(r for r in rows if r["call_sid"] == s.dental)
    assert dental["turns"] == 6 and dental["tools_ok"] == 1 and dental["tools_failed"] == 1 and dental["tools_pending"] == 0
    assert dental["p50_latency_ms"] == 420.0  # median of 420, 510, 380
    assert dental["duration_s"] == pytest.approx(83.0)
    assert dental["at"] == T0 and dental["recording_url"].endswith(s.recording_sid)
    failed = next(r for r in rows if r["call_sid"] == s.failed)
    assert failed["turns"] == 0 and failed["p50_latency_ms"] is None and failed["tools_ok"] == 0


@pytest.mark.parametrize("flt, expected", [
    (dict(since=T0 + timedelta(minutes=30)), ["failed", "xss"]),
    (dict(since=T0 - timedelta(days=1)), ["failed", "xss", "dental"]),
    (dict(number="+15550001111"), ["dental", "old"]),  # the caller
    (dict(number="+15559990000"), ["failed", "old"]),  # the called number
    (dict(assistant="luna"), ["failed", "old"]),
    (dict(assistant="Brightside Dental"), ["xss", "dental"]),  # by name too
    (dict(ended_reason="pipeline-error-*"), ["failed"]),
    (dict(ended_reason="customer-ended-call", number="+15550002222"), ["xss"]),
    (dict(ended_reason="pipeline-error"), []),  # exact unless a * says prefix
    (dict(limit=2), ["failed", "xss"]),
])
async def test_calls_filters(db_dsn, tmp_path, flt, expected):
    s = await seed(db_dsn, tmp_path)
    rows = await _with(db_dsn, lambda c: ops.fetch_calls(c, ops.CallFilter(**flt)))
    assert [r["call_sid"] for r in rows] == [getattr(s, name) for name in expected]


async def test_transcript_reads_a_call_in_spoken_order(db_dsn, tmp_path):
    s = await seed(db_dsn, tmp_path)
    t = await _with(db_dsn, lambda c: ops.fetch_transcript(c, s.dental))
    order = [(e["type"], e.get("seq") if e["type"] != "event" else e["kind"]) for e in ops.timeline(t)]
    assert order == [("utterance", 1), ("event", "recording_started"), ("utterance", 2), ("utterance", 3), ("event", "barge_in"),
                     ("utterance", 4), ("tool_call", 1), ("utterance", 5), ("tool_call", 2), ("utterance", 6)]
    assert t.tool_calls[0]["arguments"] == {"date": "2026-12-05"}  # jsonb decoded
    text = ops.format_transcript(t)
    assert "interrupted: heard 1700 ms of 5200 ms" in text
    assert "full text: On Saturdays we are open from nine in the morning until one in the afternoon." in text
    assert "book_appointment(" in text and "timeout after 20000 ms" in text
    assert f"recording: shim recording {s.dental}" in text
    assert await _with(db_dsn, lambda c: ops.fetch_transcript(c, "CA" + "9" * 32)) is None


async def test_transcript_json_carries_columns_added_later(db_dsn, tmp_path):
    """A column another migration adds reaches --json without a change to the queries."""
    s = await seed(db_dsn, tmp_path)

    async def add_column(conn):
        await conn.execute("ALTER TABLE tool_calls ADD COLUMN attempts integer")
        await conn.execute("UPDATE tool_calls SET attempts = 2, http_status = 200 WHERE call_sid = $1 AND seq = 1", s.dental)
        return await ops.fetch_transcript(conn, s.dental)

    t = await _with(db_dsn, add_column)
    tools = [e for e in orjson.loads(ops.transcript_json(t))["timeline"] if e["type"] == "tool_call"]
    assert tools[0]["attempts"] == 2 and tools[1]["attempts"] is None
    assert "ok in 312 ms (HTTP 200)" in ops.format_transcript(t)  # tool_calls.http_status (0005)


async def test_untrusted_text_stays_data(db_dsn, tmp_path):
    s = await seed(db_dsn, tmp_path)
    t = await _with(db_dsn, lambda c: ops.fetch_transcript(c, s.xss))
    assert XSS in ops.format_transcript(t)  # plain text on a terminal: shown as typed
