"""The Postgres layer: schema migrations and the batching writer (`Recorder`).

The audio path never waits on the database. Callers hand rows to `Recorder.upsert()` /
`Recorder.insert()`, which validate them at once (raising ValueError at the call site for
programming errors), encode them and append them to an in-memory queue, and return. One writer task
takes the queue in acceptance order and writes it in batches, one transaction per batch.

Logical queue order is: spool file (oldest) -> in-memory deque (newest). As soon as Postgres is
unreachable (a connect or write failed, or a write has hung for `stall_seconds`), every row in memory
is appended to a JSON-lines spool file (fsync'd per append), so a kill -9 during an outage loses
at most the rows of the last moment; memory holds at most the one batch being attempted. While
Postgres is up but slow, memory holds up to `max_memory_rows` before the oldest spill. Spooled
rows are replayed, in order, before the memory queue when Postgres comes back.
A spool file left by a crashed process is replayed at start. Replaying rows that were already
committed is harmless: every write is an idempotent upsert (last non-null value wins, keep_existing
keeps the first) or an insert with a client-generated id and ON CONFLICT DO NOTHING.

Every value travels as text (`$n::text::<type>`), so a queued row is a tuple of strings and spools
to JSON losslessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import enum
import fcntl
import os
import random
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog
from asyncpg.exceptions._base import DataError as _ClientDataError

from shim.aio import cancel_and_wait, wait_event
from shim.db import redact_dsn

log = structlog.get_logger(__name__)

__all__ = ["Migration", "Recorder", "StoreHealth", "TABLES", "load_migrations", "migrate"]

# --------------------------------------------------------------------------------------------------
# Migrations
# --------------------------------------------------------------------------------------------------

_MIGRATION_LOCK_KEY = 0x5348_494D_0001  # "SHIM" + 1: pg_advisory_xact_lock key (per database)
_MIGRATION_NAME = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _migrations_dir() -> Any:
    try:
        return resources.files("shim").joinpath("migrations")
    except (NotADirectoryError, TypeError, ValueError):
        # `shim` imported as a namespace package (no __init__.py) under an editable install:
        # importlib.resources can't build a path for it; the files sit next to this module.
        return Path(__file__).with_name("migrations")


def load_migrations() -> list[Migration]:
    """The migrations shipped in shim/migrations (package data), in version order."""
    found: dict[int, Migration] = {}
    for entry in _migrations_dir().iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if not m:
            continue
        version = int(m.group(1))
        if version in found:
            raise RuntimeError(f"two migrations with version {version}: {found[version].name}, {m.group(2)}")
        found[version] = Migration(version, m.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


_SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE schema_migrations IS 'Schema versions applied by shim (shim/migrations/NNNN_name.sql).';
COMMENT ON COLUMN schema_migrations.version IS 'Migration number (NNNN in the file name).';
COMMENT ON COLUMN schema_migrations.name IS 'Migration name (the rest of the file name).';
COMMENT ON COLUMN schema_migrations.applied_at IS 'When the migration was applied.';
"""


async def migrate(dsn_or_conn: str | asyncpg.Connection) -> list[int]:
    """Apply pending migrations in order; returns the versions applied (empty when up to date).

    Everything runs in one transaction under a transaction-level advisory lock, so several instances
    starting at once apply each migration exactly once (the others wait, then find nothing to do),
    and a failure leaves the schema as it was. Objects go to the connection's default schema.
    """
    migrations = load_migrations()
    own = isinstance(dsn_or_conn, str)
    conn: asyncpg.Connection = await asyncpg.connect(dsn_or_conn) if own else dsn_or_conn
    try:
        applied: list[int] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            await conn.execute(_SCHEMA_MIGRATIONS_DDL)
            done = {r["version"]: r["name"] for r in await conn.fetch("SELECT version, name FROM schema_migrations")}
            for m in migrations:
                if m.version in done:
                    if done[m.version] != m.name:
                        log.warning("migrate.name_mismatch", version=m.version, db_name=done[m.version], file_name=m.name)
                    continue
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, now())", m.version, m.name
                )
                applied.append(m.version)
            # 0006: the price table costs are computed from, from shim/costs.py + SHIM_PRICES_FILE.
            if any(m.version == 6 for m in migrations):
                from .costs import sync_prices

                await sync_prices(conn)
            newer = sorted(v for v in done if v > (migrations[-1].version if migrations else 0))
            if newer:
                log.warning("migrate.database_newer_than_code", versions=newer)
        if applied:
            log.info("migrate.applied", versions=applied)
        return applied
    finally:
        if own:
            await conn.close()


# --------------------------------------------------------------------------------------------------
# Table specs (mirror of the migrations; tests check they match the database)
# --------------------------------------------------------------------------------------------------

TEXT, INT, BOOL, TS, JSON, UUID = "text", "integer", "boolean", "timestamptz", "jsonb", "uuid"
_EXPECTED = {
    TEXT: "a str",
    INT: "an int (32-bit)",
    BOOL: "a bool",
    TS: "a timezone-aware datetime",
    JSON: "a dict or list (JSON-serializable)",
    UUID: "a uuid.UUID or UUID string",
}
_INT4 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class TableSpec:
    name: str
    key: tuple[str, ...]
    columns: dict[str, str]  # writable column -> type, in table order
    required: tuple[str, ...]  # key + NOT NULL columns without a default
    choices: dict[str, frozenset[str]]  # column -> allowed values (CHECK ... IN (...))
    managed: tuple[str, ...]  # columns the database fills (created_at/updated_at)
    op: str  # "u": upsert on key; "i": insert-only event log (ON CONFLICT (key) DO NOTHING)

    @property
    def has_updated_at(self) -> bool:
        return "updated_at" in self.managed


