"""`shim parity import-vapi`: Vapi's call log into `calls` / `utterances` / `tool_calls`.

Each Vapi call becomes a `calls` row with ``stack = 'vapi'`` and ``call_sid`` = the Vapi call id
(the Twilio CallSid, when there is one, is kept in ``metadata.phoneCallProviderId``), with Vapi's
``cost`` / ``costs[]`` and recording URLs; its ``bot`` / ``user`` messages become utterances in
time order (assistant ``latency_ms`` = the bot message's start minus the end of the user message
before it, the closest Vapi's log comes to turn latency), and ``tool_calls`` messages paired with
their ``tool_call_result`` by ``toolCallId`` become tool_calls rows.

Idempotent: rows are keyed (call_sid; call_sid + seq) and upserted, one transaction per call, so
importing the same window again adds nothing (and refreshes what Vapi changed). Calls that have
not ended are skipped (they are imported once they have).

`map_call` is pure (a Vapi Call dict → rows); `import_calls` does the I/O.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from .vapi_client import VapiClient

log = structlog.get_logger(__name__)

FAILED_RESULTS = ("No result returned.",)  # what Vapi's log shows when a tool failed or timed out


@dataclass
class ImportedCall:
    call: dict[str, Any]
    utterances: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]


@dataclass
class ImportStats:
    seen: int = 0
    inserted: int = 0
    updated: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"seen": self.seen, "inserted": self.inserted, "updated": self.updated, "skipped_not_ended": self.skipped}


def _ts(value: Any) -> dt.datetime | None:
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value / 1000, dt.UTC)
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _messages(call: dict[str, Any]) -> list[dict[str, Any]]:
    artifact = call.get("artifact") or {}
    msgs = artifact.get("messages") or call.get("messages") or []
    return [m for m in msgs if isinstance(m, dict)]


def map_call(call: dict[str, Any]) -> ImportedCall:
    """A Vapi Call object → a calls row and its utterances / tool_calls rows."""
    cid = call["id"]
    artifact = call.get("artifact") or {}
    customer = call.get("customer") or {}
    phone = call.get("phoneNumber") or {}
    inbound = call.get("type") != "outboundPhoneCall"
    caller, callee = customer.get("number"), phone.get("number")
    assistant = call.get("assistant") or {}
    model = (assistant.get("model") or {}).get("model") if isinstance(assistant.get("model"), dict) else None
    analysis = call.get("analysis") or None
    row = {
        "call_sid": cid,
        "stack": "vapi",
        "assistant_id": call.get("assistantId"),
        "assistant_name": assistant.get("name"),
        "from_number": caller if inbound else callee,
        "to_number": callee if inbound else caller,
        "model": model,
        "status": call.get("status"),
        "started_at": _ts(call.get("startedAt")),
        "ended_at": _ts(call.get("endedAt")),
        "ended_reason": call.get("endedReason"),
        "recording_url": artifact.get("recordingUrl") or call.get("recordingUrl"),
        "stereo_recording_url": artifact.get("stereoRecordingUrl") or call.get("stereoRecordingUrl"),
        "summary": (analysis or {}).get("summary") or call.get("summary"),
        "analysis": analysis,
        "cost_usd": call.get("cost"),
        "costs": call.get("costs"),
        "metadata": {"vapi": {k: call.get(k) for k in ("type", "phoneCallProviderId", "phoneNumberId", "orgId")
                              if call.get(k) is not None}},
    }
    utterances: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    msgs = sorted(_messages(call), key=lambda m: float(m.get("time") or 0))
    for m in msgs:
        if m.get("role") == "tool_call_result" and isinstance(m.get("toolCallId"), str):
            results[m["toolCallId"]] = m
    last_user_end: float | None = None
    for m in msgs:
        role = m.get("role")
        start, end = m.get("time"), m.get("endTime")
        if role in ("bot", "assistant", "user"):
            is_user = role == "user"
            latency = None
            if not is_user and last_user_end is not None and isinstance(start, (int, float)):
                latency = max(0, round(start - last_user_end))
            utterances.append({
                "seq": len(utterances),
                "role": "user" if is_user else "assistant",
                "text": m.get("message"),
                "started_at": _ts(start),
                "ended_at": _ts(end),
                "audio_ms": round(end - start) if not is_user and isinstance(start, (int, float)) and isinstance(end, (int, float)) else None,
                "latency_ms": latency,
            })
            last_user_end = end if is_user and isinstance(end, (int, float)) else (None if not is_user else last_user_end)
        elif role == "tool_calls":
            for tc in m.get("toolCalls") or []:
                fn = tc.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        args = {"_raw": args}
                result = results.get(tc.get("id"))
                text = result.get("result") if result else None
                status = "requested" if result is None else ("error" if text in FAILED_RESULTS else "ok")
                done = result.get("time") if result else None
                tool_calls.append({
                    "seq": len(tool_calls),
                    "call_id": tc.get("id"),
                    "name": fn.get("name"),
                    "arguments": args,
                    "status": status,
                    "result": text,
                    "requested_at": _ts(start),
                    "completed_at": _ts(done),
                    "latency_ms": round(done - start) if isinstance(done, (int, float)) and isinstance(start, (int, float)) else None,
                })
    return ImportedCall(row, utterances, tool_calls)


_CALL_COLS = ("call_sid", "stack", "assistant_id", "assistant_name", "from_number", "to_number", "model", "status",
              "started_at", "ended_at", "ended_reason", "recording_url", "stereo_recording_url", "summary",
              "analysis", "cost_usd", "costs", "metadata")
_JSON_COLS = {"analysis", "costs", "metadata"}
_UTT_COLS = ("call_sid", "seq", "role", "text", "started_at", "ended_at", "audio_ms", "latency_ms")
_TOOL_COLS = ("call_sid", "seq", "call_id", "name", "arguments", "status", "result", "requested_at", "completed_at",
              "latency_ms")


def _upsert_sql(table: str, cols: tuple[str, ...], key: tuple[str, ...], casts: dict[str, str]) -> str:
    values = ", ".join(f"${i}{casts.get(c, '')}" for i, c in enumerate(cols, 1))
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in key)
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({values}) ON CONFLICT ({', '.join(key)}) "
            f"DO UPDATE SET {sets}")


_CALL_SQL = _upsert_sql("calls", _CALL_COLS, ("call_sid",),
                        {"analysis": "::jsonb", "costs": "::jsonb", "metadata": "::jsonb", "cost_usd": "::numeric"}
                        ) + ", updated_at = now() RETURNING (xmax = 0) AS inserted"
_UTT_SQL = _upsert_sql("utterances", _UTT_COLS, ("call_sid", "seq"), {})
_TOOL_SQL = _upsert_sql("tool_calls", _TOOL_COLS, ("call_sid", "seq"), {"arguments": "::jsonb"})


async def store_call(conn: Any, imported: ImportedCall) -> bool:
    """Upsert one call and its rows in one transaction; True when the call row is new."""
    row = imported.call
    sid = row["call_sid"]
    values = [json.dumps(row[c]) if c in _JSON_COLS and row[c] is not None else row[c] for c in _CALL_COLS]
    if values[_CALL_COLS.index("cost_usd")] is not None:
        values[_CALL_COLS.index("cost_usd")] = str(values[_CALL_COLS.index("cost_usd")])
    async with conn.transaction():
        inserted = await conn.fetchval(_CALL_SQL, *values)
        if imported.utterances:
            await conn.executemany(_UTT_SQL, [(sid, *(u[c] for c in _UTT_COLS[1:])) for u in imported.utterances])
        await conn.execute("DELETE FROM utterances WHERE call_sid = $1 AND seq >= $2", sid, len(imported.utterances))
        if imported.tool_calls:
            await conn.executemany(_TOOL_SQL, [
                (sid, *(json.dumps(t[c]) if c == "arguments" and t[c] is not None else t[c] for c in _TOOL_COLS[1:]))
                for t in imported.tool_calls])
        await conn.execute("DELETE FROM tool_calls WHERE call_sid = $1 AND seq >= $2", sid, len(imported.tool_calls))
    return bool(inserted)


async def import_calls(conn: Any, client: VapiClient, *, since: dt.datetime, assistant_id: str | None = None,
                       progress=None) -> ImportStats:
    stats = ImportStats()
    async for call in client.list_calls(since=since, assistant_id=assistant_id):
        stats.seen += 1
        if call.get("status") != "ended" or not call.get("endedAt"):
            stats.skipped += 1
            stats.skipped_ids.append(call["id"])
        else:
            if await store_call(conn, map_call(call)):
                stats.inserted += 1
            else:
                stats.updated += 1
        if progress is not None:
            progress(stats)
    log.info("parity.import_vapi.done", **stats.to_json())
    return stats
