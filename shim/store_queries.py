"""The store's direct reads and writes: the few statements that cannot wait for the batching
writer (`store.Recorder`), because an answer to Twilio or the CLI depends on them. Every SQL
statement outside the writer lives here, named, with the columns checked against the store's
table specs (`store.TABLES`), so a schema change has one place to look.
"""

from __future__ import annotations

from typing import Any

import orjson

from .store import TABLES

_NUMBER_COLUMNS = ("number", "assistant_id", "server_url", "stack")
_ASSISTANT_REQUEST_COLUMNS = ("call_sid", "from_number", "to_number", "account_sid", "status", "stack", "assistant_request")
assert set(_NUMBER_COLUMNS) <= set(TABLES["numbers"].columns), "numbers columns drifted from store.TABLES"
assert set(_ASSISTANT_REQUEST_COLUMNS) | {"next_action"} <= set(TABLES["calls"].columns), "calls columns drifted"


def _json(raw: Any) -> Any:
    return orjson.loads(raw) if isinstance(raw, (str, bytes)) else raw


async def number_route(conn: Any, number: str, *, timeout: float = 2) -> dict[str, Any] | None:
    """The numbers row for `number` ({assistant_id, server_url}), or None."""
    row = await conn.fetchrow("SELECT assistant_id, server_url FROM numbers WHERE number = $1", number, timeout=timeout)
    return dict(row) if row else None


async def set_number(conn: Any, number: str, assistant_id: str | None, server_url: str | None) -> None:
    await conn.execute(
        """INSERT INTO numbers (number, assistant_id, server_url, updated_at) VALUES ($1, $2, $3, now())
           ON CONFLICT (number) DO UPDATE SET assistant_id = EXCLUDED.assistant_id,
               server_url = EXCLUDED.server_url, updated_at = now()""",
        number, assistant_id, server_url,
    )


async def list_numbers(conn: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT number, assistant_id, server_url, stack, updated_at FROM numbers ORDER BY number")
    return [dict(row) for row in rows]


async def save_assistant_request(conn: Any, row: dict[str, Any], *, timeout: float = 2) -> None:
    """The number server's assistant-request answer on the call row, before Twilio is answered
    (the media stream may reach another instance)."""
    await conn.execute(
        """INSERT INTO calls (call_sid, from_number, to_number, account_sid, status, stack, assistant_request)
           VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
           ON CONFLICT (call_sid) DO UPDATE SET assistant_request = EXCLUDED.assistant_request, updated_at = now()""",
        row["call_sid"], row["from_number"], row["to_number"], row["account_sid"], row["status"], row["stack"],
        orjson.dumps(row["assistant_request"]).decode(), timeout=timeout,
    )


async def assistant_request(conn: Any, call_sid: str, *, timeout: float = 2) -> Any:
    return _json(await conn.fetchval("SELECT assistant_request FROM calls WHERE call_sid = $1", call_sid, timeout=timeout))


async def next_action(conn: Any, call_sid: str, *, timeout: float = 2) -> Any:
    """What /twilio/stream-ended answers for the call (written by the instance that ended it)."""
    return _json(await conn.fetchval("SELECT next_action FROM calls WHERE call_sid = $1", call_sid, timeout=timeout))