_STACKS = frozenset({"shim", "vapi"})

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        TableSpec(
            "calls",
            key=("call_sid",),
            columns={
                "call_sid": TEXT, "stream_sid": TEXT, "account_sid": TEXT, "assistant_id": TEXT,
                "assistant_name": TEXT, "from_number": TEXT, "to_number": TEXT, "stack": TEXT, "model": TEXT,
                "voice": TEXT, "status": TEXT, "started_at": TS, "ended_at": TS, "ended_reason": TEXT,
                "next_action": JSON, "custom_parameters": JSON, "metadata": JSON, "recording_url": TEXT,
                "summary": TEXT, "analysis": JSON, "transfer": JSON,  # 0002
                "assistant_request": JSON,  # 0003
                "stereo_recording_url": TEXT,  # 0006
            },
            required=("call_sid",),
            choices={"stack": _STACKS | {"vapi-redirect"}},  # 0004: a split's callers sent to Vapi
            managed=("created_at", "updated_at", "cost_usd", "costs"),  # 0006: cost_usd/costs by trigger
            op="u",
        ),
        TableSpec(
            "utterances",
            key=("call_sid", "seq"),
            columns={
                "call_sid": TEXT, "seq": INT, "role": TEXT, "text": TEXT, "full_text": TEXT, "item_id": TEXT,
                "started_at": TS, "ended_at": TS, "interrupted": BOOL, "audio_ms": INT, "heard_ms": INT,
                "latency_ms": INT,
            },
            # role is NOT NULL without a default: Postgres checks it on the proposed row even when the
            # upsert ends up updating, so every upsert must carry it.
            required=("call_sid", "seq", "role"),
            choices={"role": frozenset({"user", "assistant"})},
            managed=("created_at", "updated_at"),
            op="u",
        ),
        TableSpec(
            "tool_calls",
            key=("call_sid", "seq"),
            columns={
                "call_sid": TEXT, "seq": INT, "call_id": TEXT, "name": TEXT, "arguments": JSON, "url": TEXT,
                "status": TEXT, "result": TEXT, "error": TEXT, "latency_ms": INT, "requested_at": TS,
                "completed_at": TS,
                "http_status": INT,  # 0005
            },
            required=("call_sid", "seq"),
            choices={},
            managed=(),
            op="u",
        ),
        TableSpec(
            "model_usage",  # 0006: response.done usage, one row per response
            key=("call_sid", "response_id"),
            columns={"call_sid": TEXT, "response_id": TEXT, "at": TS, "usage": JSON},
            required=("call_sid", "response_id", "at", "usage"),
            choices={},
            managed=("input_tokens", "output_tokens", "input_text_tokens", "input_audio_tokens", "input_image_tokens",
                     "cached_tokens", "cached_text_tokens", "cached_audio_tokens", "cached_image_tokens",
                     "output_text_tokens", "output_audio_tokens"),
            op="u",
        ),
        TableSpec(
            "call_events",
            key=("id",),
            columns={"id": UUID, "call_sid": TEXT, "at": TS, "kind": TEXT, "detail": JSON},
            required=("id", "call_sid", "at", "kind"),
            choices={},
            managed=(),
            op="i",
        ),
        TableSpec(
            "webhook_deliveries",  # 0002
            key=("id",),
            columns={
                "id": UUID, "call_sid": TEXT, "kind": TEXT, "url": TEXT, "attempt": INT, "status": TEXT,
                "http_status": INT, "latency_ms": INT, "error": TEXT, "at": TS,
            },
            required=("id", "kind", "url", "attempt", "status", "at"),
            choices={"status": frozenset({"ok", "error", "timeout"})},
            managed=(),
            op="i",
        ),
        TableSpec(
            "numbers",
            key=("number",),
            columns={"number": TEXT, "assistant_id": TEXT, "stack": TEXT, "server_url": TEXT,
                     "split_percent": INT, "previous_settings": JSON, "twilio_sid": TEXT, "migrated_at": TS,  # 0004
                     "fallback_destination": JSON},  # 0008
            required=("number",),
            choices={"stack": _STACKS},
            managed=("updated_at",),
            op="u",
        ),
    )
}

# A queued row: (op, table, columns, keep_existing, values-as-text). Hashable prefix = group key.
Entry = tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str | None, ...]]


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 120 else r[:117] + "..."


def _bad(table: str, column: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"{table}.{column}: got {_short(value)} ({type(value).__name__}); expected {expected}"
    )


def _encode(table: str, column: str, ctype: str, value: Any) -> str:
    """A Python value as the text Postgres parses for `ctype`; ValueError when it doesn't fit."""
    if ctype == TEXT:
        if not isinstance(value, str):
            raise _bad(table, column, value, _EXPECTED[TEXT])
        s = value if type(value) is str else str.__str__(value)
        if "\x00" in s:
            raise _bad(table, column, value, "a str without NUL characters")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(table, column, value, "a str encodable as UTF-8 (no lone surrogates)") from None
        return s
    if ctype == INT:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(table, column, value, _EXPECTED[INT])
        if not _INT4[0] <= value <= _INT4[1]:
            raise _bad(table, column, value, f"an int between {_INT4[0]} and {_INT4[1]}")
        return str(int(value))
    if ctype == BOOL:
        if not isinstance(value, bool):
            raise _bad(table, column, value, _EXPECTED[BOOL])
        return "true" if value else "false"
    if ctype == TS:
        if not isinstance(value, _dt.datetime) or value.utcoffset() is None:
            raise _bad(table, column, value, _EXPECTED[TS])
        return value.isoformat()
    if ctype == JSON:
        if not isinstance(value, (dict, list)):
            raise _bad(table, column, value, _EXPECTED[JSON])
        try:
            data = orjson.dumps(value)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise _bad(table, column, value, f"{_EXPECTED[JSON]} ({exc})") from None
        if b"\\u0000" in data:
            raise _bad(table, column, value, "JSON without NUL characters (Postgres jsonb rejects \\u0000)")
        return data.decode()
    if ctype == UUID:
        if isinstance(value, uuid.UUID):
            return str(value)
        if isinstance(value, str):
            try:
                return str(uuid.UUID(value))
            except ValueError:
                pass
        raise _bad(table, column, value, _EXPECTED[UUID])
    raise AssertionError(ctype)  # pragma: no cover


