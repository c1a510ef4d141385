"""The voice webhook's routing table: an in-memory copy of the `numbers` table, so a call that
rings while Postgres is away is still answered as configured.

One task per instance keeps it fresh: a dedicated connection LISTENs on `shim_numbers` (a trigger
NOTIFYs on every change, so a CLI change is live in well under a second), and every POLL_S
seconds reads the table's version (a digest of its rows), re-reading the rows when it
moved and every FULL_READ_S regardless (a lost notification or connection costs at most POLL_S).
Each new version is written to a snapshot file, which a restart during an outage starts from.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Awaitable, Callable

import asyncpg
import orjson
import structlog

from .aio import cancel_and_wait, wait_event
from .numbers import Route

log = structlog.get_logger("shim.routes")

POLL_S = 2.0
FULL_READ_S = 30.0  # between polls only the version (a digest of the rows) is read
QUERY_TIMEOUT_S = 3.0
MISS_TIMEOUT_S = 1.0  # a number not in the table: how long the webhook may ask Postgres
CHANNEL = "shim_numbers"
_COLUMNS = "number, assistant_id, server_url, split_percent, previous_settings, fallback_destination"
# The table's version: a digest of every row, computed by Postgres (32 bytes on the wire). Not
# (count, max(updated_at)): an edit in SQL that leaves updated_at alone, or a transaction that
# commits after a later one (its now() is older), would not move that for FULL_READ_S.
_VERSION_SQL = "SELECT md5(coalesce(string_agg(n::text, ',' ORDER BY n.number), '')) FROM numbers n"
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


SNAPSHOT_NAME = "numbers.json"  # under SHIM_DATA_DIR


def write_snapshot(path: Path, routes) -> bool:
    """Atomically replace the snapshot (readers see the old file or the new one, never half)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps([r.to_json() for r in routes]))
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.warning("numbers_snapshot_not_written", path=str(path), error=str(exc))
        return False


