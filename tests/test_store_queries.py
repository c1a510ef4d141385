"""The store's direct reads and writes (shim/store_queries.py) against real Postgres."""

from __future__ import annotations

import asyncpg

from shim import store_queries


async def test_assistant_request_and_next_action_round_trip(db_dsn):
    conn = await asyncpg.connect(db_dsn)
    try:
        row = {"call_sid": "CA1", "from_number": "+14155550111", "to_number": "+14155550100", "account_sid": "AC1",
               "status": "ringing", "stack": "shim", "assistant_request": {"assistantId": "acme"}}
        await store_queries.save_assistant_request(conn, row)
        await store_queries.save_assistant_request(conn, {**row, "assistant_request": {"assistantId": "other"}})
        assert await store_queries.assistant_request(conn, "CA1") == {"assistantId": "other"}
        assert await store_queries.assistant_request(conn, "CA_missing") is None
        assert await store_queries.next_action(conn, "CA1") is None
        await conn.execute("""UPDATE calls SET next_action = '{"verb": "hangup"}'::jsonb WHERE call_sid = 'CA1'""")
        assert await store_queries.next_action(conn, "CA1") == {"verb": "hangup"}
    finally:
        await conn.close()