def _table(table: Any, op: str) -> TableSpec:
    spec = TABLES.get(table) if isinstance(table, str) else None
    if spec is None:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(sorted(TABLES))}")
    if spec.op != op:
        if op == "u":
            raise ValueError(f"{table}: is an append-only event log; use insert(), not upsert()")
        raise ValueError(f"{table}: rows are keyed by {', '.join(spec.key)}; use upsert(), not insert()")
    return spec


def _encode_row(spec: TableSpec, row: Any, keep_existing: Any) -> Entry:
    table = spec.name
    if not isinstance(row, dict):
        raise ValueError(f"{table}: row must be a dict of column -> value, got {type(row).__name__}")
    cols = spec.columns
    for name in row:
        if name not in cols:
            if name in spec.managed:
                raise ValueError(f"{table}.{name}: is set by the database; leave it out")
            raise ValueError(f"{table}.{name}: unknown column (value {_short(row[name])}); expected one of {', '.join(cols)}")
    for name in spec.required:
        if row.get(name) is None:
            raise ValueError(f"{table}.{name}: required (key or NOT NULL column), got {_short(row.get(name))}")
    if isinstance(keep_existing, str):
        raise ValueError(f"{table}: keep_existing must be a tuple of column names, got the str {keep_existing!r}")
    keep: set[str] = set()
    for name in keep_existing:
        if name not in cols:
            raise ValueError(f"{table}.{name}: keep_existing names an unknown column; expected one of {', '.join(cols)}")
        if name in spec.key:
            raise ValueError(f"{table}.{name}: keep_existing names a key column")
        keep.add(name)
    names: list[str] = []
    values: list[str] = []
    for name, ctype in cols.items():  # canonical column order: same column set -> same group
        value = row.get(name)
        if value is None:  # None never overwrites; on insert the column default applies
            continue
        text = _encode(table, name, ctype, value)
        allowed = spec.choices.get(name)
        if allowed is not None and text not in allowed:
            raise _bad(table, name, value, f"one of {', '.join(sorted(allowed))}")
        names.append(name)
        values.append(text)
    names_t = tuple(names)
    return (spec.op, table, names_t, tuple(n for n in names_t if n in keep), tuple(values))


def _entry_from_json(obj: Any) -> Entry | None:
    """A spooled row back into an Entry, or None if it is malformed or names unknown tables/columns."""
    if not (isinstance(obj, list) and len(obj) == 5):
        return None
    op, table, cols, keep, vals = obj
    spec = TABLES.get(table) if isinstance(table, str) else None
    if spec is None or op != spec.op:
        return None
    if not (isinstance(cols, list) and isinstance(keep, list) and isinstance(vals, list) and len(vals) == len(cols)):
        return None
    if not all(isinstance(c, str) and c in spec.columns for c in cols) or len(set(cols)) != len(cols):
        return None
    if not all(k in cols and k not in spec.key for k in keep):
        return None
    if not all(k in cols for k in spec.required):
        return None
    if not all(v is None or isinstance(v, str) for v in vals):
        return None
    return (op, table, tuple(cols), tuple(keep), tuple(vals))


# Tables whose rows of one call are kept in order with each other even across keys: 0006's
# triggers compute a call's cost on `calls` from its `model_usage` rows, and touch `calls` when
# one arrives.
_LINKED_BY_TRIGGER = frozenset({"calls", "model_usage"})


