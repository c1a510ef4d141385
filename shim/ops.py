"""The operator's view of calls: the SQL behind `shim calls` / `shim transcript` and the call
browser (shim/admin.py), and pure functions that turn its rows into a table, a transcript or
JSON. The formatting never touches a database, so it is tested on plain dicts.

Child tables are read with `SELECT *` and rows are handled as dicts: a column another migration
adds (tool_calls.http_status, calls.cost_usd…) reaches the JSON output without a change here,
and showing it in the table or transcript is one line in the formatter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable

import orjson

__all__ = [
    "CallFilter", "Transcript", "UsageError", "calls_query", "fetch_calls", "fetch_transcript", "call_exists",
    "parse_since", "format_calls_table", "format_transcript", "call_summary_json", "transcript_json",
    "timeline", "recording_sid", "TOOLS_OK", "TOOLS_FAILED",
]

# tool_calls.status values (shim/call.py): requested (no answer yet), ok, async (answered at once,
# webhook in the background), error, timeout.
TOOLS_OK = ("ok", "async")
TOOLS_FAILED = ("error", "timeout")
# Columns never shown: the per-call stream token sits in custom_parameters (a credential for the
# media stream), next_action / assistant_request are internal hand-offs between instances.
HIDDEN_CALL_COLUMNS = frozenset({"custom_parameters", "next_action", "assistant_request"})
DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000


class UsageError(ValueError):
    """An argument the operator gave is unusable (the message says which, and what was expected)."""


# --- arguments ------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^\s*(\d+)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: a relative age (`30m`, `2h`, `7d`, `1w`) before `now`, or an ISO date or date-time
    (`2026-12-01`, `2026-12-01T08:00`, `2026-12-01 08:00+01:00`). Naive times are UTC."""
    raw = (text or "").strip()
    match = _RELATIVE.match(raw)
    if match:
        return now - timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        when = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected an age like 30m, 2h, 7d, 1w or an ISO date/time like 2026-12-01 or 2026-12-01T08:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class CallFilter:
    since: datetime | None = None
    number: str | None = None  # matches the caller or the called number
    assistant: str | None = None  # assistant id or name
    ended_reason: str | None = None  # exact, or a prefix ending in '*' (pipeline-error-*)
    limit: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise UsageError(f"--limit {self.limit}: expected 1 to {MAX_LIMIT}")


# --- queries --------------------------------------------------------------------------------

_CALLS_SQL = """
SELECT c.*,
       coalesce(c.started_at, c.created_at) AS at,
       extract(epoch FROM c.ended_at - c.started_at)::float8 AS duration_s,
       coalesce(u.turns, 0) AS turns,
       u.p50_latency_ms,
       coalesce(t.tools_ok, 0) AS tools_ok,
       coalesce(t.tools_failed, 0) AS tools_failed,
       coalesce(t.tools_pending, 0) AS tools_pending
  FROM calls c
  LEFT JOIN LATERAL (
        SELECT count(*) AS turns,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)
                   FILTER (WHERE role = 'assistant' AND latency_ms IS NOT NULL) AS p50_latency_ms
          FROM utterances WHERE call_sid = c.call_sid) u ON true
  LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE status = ANY($1::text[])) AS tools_ok,
               count(*) FILTER (WHERE status = ANY($2::text[])) AS tools_failed,
               count(*) FILTER (WHERE status = 'requested') AS tools_pending
          FROM tool_calls WHERE call_sid = c.call_sid) t ON true
 {where}
 ORDER BY coalesce(c.started_at, c.created_at) DESC, c.call_sid
 LIMIT {limit}
"""