async def snapshot_from(conn: asyncpg.Connection, path: Path) -> bool:
    """Write the snapshot from the table as it is now (the CLI does this after each change, so
    an instance started on this host during an outage knows numbers set before it)."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM numbers", timeout=QUERY_TIMEOUT_S)
    return await asyncio.to_thread(write_snapshot, path, [Route.from_row(r) for r in rows])


class RoutingUnavailable(RuntimeError):
    """Postgres cannot answer and the number is not in a table read from it (none read since
    start, or only a snapshot that may be stale): the webhook cannot tell whether the number is
    configured."""


class NumberRoutes:
    def __init__(self, dsn: Callable[[], str], snapshot_path: Path, pool: Callable[[], Awaitable[asyncpg.Pool]]):
        self._dsn = dsn
        self.snapshot_path = snapshot_path
        self._pool = pool
        self._routes: dict[str, Route] = {}
        self._version = 0  # bumped by every refresh: a lookup's answer is stale once it moved
        # Numbers Postgres said it does not have, and at which version: asked again only after a
        # refresh (a NOTIFY from any change, or the 2 s poll), so a deployment that routes by the
        # stream's own parameters does not pay a query before every call's set-up.
        self._misses: dict[str, int] = {}
        self.loaded = False  # from Postgres or the snapshot at least once
        # A snapshot may be older than the table (a number moved from another host since): a
        # number missing from it is "unknown", not "not configured", until Postgres has answered.
        self._read_from_db = False
        self.db_ok = False  # the last read of Postgres worked
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- reading ---------------------------------------------------------------------------

    def get(self, number: str) -> Route | None:
        return self._routes.get(number)

    async def lookup(self, number: str) -> Route | None:
        """The number's route; None when it is not configured. Never waits on Postgres for a
        number in the table; for one that is not, asks it (bounded) in case it was added since
        the last refresh, unless Postgres is known to be away or already said no since then."""
        route = self._routes.get(number)
        if route is not None or not number:
            return route
        if self.db_ok:
            version = self._version
            if self._misses.get(number) == version:
                return None
            try:
                pool = await asyncio.wait_for(self._pool(), MISS_TIMEOUT_S)
                row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM numbers WHERE number = $1", number, timeout=MISS_TIMEOUT_S)
            except _DB_ERRORS as exc:
                log.warning("number_lookup_failed", number=number, error=str(exc) or type(exc).__name__)
            else:
                if row is None:
                    if self._version == version:
                        if len(self._misses) >= 10_000:  # bounded: callers choose the numbers
                            self._misses.clear()
                        self._misses[number] = version
                    return None
                route = Route.from_row(row)
                if self._version == version:  # else a refresh read the table after this row: it wins
                    self._routes = {**self._routes, number: route}
                return self._routes.get(number, route)
        if self._read_from_db:
            return None
        if self.loaded:
            raise RoutingUnavailable(f"{number} is not in the routing snapshot, which may be out of date, and Postgres is unreachable")
        raise RoutingUnavailable("the numbers table was never loaded and Postgres is unreachable")

    # --- keeping it fresh ------------------------------------------------------------------

    async def start(self, initial_timeout: float = 3.0) -> None:
        """Load once before the first call is answered (bounded), then keep refreshing."""
        try:
            conn = await asyncpg.connect(self._dsn(), timeout=initial_timeout)
            try:
                await self._refresh(conn)
            finally:
                await conn.close(timeout=1)
        except _DB_ERRORS as exc:
            log.error("numbers_not_loaded_at_start", error=str(exc) or type(exc).__name__)
            await self._load_snapshot()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="number-routes")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn(), timeout=QUERY_TIMEOUT_S)
                await conn.add_listener(CHANNEL, self._on_notify)
                backoff = 0.5
                loop = asyncio.get_running_loop()
                version, full_read_at = None, 0.0
                while True:
                    now = loop.time()
                    seen = await conn.fetchval(_VERSION_SQL, timeout=QUERY_TIMEOUT_S)
                    if self._changed.is_set() or seen != version or now - full_read_at >= FULL_READ_S or not self.db_ok:
                        self._changed.clear()
                        await self._refresh(conn)
                        version, full_read_at = seen, now
                    await wait_event(self._changed, POLL_S)
            except _DB_ERRORS as exc:
                if self.db_ok:
                    log.error("numbers_refresh_failed", error=str(exc) or type(exc).__name__, routes=len(self._routes))
                self.db_ok = False
            except Exception:  # a bug must not end the refreshing for the life of the process
                log.exception("numbers_refresh_crashed", routes=len(self._routes))
                self.db_ok = False
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_notify(self, *_args) -> None:
        self._changed.set()

    async def _refresh(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM numbers", timeout=QUERY_TIMEOUT_S)
        routes = {row["number"]: Route.from_row(row) for row in rows}
        self._version += 1
        self._misses.clear()  # (a lookup in flight across this refresh checks the version)
        if not self.db_ok:
            log.info("numbers_loaded", routes=len(routes))
        self.db_ok = True
        self.loaded = self._read_from_db = True
        if routes != self._routes:
            self._routes = routes
            await asyncio.to_thread(self._write_snapshot, routes)

    # --- the snapshot ----------------------------------------------------------------------

    def _write_snapshot(self, routes: dict[str, Route]) -> None:
        write_snapshot(self.snapshot_path, routes.values())

    async def _load_snapshot(self) -> None:
        try:
            raw = await asyncio.to_thread(self.snapshot_path.read_bytes)
            routes = {r.number: r for r in (Route.from_json(item) for item in orjson.loads(raw))}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("numbers_snapshot_unreadable", path=str(self.snapshot_path), error=str(exc))
            return
        self._routes = routes
        self.loaded = True
        log.warning("numbers_loaded_from_snapshot", routes=len(routes), path=str(self.snapshot_path))