def _order_positions(table: str, cols: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
    """Where a row shape's key columns are, and its call_sid when the table is trigger-linked
    (else -1): what Recorder._runs orders rows by."""
    key = tuple(cols.index(c) for c in TABLES[table].key)
    return key, cols.index("call_sid") if table in _LINKED_BY_TRIGGER else -1


def _q(ident: str) -> str:
    return '"' + ident + '"'


def _build_sql(op: str, table: str, cols: tuple[str, ...], keep: tuple[str, ...]) -> str:
    spec = TABLES[table]
    placeholders = ", ".join(f"${i}::text::{spec.columns[c]}" for i, c in enumerate(cols, 1))
    sql = (
        f"INSERT INTO {_q(table)} AS t ({', '.join(map(_q, cols))}) VALUES ({placeholders}) "
        f"ON CONFLICT ({', '.join(map(_q, spec.key))}) "
    )
    sets = [
        f"{_q(c)} = COALESCE(t.{_q(c)}, EXCLUDED.{_q(c)})"  # keep_existing: the stored value wins
        if c in keep
        else f"{_q(c)} = COALESCE(EXCLUDED.{_q(c)}, t.{_q(c)})"  # the new value wins when not null
        for c in cols
        if c not in spec.key
    ]
    if op == "u" and spec.has_updated_at:
        sets.append('"updated_at" = now()')
    if op == "i" or not sets:
        return sql + "DO NOTHING"
    return sql + "DO UPDATE SET " + ", ".join(sets)


# --------------------------------------------------------------------------------------------------
# Error classification
# --------------------------------------------------------------------------------------------------

# SQLSTATE classes that mean "this row can never be written as it is".
_DATA_CLASSES = frozenset({"21", "22", "23", "27", "2F", "42", "44", "54", "P0", "0A"})
_RETRYABLE_STATES = frozenset({"42501"})  # insufficient_privilege: an operator can fix it; wait


def _is_data_error(exc: BaseException) -> bool:
    """True for errors a retry can't fix (bad row); False for connection/server trouble (retry)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _DATA_CLASSES and state not in _RETRYABLE_STATES
    if isinstance(exc, _ClientDataError):  # client-side encoding of a parameter
        return True
    if isinstance(exc, (asyncpg.InterfaceError, OSError, asyncio.TimeoutError, ConnectionError)):
        return False
    return isinstance(exc, (ValueError, TypeError, KeyError))


def _describe(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    text = f"{type(exc).__name__}: {exc}"
    return f"[{state}] {text}" if state else text


class _Transient(Exception):
    """A batch could not be written for a reason that may go away (connection, server state)."""


# --------------------------------------------------------------------------------------------------
# Spool file I/O (runs in worker threads; the event loop never does file I/O)
# --------------------------------------------------------------------------------------------------


def _entry_line(entry: Entry) -> bytes:
    op, table, cols, keep, vals = entry
    return orjson.dumps([op, table, cols, keep, vals]) + b"\n"


def _append_lines(path: Path, lines: list[bytes]) -> int:
    """Append and fsync; returns the file size afterwards. On failure (disk full...) the file is cut
    back to where it was, so a torn line never sits in front of later appends."""
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise
        return f.tell()


def _prepend_lines(path: Path, lines: list[bytes], offset: int, end: int) -> int:
    """Rewrite the spool as `lines` + its bytes [offset, end), atomically (fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(b"".join(lines))
        src.seek(offset)
        remaining = end - offset
        while remaining > 0:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
        size = dst.tell()
    os.replace(tmp, path)
    return size


def _read_spool(path: Path, offset: int, end: int, max_rows: int) -> list[tuple[Entry | None, bytes]]:
    out: list[tuple[Entry | None, bytes]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        while pos < end and len(out) < max_rows:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            try:
                entry = _entry_from_json(orjson.loads(line))
            except orjson.JSONDecodeError:
                entry = None
            out.append((entry, line))
    return out


def _scan_spool(path: Path, rejected_path: Path) -> tuple[int, int]:
    """Count the rows of a spool left by an earlier process; a torn last line goes to .rejected.

    Returns (rows, size). Streams the file; never loads it whole."""
    if not path.exists():
        return 0, 0
    rows = 0
    good_end = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            rows += 1
            good_end += len(line)
        f.seek(good_end)
        torn = f.read()
    if torn:
        record = {
            "rejected_at": _dt.datetime.now(_dt.UTC).isoformat(),
            "error": "torn spool line (crash during write)",
            "raw": torn.decode("utf-8", "replace"),
        }
        _append_lines(rejected_path, [orjson.dumps(record) + b"\n"])
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    if rows == 0:
        path.unlink(missing_ok=True)
        return 0, 0
    return rows, good_end


# --------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------


class _Src(enum.Enum):
    MEM = "mem"
    SPOOL = "spool"


class _Batch:
    """The batch at the head of the queue. Rows before `pos` are committed (or rejected)."""

    __slots__ = ("src", "entries", "raw", "pos")

    def __init__(self, src: _Src, entries: list[Entry | None], raw: list[bytes] | None) -> None:
        self.src = src
        self.entries = entries  # None: a malformed spool line (rejected without touching the DB)
        self.raw = raw  # spool lines (to advance the spool offset), None for memory batches
        self.pos = 0

    def remaining(self) -> list[Entry | None]:
        return self.entries[self.pos :]


@dataclass(frozen=True)
class StoreHealth:
    """What `/readyz` reports about the writer (`Recorder.health()`).

    state: "connected" (Postgres reachable, rows flowing), "degraded" (Postgres unreachable or a
    write hung: rows go to the spool file and will be written when it returns; calls are
    unaffected), or "connecting" (no connection yet since start, and no failure seen either)."""

    state: str
    spooled: int  # rows in the spool file, not yet written
    pending: int  # rows in memory, not yet written

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def __str__(self) -> str:
        if self.state == "degraded":
            return f"degraded: spooling {self.spooled} rows"
        return self.state


class Recorder:
    """Accepts rows without ever blocking and writes them to Postgres from one background task.

    Counters for metrics: `written`, `failed_batches`, `rejected`, `connects`, `pending`, `spooled`,
    `db_up` (also as a dict from `stats()`). upsert()/insert() must be called from the event loop's
    thread; they work before start() too (rows wait in memory; start() also replays an old spool).
    One Recorder per spool file (enforced with a lock file, `<spool>.lock`). Rows that can never be
    written (a constraint violation, say) are appended to `<spool>.rejected` as JSON lines.
    The writer applies pending migrations itself each time it connects (`apply_migrations`).
    """

    def __init__(
        self,
        dsn: str,
        *,
        spool_path: Path,
        max_memory_rows: int = 50_000,
        batch_max: int = 500,
        flush_interval: float = 0.5,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        apply_migrations: bool = True,
        stall_seconds: float = 2.0,
    ) -> None:
        if max_memory_rows < 1 or batch_max < 1:
            raise ValueError("max_memory_rows and batch_max must be >= 1")
        self._dsn = dsn
        try:
            self._password = urlsplit(dsn).password or ""
        except ValueError:
            self._password = ""
        self.spool_path = Path(spool_path)
        self.rejected_path = self.spool_path.with_name(self.spool_path.name + ".rejected")
        self._lock_path = self.spool_path.with_name(self.spool_path.name + ".lock")
        self.max_memory_rows = max_memory_rows
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.apply_migrations = apply_migrations
        self.stall_seconds = stall_seconds  # a write hung this long counts as an outage: spool
        self._outage_spool_logged = False
        self._db_down = False  # a connect or write failed and no connection succeeded since
        self._attempt_started = 0.0

        self._mem: deque[Entry] = deque()
        self._head: _Batch | None = None
        self._attempting = False  # the writer is executing the head batch right now
        self._attempt_done = asyncio.Event()
        # Spool: rows in the file at byte offsets [_spool_off, _spool_end) are not yet committed.
        self._spool_off = 0
        self._spool_end = 0
        self._spool_rows = 0
        self._spill_rows = 0  # rows taken from memory and being appended right now
        self._spill_pending = False  # the spiller wants the spool: the writer must not take from memory
        self._spool_lock = asyncio.Lock()

        self._accepted = 0  # rows accepted (incl. rows found in a spool at start)
        self._done = 0  # rows committed or rejected, in queue order
        self.written = 0
        self.failed_batches = 0
        self.rejected = 0
        self.connects = 0  # successful (re)connections
        self.db_up = False

        self._wake = asyncio.Event()
        self._flush = asyncio.Event()
        self._spill_evt = asyncio.Event()
        self._progress = asyncio.Event()
        self._drainers = 0
        self._conn: asyncpg.Connection | None = None
        self._writer_task: asyncio.Task | None = None
        self._spill_task: asyncio.Task | None = None
        self._lock_fd: int | None = None
        self._started = False
        self._closed = False
        self._backoff = retry_initial
        self._last_warning = 0.0
        self._outage_logged = False
        self._sql_cache: dict[tuple, str] = {}
        self._key_positions: dict[tuple, tuple[tuple[int, ...], int]] = {}  # row shape -> _order_positions

    # ---------------------------------------------------------------- counters

    @property
    def pending(self) -> int:
        """Rows accepted and not yet committed that are held in memory."""
        head = self._head
        n = len(head.entries) - head.pos if head is not None and head.src is _Src.MEM else 0
        return len(self._mem) + n

    @property
    def spooled(self) -> int:
        """Rows in the spool file (or being appended to it) and not yet committed."""
        return self._spool_rows + self._spill_rows

    def health(self) -> StoreHealth:
        """Connected, degraded (spooling N rows) or connecting: cheap, for `/readyz`."""
        if self._degraded():
            state = "degraded"
        elif self.db_up:
            state = "connected"
        else:
            state = "connecting"
        return StoreHealth(state, self.spooled, self.pending)

    def _degraded(self) -> bool:
        return self._db_down or (self._attempting and time.monotonic() - self._attempt_started > self.stall_seconds)

    def stats(self) -> dict[str, int | bool]:
        return {
            "written": self.written,
            "failed_batches": self.failed_batches,
            "rejected": self.rejected,
            "connects": self.connects,
            "pending": self.pending,
            "spooled": self.spooled,
            "db_up": self.db_up,
        }

    # ---------------------------------------------------------------- accepting rows

    def upsert(self, table: str, row: dict, *, keep_existing: tuple[str, ...] = ()) -> None:
        """Queue INSERT ... ON CONFLICT (key) DO UPDATE; never blocks. ValueError on bad input.

        Provided non-null values win; None never overwrites. Columns in keep_existing keep the
        stored value when it is not null. updated_at is bumped where the table has it."""
        entry = _encode_row(_table(table, "u"), row, keep_existing)
        self._accept(entry)

    def insert(self, table: str, row: dict) -> str:
        """Queue an append to an event-log table (call_events, webhook_deliveries); never blocks. Returns the row's id.

        `id` is a client-generated uuid4 if absent and `at` defaults to now (UTC), so a replay never
        duplicates the event (ON CONFLICT (id) DO NOTHING)."""
        spec = _table(table, "i")
        if not isinstance(row, dict):
            raise ValueError(f"{table}: row must be a dict of column -> value, got {type(row).__name__}")
        row = dict(row)
        if row.get("id") is None:
            row["id"] = uuid.uuid4()
        if "at" in spec.columns and row.get("at") is None:
            row["at"] = _dt.datetime.now(_dt.UTC)
        entry = _encode_row(spec, row, ())
        self._accept(entry)
        return entry[4][entry[2].index("id")]

    def _accept(self, entry: Entry) -> None:
        if self._closed:
            raise RuntimeError("Recorder is closed; row not accepted")
        self._mem.append(entry)
        self._accepted += 1
        self._wake.set()
        if len(self._mem) >= self.batch_max:
            self._flush.set()
        if len(self._mem) > self.max_memory_rows or self._db_down:
            self._spill_evt.set()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Replay any spool left by an earlier process, then start the writer. Needs no database."""
        if self._started:
            return
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"spool {self.spool_path} is in use by another Recorder") from None
        try:
            rows, size = await asyncio.to_thread(_scan_spool, self.spool_path, self.rejected_path)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        if rows:
            self._spool_rows, self._spool_end, self._spool_off = rows, size, 0
            self._accepted += rows
            log.warning("recorder.spool_found", path=str(self.spool_path), rows=rows)
        self._started = True
        log.info("recorder.start", db=redact_dsn(self._dsn), spool=str(self.spool_path))
        self._writer_task = asyncio.create_task(self._run_writer(), name="shim-recorder-writer")
        self._spill_task = asyncio.create_task(self._run_spiller(), name="shim-recorder-spiller")
        if rows:
            self._wake.set()

    def flush_soon(self) -> None:
        """End the current gather now: a row another process waits for (a call's next_action,
        which /twilio/stream-ended reads when it lands on another worker or instance) must not
        wait out the linger. Never blocks."""
        self._flush.set()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every row accepted so far is committed (or rejected). False on timeout."""
        target = self._accepted
        if self._done >= target:
            return True
        if not self._started or self._closed:
            return False
        self._drainers += 1
        self._flush.set()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                while self._done < target:
                    await self._progress.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._drainers -= 1

    async def close(self, timeout: float = 10.0) -> None:
        """Drain (bounded by timeout), stop the writer, and spool whatever is still unwritten."""
        if self._closed:
            return
        drained = await self.drain(timeout) if self._started else self._done >= self._accepted
        self._closed = True  # from here on, upsert()/insert() raise
        await cancel_and_wait(self._writer_task)
        async with self._spool_lock:  # an append in progress finishes first
            await cancel_and_wait(self._spill_task)
            leftover: list[Entry] = []
            head = self._head
            if head is not None and head.src is _Src.MEM:
                leftover.extend(e for e in head.remaining() if e is not None)
                self._head = None
                if leftover and self._spool_rows:
                    # Rows behind a hung batch were spooled while it was being written: it goes
                    # in front of them (rare; the file is rewritten once).
                    try:
                        await self._prepend_to_spool(leftover)
                    except OSError as exc:
                        log.error("recorder.rows_lost", rows=len(leftover), path=str(self.spool_path), error=str(exc))
                        raise
                    leftover = []
            leftover.extend(self._mem)
            if leftover:
                try:
                    await self._append_to_spool(leftover)
                except OSError as exc:
                    log.error("recorder.rows_lost", rows=len(leftover), path=str(self.spool_path), error=str(exc))
                    raise
                self._mem.clear()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()
        self.db_up = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info(
            "recorder.closed",
            drained=drained,
            written=self.written,
            rejected=self.rejected,
            spooled=self.spooled,
            failed_batches=self.failed_batches,
        )

    # ---------------------------------------------------------------- spilling memory to the spool

    async def _append_to_spool(self, entries: list[Entry]) -> None:
        """Append (caller holds _spool_lock). On failure the rows stay where the caller had them."""
        lines = [_entry_line(e) for e in entries]
        self._spill_rows = len(entries)
        try:
            size = await asyncio.to_thread(_append_lines, self.spool_path, lines)
        finally:
            self._spill_rows = 0
        self._spool_end = size
        self._spool_rows += len(entries)

    async def _prepend_to_spool(self, entries: list[Entry]) -> None:
        """Put rows in front of the unreplayed part of the spool (caller holds _spool_lock)."""
        lines = [_entry_line(e) for e in entries]
        size = await asyncio.to_thread(_prepend_lines, self.spool_path, lines, self._spool_off, self._spool_end)
        self._spool_off, self._spool_end = 0, size
        self._spool_rows += len(entries)

    async def _run_spiller(self) -> None:
        while True:
            # Woken by rows arriving (over the limit, or during an outage) and every half
            # stall_seconds, to notice a write that hangs.
            await wait_event(self._spill_evt, self.stall_seconds / 2)
            self._spill_evt.clear()
            while True:
                degraded = self._degraded()
                if self.pending <= (0 if degraded else self.max_memory_rows):
                    break
                target = 0 if degraded else max(self.max_memory_rows // 2, 1)
                self._spill_pending = True
                failed = False
                try:
                    async with self._spool_lock:
                        # A memory batch at the head goes to the spool first (it is the oldest),
                        # unless the writer is executing it right now or rows behind it were
                        # spooled already: then it stays, the one bounded batch in memory, and the
                        # writer retries it before it reads the spool.
                        chunk: list[Entry] = []
                        head = self._head
                        if head is not None and head.src is _Src.MEM and not self._attempting and not self._spool_rows:
                            chunk.extend(e for e in head.remaining() if e is not None)
                            self._head = None
                        n = max(len(self._mem) - target, 0)
                        chunk.extend(self._mem.popleft() for _ in range(n))
                        if not chunk:
                            break
                        if degraded and not self._outage_spool_logged:
                            self._outage_spool_logged = True
                            log.warning("recorder.spooling", reason="database unreachable", path=str(self.spool_path))
                        try:
                            await self._append_to_spool(chunk)
                        except OSError as exc:
                            self._mem.extendleft(reversed(chunk))  # order preserved; retry later
                            log.error("recorder.spool_write_failed", path=str(self.spool_path), error=str(exc), rows=len(chunk))
                            failed = True
                        else:
                            log.info("recorder.spilled", rows=len(chunk), spooled=self.spooled, pending=self.pending)
                finally:
                    self._spill_pending = False
                    self._wake.set()
                if failed:
                    await asyncio.sleep(self.retry_max)

    # ---------------------------------------------------------------- the writer task

    def _has_work(self) -> bool:
        return bool(self._head is not None or self._mem or self._spool_rows or self._spill_rows or self._spill_pending)

    async def _run_writer(self) -> None:
        while True:
            try:
                if not self._has_work():
                    self._wake.clear()
                    if not self._has_work():
                        await self._wake.wait()
                    continue
                if (
                    self._head is None
                    and not self._spool_rows
                    and len(self._mem) < self.batch_max
                    and not self._drainers
                    and self.flush_interval > 0
                ):
                    self._flush.clear()
                    await wait_event(self._flush, self.flush_interval)  # linger a little so rows batch up
                conn = await self._connection()
                if self._head is None:
                    self._head = await self._take_batch()
                    if self._head is None:  # raced with the spiller; never spin without yielding
                        await asyncio.sleep(0.001)
                        continue
                try:
                    await self._write_head(conn)
                except _Transient as exc:
                    self.failed_batches += 1
                    self._mark_down(exc.__cause__ or exc, "write")
                    await asyncio.sleep(self._next_backoff())
                    continue
                self._backoff = self.retry_initial
                await self._finish_head()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not kill the writer: log, back off, go on
                log.error("recorder.writer_error", error=self._scrub(_describe(exc)), exc_info=True)
                await asyncio.sleep(self._next_backoff())

    def _next_backoff(self) -> float:
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, self.retry_max)
        return min(delay, self.retry_max)

    def _scrub(self, text: str) -> str:
        """Defence in depth: no error text we log may carry the DSN's password."""
        return text.replace(self._password, "***") if self._password else text

    def _mark_down(self, exc: BaseException, stage: str) -> None:
        self.db_up = False
        if not self._db_down:
            self._db_down = True
            self._spill_evt.set()  # what waits in memory goes to the spool now
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        now = time.monotonic()
        if not self._outage_logged or now - self._last_warning > 30:  # once per outage, then every 30 s
            self._outage_logged = True
            self._last_warning = now
            log.warning(
                "recorder.db_unavailable",
                stage=stage,
                error=self._scrub(_describe(exc)),
                pending=self.pending,
                spooled=self.spooled,
            )
        else:
            log.debug("recorder.db_unavailable", stage=stage, error=self._scrub(_describe(exc)))

    async def _connection(self) -> asyncpg.Connection:
        while True:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._conn = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    server_settings={"application_name": "shim-recorder"},
                )
            except Exception as exc:
                self._mark_down(exc, "connect")
                await asyncio.sleep(self._next_backoff())
                continue
            try:
                if self.apply_migrations:
                    await migrate(conn)
            except Exception as exc:
                conn.terminate()
                self._mark_down(exc, "migrate")
                await asyncio.sleep(self._next_backoff())
                continue
            conn.add_termination_listener(self._on_terminated)
            self._conn = conn
            self.connects += 1
            log.info("recorder.db_up", recovered=self._outage_logged, pending=self.pending, spooled=self.spooled)
            self._outage_logged = False
            self._db_down = False
            self._outage_spool_logged = False
            self.db_up = True
            return conn

    def _on_terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn:
            self.db_up = False
            log.info("recorder.connection_lost", pending=self.pending, spooled=self.spooled)

    async def _take_batch(self) -> _Batch | None:
        if self._spool_rows or self._spill_rows or self._spill_pending:
            async with self._spool_lock:
                if self._spool_rows:
                    lines = await asyncio.to_thread(
                        _read_spool, self.spool_path, self._spool_off, self._spool_end, self.batch_max
                    )
                    if lines:
                        return _Batch(_Src.SPOOL, [e for e, _ in lines], [raw for _, raw in lines])
                    # The file is shorter than we think (removed by hand?): forget it, don't spin.
                    log.error("recorder.spool_truncated", path=str(self.spool_path), rows_lost=self._spool_rows)
                    self._done += self._spool_rows
                    self._spool_rows = 0
                    self._spool_off = self._spool_end = 0
                    return None
                if self._spill_rows or self._spill_pending:
                    return None
        if not self._mem:
            return None
        n = min(len(self._mem), self.batch_max)
        return _Batch(_Src.MEM, [self._mem.popleft() for _ in range(n)], None)

    def _advance(self, head: _Batch, n: int, *, written: int) -> None:
        """Rows head.entries[pos:pos+n] are done (committed or rejected)."""
        if head.src is _Src.SPOOL:
            assert head.raw is not None
            self._spool_off += sum(len(r) for r in head.raw[head.pos : head.pos + n])
            self._spool_rows -= n
        head.pos += n
        self._done += n
        self.written += written
        self._progress.set()
        self._progress = asyncio.Event()

    async def _finish_head(self) -> None:
        head = self._head
        self._head = None
        if head is not None and head.src is _Src.SPOOL and self._spool_rows == 0:
            async with self._spool_lock:
                if self._spool_rows == 0 and not self._spill_rows:
                    # Synchronous on purpose (a quick metadata operation): a cancelled thread could
                    # otherwise unlink the file after close() appended to it.
                    self.spool_path.unlink(missing_ok=True)
                    self._spool_off = self._spool_end = 0
                    log.info("recorder.spool_replayed", path=str(self.spool_path))

    def _runs(self, rows: list[Entry]) -> list[tuple[str, list[Entry]]]:
        """The batch as executemany runs: each row joins the newest run of its shape (same SQL)
        unless a row it must follow lies in a later run, so rows are applied in the order they
        came wherever order can matter: the same row (table and key; an event's id too), and a
        call's `calls` and `model_usage` rows, which 0006's triggers read across (a call's cost).
        The tables have no foreign keys. Rows of 100 calls interleave (a calls row, an utterance,
        an event...): grouped by shape a batch of ~100 rows took 6-7 round trips, not ~46."""
        runs: list[tuple[str, list[Entry]]] = []
        run_of_shape: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], int] = {}
        run_of_key: dict[tuple[str, tuple[str | None, ...]], int] = {}
        key_at = self._key_positions
        for e in rows:
            shape = e[:4]
            positions = key_at.get(shape)
            if positions is None:
                positions = key_at[shape] = _order_positions(e[1], e[2])
            vals = e[4]
            row_key = (e[1], tuple(vals[i] for i in positions[0]))
            linked = ("call", (vals[positions[1]],)) if positions[1] >= 0 else None
            at = run_of_shape.get(shape)
            if at is not None:
                after = run_of_key.get(row_key, -1)
                if linked is not None:
                    after = max(after, run_of_key.get(linked, -1))
                if after > at:
                    at = None
            if at is None:
                at = run_of_shape[shape] = len(runs)
                runs.append((self._sql(e), []))
            runs[at][1].append(e)
            run_of_key[row_key] = at
            if linked is not None:
                run_of_key[linked] = at
        return runs

    def _sql(self, entry: Entry) -> str:
        key = entry[:4]
        sql = self._sql_cache.get(key)
        if sql is None:
            sql = self._sql_cache[key] = _build_sql(*key)
        return sql

    async def _write_head(self, conn: asyncpg.Connection) -> None:
        """Commit the head batch: one transaction, one executemany per run of same-shaped rows.

        Raises _Transient if it should be retried. On a data error, falls back to row by row,
        moving rows that can never be written to the .rejected file. While this runs the spiller
        leaves the head alone (`_attempting`)."""
        head = self._head
        assert head is not None
        self._attempting = True
        self._attempt_started = time.monotonic()
        self._attempt_done.clear()
        try:
            rows = head.remaining()
            if all(e is not None for e in rows):
                runs = self._runs(rows)  # type: ignore[arg-type]
                try:
                    async with conn.transaction():
                        for sql, entries in runs:
                            await conn.executemany(sql, [e[4] for e in entries], timeout=self.command_timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not _is_data_error(exc):
                        raise _Transient() from exc
                    log.info("recorder.batch_data_error", error=_describe(exc), rows=len(rows))
                else:
                    self._advance(head, len(rows), written=len(rows))
                    return
            await self._write_rows_one_by_one(conn, head)
        finally:
            self._attempting = False
            self._attempt_done.set()

    async def _write_rows_one_by_one(self, conn: asyncpg.Connection, head: _Batch) -> None:
        while head.pos < len(head.entries):
            entry = head.entries[head.pos]
            if entry is None:
                raw = head.raw[head.pos] if head.raw else b""
                await self._reject(None, "malformed spool line", raw)
                self._advance(head, 1, written=0)
                continue
            try:
                await conn.execute(self._sql(entry), *entry[4], timeout=self.command_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _is_data_error(exc):
                    raise _Transient() from exc
                await self._reject(entry, _describe(exc), None)
                self._advance(head, 1, written=0)
                continue
            self._advance(head, 1, written=1)

    async def _reject(self, entry: Entry | None, error: str, raw: bytes | None) -> None:
        record: dict[str, Any] = {"rejected_at": _dt.datetime.now(_dt.UTC).isoformat(), "error": error}
        if entry is not None:
            op, table, cols, keep, vals = entry
            key = {c: v for c, v in zip(cols, vals) if c in TABLES[table].key}
            record.update(table=table, op=op, row=dict(zip(cols, vals)), keep_existing=list(keep))
            log.error("recorder.row_rejected", table=table, key=key, error=error, file=str(self.rejected_path))
        else:
            record["raw"] = (raw or b"").decode("utf-8", "replace")
            log.error("recorder.row_rejected", table=None, error=error, file=str(self.rejected_path))
        await asyncio.to_thread(_append_lines, self.rejected_path, [orjson.dumps(record) + b"\n"])
        self.rejected += 1


# --------------------------------------------------------------------------------------------------
# Spools of `shim serve --workers N`
# --------------------------------------------------------------------------------------------------

_WORKER_SPOOL = re.compile(r"spool\.w(\d+)\.jsonl")


def spool_path(data_dir: Path, worker: int = 0) -> Path:
    """The spool of worker `worker`: `spool.jsonl` for worker 0 and the single process (so either
    replays the other's), `spool.w<i>.jsonl` for the others. One Recorder per file (its lock), and
    a restarted worker keeps its index, so it replays what its predecessor spooled."""
    return Path(data_dir) / ("spool.jsonl" if worker == 0 else f"spool.w{worker}.jsonl")


def orphan_spools(data_dir: Path, worker: int, count: int) -> list[Path]:
    """Spools of worker indexes that no longer run (fewer workers than last time): index k goes to
    worker k % count."""
    found = []
    for path in Path(data_dir).glob("spool.w*.jsonl"):
        match = _WORKER_SPOOL.fullmatch(path.name)
        if match and int(match[1]) >= count and int(match[1]) % count == worker:
            found.append(path)
    return sorted(found)


async def replay_orphan_spools(dsn: str, paths: list[Path]) -> None:
    """Replay each spool through a Recorder of its own, closed once it is written (the file is
    then gone). Cancelled first (at shutdown, or Postgres still away): the rest stays for the next
    start. A spool another process holds (its lock) is left alone."""
    for path in paths:
        recorder = Recorder(dsn, spool_path=path)
        try:
            await recorder.start()
        except RuntimeError as exc:
            log.warning("recorder.orphan_spool_busy", path=str(path), error=str(exc))
            continue
        log.info("recorder.orphan_spool", path=str(path), rows=recorder.spooled)
        try:
            await recorder.drain()
        finally:
            await recorder.close(timeout=2)
        if not path.exists():
            recorder._lock_path.unlink(missing_ok=True)
