"""The webhooks' direct reads and writes: the few statements of shim/app.py that cannot wait
for the batching writer (`store.Recorder`), because an answer to Twilio depends on them. Named,
with the columns checked against the store's table specs (`store.TABLES`). Routing reads the
numbers table in shim/routes.py (in memory, kept fresh); the operator CLIs own their queries
(shim/numbers_cli.py, shim/ops.py, shim/parity/).
"""

from __future__ import annotations

from typing import Any

import orjson

from .store import TABLES

_ASSISTANT_REQUEST_COLUMNS = ("call_sid", "from_number", "to_number", "account_sid", "status", "stack", "assistant_request")
assert set(_ASSISTANT_REQUEST_COLUMNS) | {"next_action"} <= set(TABLES["calls"].columns), "calls columns drifted"


def _json(raw: Any) -> Any:
    return orjson.loads(raw) if isinstance(raw, (str, bytes)) else raw


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