def calls_query(flt: CallFilter) -> tuple[str, list[Any]]:
    """The SQL and its arguments for the calls list (newest first)."""
    args: list[Any] = [list(TOOLS_OK), list(TOOLS_FAILED)]
    where: list[str] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if flt.since is not None:
        where.append(f"coalesce(c.started_at, c.created_at) >= {arg(flt.since)}")
    if flt.number:
        p = arg(flt.number.strip())
        where.append(f"(c.from_number = {p} OR c.to_number = {p})")
    if flt.assistant:
        p = arg(flt.assistant.strip())
        where.append(f"(c.assistant_id = {p} OR c.assistant_name = {p})")
    if flt.ended_reason:
        reason = flt.ended_reason.strip()
        if reason.endswith("*"):
            escaped = reason[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(f"c.ended_reason LIKE {arg(escaped + '%')}")
        else:
            where.append(f"c.ended_reason = {arg(reason)}")
    sql = _CALLS_SQL.format(where=("WHERE " + " AND ".join(where)) if where else "", limit=int(flt.limit))
    return sql, args


async def fetch_calls(conn, flt: CallFilter) -> list[dict[str, Any]]:
    sql, args = calls_query(flt)
    return [dict(r) for r in await conn.fetch(sql, *args)]


async def call_exists(conn, call_sid: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM calls WHERE call_sid = $1", call_sid))


@dataclass
class Transcript:
    call: dict[str, Any]
    utterances: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]
    events: list[dict[str, Any]]


async def fetch_transcript(conn, call_sid: str) -> Transcript | None:
    """Everything about one call, or None when no such call was recorded."""
    call = await conn.fetchrow("SELECT * FROM calls WHERE call_sid = $1", call_sid)
    if call is None:
        return None
    utterances = await conn.fetch(
        "SELECT * FROM utterances WHERE call_sid = $1 ORDER BY started_at NULLS LAST, seq", call_sid)
    tool_calls = await conn.fetch("SELECT * FROM tool_calls WHERE call_sid = $1 ORDER BY seq", call_sid)
    events = await conn.fetch("SELECT * FROM call_events WHERE call_sid = $1 ORDER BY at, id", call_sid)
    return Transcript(
        call=dict(call),
        utterances=[dict(r) for r in utterances],
        tool_calls=[_decode_json_columns(dict(r), ("arguments",)) for r in tool_calls],
        events=[_decode_json_columns(dict(r), ("detail",)) for r in events],
    )


def _decode_json_columns(row: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    for column in columns:  # asyncpg hands jsonb over as text unless a codec is set
        value = row.get(column)
        if isinstance(value, (str, bytes)):
            try:
                row[column] = orjson.loads(value)
            except orjson.JSONDecodeError:
                pass
    return row


# --- timeline -------------------------------------------------------------------------------


def timeline(t: Transcript) -> list[dict[str, Any]]:
    """Turns, tool calls and events in the order they happened: turns by when their words began
    (utterances.started_at), tool calls by when the model asked (requested_at), events by `at`.
    Items without a time keep their own order, after the timed ones."""
    entries: list[tuple[tuple, dict[str, Any]]] = []
    for i, u in enumerate(t.utterances):
        entries.append(((u.get("started_at") is None, u.get("started_at") or _EPOCH, 0, i), {"type": "utterance", **u}))
    for i, c in enumerate(t.tool_calls):
        entries.append(((c.get("requested_at") is None, c.get("requested_at") or _EPOCH, 1, i), {"type": "tool_call", **c}))
    for i, e in enumerate(t.events):
        entries.append(((e.get("at") is None, e.get("at") or _EPOCH, 2, i), {"type": "event", **e}))
    entries.sort(key=lambda pair: pair[0])
    return [entry for _, entry in entries]


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# --- formatting -----------------------------------------------------------------------------


def utc_text(ts: datetime | None) -> str:
    if ts is None:
        return "-"
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{int(round(value))} ms"


CALL_TABLE_COLUMNS = ("when (UTC)", "call", "from", "to", "assistant", "duration", "turns", "p50 latency", "tools ok/failed", "ended reason")


def call_table_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """One calls-list row as display strings (shared by the terminal table and the call browser)."""
    tools = f"{row.get('tools_ok', 0)}/{row.get('tools_failed', 0)}"
    if row.get("tools_pending"):
        tools += f" (+{row['tools_pending']} pending)"
    ended = row.get("ended_reason") or ("(in progress)" if row.get("ended_at") is None and row.get("started_at") else "-")
    return (
        utc_text(row.get("at") or row.get("started_at")),
        row.get("call_sid") or "-",
        row.get("from_number") or "-",
        row.get("to_number") or "-",
        row.get("assistant_id") or row.get("assistant_name") or "-",
        format_duration(row.get("duration_s")),
        str(row.get("turns", 0)),
        _ms(row.get("p50_latency_ms")),
        tools,
        ended,
    )


def _clean(text: str) -> str:
    """One line of terminal-safe text: control characters (escape sequences from an untrusted
    transcript could rewrite the operator's terminal) become spaces or visible escapes."""
    return "".join(ch if ch.isprintable() else (" " if ch in "\n\r\t" else f"\\x{ord(ch):02x}") for ch in text)


def format_calls_table(rows: list[dict[str, Any]]) -> str:
    cells = [tuple(_clean(c) for c in call_table_cells(r)) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(CALL_TABLE_COLUMNS)]
    numeric = {5, 6, 7}  # duration, turns, latency: right-aligned

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    out = [line(CALL_TABLE_COLUMNS), line(tuple("-" * w for w in widths))]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if key in HIDDEN_CALL_COLUMNS:
            continue
        if isinstance(value, (str, bytes)) and key in ("metadata", "analysis", "transfer"):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                pass
        out[key] = value
    return out


def call_summary_json(row: dict[str, Any]) -> bytes:
    """One JSON line of `shim calls --json`: the call's columns plus the computed ones."""
    out = _jsonable(row)
    out["has_recording"] = bool(row.get("recording_url"))
    return orjson.dumps(out, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def _json_default(value: Any) -> Any:
    from decimal import Decimal
    from uuid import UUID

    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, UUID):
        return str(value)
    raise TypeError


def transcript_json(t: Transcript) -> bytes:
    """`shim transcript --json`: {"call": {...}, "timeline": [...]} (times as ISO 8601)."""
    body = {"call": _jsonable(t.call), "timeline": timeline(t)}
    return orjson.dumps(body, default=_json_default, option=orjson.OPT_NON_STR_KEYS)


def _offset(ts: datetime | None, start: datetime | None) -> str:
    if ts is None or start is None:
        return "   ?   "
    seconds = (ts - start).total_seconds()
    return f"{seconds:+7.1f}s"


def compact_text(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=_json_default).decode()
    text = _clean(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tool_outcome(call: dict[str, Any]) -> str:
    """`ok in 312 ms`, `timeout after 20000 ms`, `no answer yet`… (plus the HTTP status when stored)."""
    status = call.get("status") or "requested"
    latency = call.get("latency_ms")
    if status == "requested":
        return "no answer yet"
    text = status + (f" in {latency} ms" if latency is not None and status in TOOLS_OK else
                     f" after {latency} ms" if latency is not None else "")
    if call.get("http_status") is not None:  # tool_calls.http_status, once that column exists
        text += f" (HTTP {call['http_status']})"
    return text


def format_transcript(t: Transcript) -> str:
    c = t.call
    start = c.get("started_at")
    who = c.get("assistant_id") or c.get("assistant_name") or "-"
    duration = (c["ended_at"] - start).total_seconds() if c.get("ended_at") and start else None
    ended = c.get("ended_reason") or ("-" if c.get("ended_at") else "(in progress)")
    lines = [
        f"call {c['call_sid']}  {c.get('from_number') or '-'} -> {c.get('to_number') or '-'}  assistant {who}",
        f"started {utc_text(start)}  duration {format_duration(duration)}  ended {_clean(ended)}",
    ]
    if c.get("recording_url"):
        lines.append(f"recording: shim recording {c['call_sid']} -o {c['call_sid']}.wav")
    if c.get("summary"):
        lines.append(f"summary: {_clean(c['summary'])}")
    lines.append("")
    pad = " " * 21
    for entry in timeline(t):
        kind = entry["type"]
        if kind == "utterance":
            role = entry["role"]
            text = _clean(entry.get("text") or "")
            notes = []
            if entry.get("interrupted"):
                heard, sent = entry.get("heard_ms"), entry.get("audio_ms")
                notes.append(f"interrupted: heard {_ms(heard)} of {_ms(sent)}" if heard is not None and sent else "interrupted")
            if role == "assistant" and entry.get("latency_ms") is not None:
                notes.append(f"latency {entry['latency_ms']} ms")
            suffix = f"   [{'; '.join(notes)}]" if notes else ""
            lines.append(f"{_offset(entry.get('started_at'), start)}  {role:<9}  {text or '(no text)'}{suffix}")
            if entry.get("interrupted") and entry.get("full_text") and entry.get("full_text") != entry.get("text"):
                lines.append(f"{pad}full text: {_clean(entry['full_text'])}")
        elif kind == "tool_call":
            lines.append(f"{_offset(entry.get('requested_at'), start)}  {'tool':<9}  "
                         f"{_clean(entry.get('name') or '?')}({compact_text(entry.get('arguments') or {})}) -> {tool_outcome(entry)}")
            if entry.get("result"):
                lines.append(f"{pad}result: {compact_text(entry['result'])}")
            if entry.get("error") and entry.get("error") != entry.get("result"):
                lines.append(f"{pad}error: {compact_text(entry['error'])}")
        else:
            detail = entry.get("detail") or {}
            shown = " ".join(f"{k}={compact_text(v, 120)}" for k, v in detail.items() if v is not None) if isinstance(detail, dict) else compact_text(detail)
            lines.append(f"{_offset(entry.get('at'), start)}  {'event':<9}  {_clean(entry.get('kind') or '?')} {shown}".rstrip())
    if len(lines) and lines[-1] == "":
        lines.append("(nothing was said)")
    return "\n".join(lines)


# --- recordings -----------------------------------------------------------------------------

_RECORDING_SID = re.compile(r"/Accounts/(AC[0-9a-fA-F]{32}|[A-Za-z0-9]+)/Recordings/(RE[0-9a-fA-F]{32})(?:\.[a-z0-9]+)?$")


def recording_sid(recording_url: str | None) -> tuple[str, str] | None:
    """(account sid, recording sid) from calls.recording_url, or None when it names no recording."""
    if not recording_url:
        return None
    match = _RECORDING_SID.search(recording_url.split("?", 1)[0])
    return (match.group(1), match.group(2)) if match else None
