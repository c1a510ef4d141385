"""The voice webhook's in-memory routing table (shim/routes.py) against a real Postgres: what it
holds after races between a webhook's lookup and the refresh, and after changes the poll alone
must notice."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from shim.routes import NumberRoutes

NUMBER = "+15550002222"


class SlowPool:
    """Stands in for the server's pool: answers a lookup with the row as it was when asked,
    but only once the test lets it (a slow query racing the refresh)."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def fetchrow(self, sql: str, *args, timeout: float | None = None):
        conn = await asyncpg.connect(self.dsn)
        try:
            row = await conn.fetchrow(sql, *args)
        finally:
            await conn.close()
        self.asked.set()
        await self.release.wait()
        return row


async def wait_for(predicate, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not within 5 s"
        await asyncio.sleep(0.02)


async def test_a_slow_lookup_never_puts_back_a_route_the_refresh_has_replaced(tmp_path, db_dsn):
    conn = await asyncpg.connect(db_dsn)
    pool = SlowPool(db_dsn)

    async def get_pool():
        return pool

    routes = NumberRoutes(lambda: db_dsn, tmp_path / "numbers.json", get_pool)
    try:
        await routes.start()
        # The number is added after the table was loaded: a call to it asks Postgres ...
        await conn.execute("ALTER TABLE numbers DISABLE TRIGGER numbers_changed")  # the refresh waits for the poll
        await conn.execute("INSERT INTO numbers (number, assistant_id, updated_at) VALUES ($1, 'old', now())", NUMBER)
        lookup = asyncio.create_task(routes.lookup(NUMBER))
        await asyncio.wait_for(pool.asked.wait(), 5)
        # ... and while that answer is on its way, the number changes and the refresh applies it.
        await conn.execute("UPDATE numbers SET assistant_id = 'new', updated_at = now() + interval '1 second'")
        await wait_for(lambda: routes.get(NUMBER) is not None and routes.get(NUMBER).assistant_id == "new")
        pool.release.set()
        await asyncio.wait_for(lookup, 5)
        assert routes.get(NUMBER).assistant_id == "new"  # the slower, older answer did not win
        assert (await routes.lookup(NUMBER)).assistant_id == "new"
    finally:
        pool.release.set()
        await routes.stop()
        await conn.close()


async def test_the_poll_alone_sees_an_edit_that_leaves_updated_at_alone(tmp_path, db_dsn):
    """Without NOTIFY (a lost notification, or a pooler that drops LISTEN), the periodic check
    must still see any change, e.g. `UPDATE numbers SET assistant_id = …` typed in psql."""
    conn = await asyncpg.connect(db_dsn)

    async def no_pool():
        raise OSError("not used")

    routes = NumberRoutes(lambda: db_dsn, tmp_path / "numbers.json", no_pool)
    try:
        await conn.execute("INSERT INTO numbers (number, assistant_id, updated_at) VALUES ($1, 'old', now())", NUMBER)
        await routes.start()
        # The refresh task is running (it saw a change it was told about), then NOTIFY stops.
        await conn.execute("UPDATE numbers SET assistant_id = 'older', updated_at = now()")
        await wait_for(lambda: routes.get(NUMBER).assistant_id == "older")
        await conn.execute("ALTER TABLE numbers DISABLE TRIGGER numbers_changed")
        await conn.execute("UPDATE numbers SET assistant_id = 'new'")  # updated_at untouched
        await wait_for(lambda: routes.get(NUMBER).assistant_id == "new")
    finally:
        await routes.stop()
        await conn.close()


async def test_a_hand_edited_row_of_an_unexpected_shape_does_not_stop_the_routing(tmp_path, db_dsn):
    """`previous_settings` is jsonb without a schema: a value typed in psql that is not an object
    must neither stop the instance from starting nor from following later changes."""
    conn = await asyncpg.connect(db_dsn)

    async def no_pool():
        raise OSError("not used")

    routes = NumberRoutes(lambda: db_dsn, tmp_path / "numbers.json", no_pool)
    try:
        await conn.execute(
            """INSERT INTO numbers (number, assistant_id, previous_settings, split_percent)
               VALUES ($1, 'old', NULL, 100), ('+15550003333', 'demo', '"https://api.vapi.ai/twilio/inbound_call"'::jsonb, 0),
                      ('+15550004444', 'demo', '{"VoiceUrl": 7}'::jsonb, 0)""", NUMBER)
        await routes.start()
        assert routes.get(NUMBER).assistant_id == "old"
        for odd in ("+15550003333", "+15550004444"):  # nowhere to redirect to: the shim keeps the callers
            assert routes.get(odd).on_shim("+14155550123")
        await conn.execute("UPDATE numbers SET assistant_id = 'new', updated_at = now() WHERE number = $1", NUMBER)
        await wait_for(lambda: routes.get(NUMBER).assistant_id == "new")
    finally:
        await routes.stop()
        await conn.close()


async def test_a_number_missing_from_a_snapshot_is_unknown_not_unconfigured(tmp_path):
    """Started during an outage from a snapshot written earlier on this host: a number moved to
    the shim since (from another host) is not in it. Answering "not in service" would drop the
    call; RoutingUnavailable makes the webhook fail so Twilio fetches the VoiceFallbackUrl (Vapi)."""
    from shim.numbers import Route
    from shim.routes import RoutingUnavailable, write_snapshot
    from shim.testing._serve import free_port

    snapshot = tmp_path / "numbers.json"
    assert write_snapshot(snapshot, [Route(number=NUMBER, assistant_id="demo")])

    async def no_pool():
        raise OSError("Postgres is down")

    routes = NumberRoutes(lambda: f"postgresql://shim@127.0.0.1:{free_port()}/shim", snapshot, no_pool)
    try:
        await routes.start(initial_timeout=1)
        assert (await routes.lookup(NUMBER)).assistant_id == "demo"
        with pytest.raises(RoutingUnavailable, match=r"\+15550003333"):
            await routes.lookup("+15550003333")
    finally:
        await routes.stop()


class CountingPool:
    def __init__(self, dsn: str):
        self.dsn, self.asked = dsn, 0

    async def fetchrow(self, sql: str, *args, timeout: float | None = None):
        self.asked += 1
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchrow(sql, *args)
        finally:
            await conn.close()


async def test_a_number_postgres_does_not_have_is_asked_once_until_the_table_changes(tmp_path, db_dsn):
    pool = CountingPool(db_dsn)

    async def get_pool():
        return pool

    routes = NumberRoutes(lambda: db_dsn, tmp_path / "numbers.json", get_pool)
    conn = await asyncpg.connect(db_dsn)
    try:
        await routes.start()
        await wait_for(lambda: routes._version >= 2)  # the refresh loop's own first read: a refresh forgets misses
        other = "+15550003333"
        assert [await routes.lookup(other) for _ in range(3)] == [None, None, None]
        assert pool.asked == 1  # each call's set-up no longer waits on a query
        await conn.execute("INSERT INTO numbers (number, assistant_id, updated_at) VALUES ($1, 'new', now())", other)
        await wait_for(lambda: routes.get(other) is not None)  # NOTIFY: the refresh forgets the misses
        assert (await routes.lookup(other)).assistant_id == "new"
    finally:
        await conn.execute("DELETE FROM numbers WHERE number = '+15550003333'")
        await conn.close()
        await routes.stop()


async def test_stop_ends_the_refresh_even_when_a_notification_lands_with_the_cancel(tmp_path, db_dsn):
    """A NOTIFY (the DELETE a test or a CLI runs just before shutdown) wakes the poll's wait in the
    same turn of the loop as stop()'s cancel. Python 3.11's asyncio.wait_for then returned the
    event's result and dropped the cancel, the refresh loop went on for ever, and stop() never
    returned: it hung CI for 90 minutes, and a server's shutdown before the recorder's rows were
    spooled."""

    async def no_pool():
        raise OSError("not used")

    routes = NumberRoutes(lambda: db_dsn, tmp_path / "numbers.json", no_pool)
    await routes.start()
    await wait_for(lambda: routes._version >= 2)  # the loop is in its wait between polls
    await asyncio.sleep(0.05)
    refresh = routes._task
    routes._on_notify()  # what a NOTIFY does, in the same turn as the cancel below
    stopping = asyncio.create_task(routes.stop())
    done, _ = await asyncio.wait({stopping}, timeout=3)  # (asyncio.wait: it never cancels stop())
    assert stopping in done, "stop() still waits for the refresh loop"
    assert refresh.done()
