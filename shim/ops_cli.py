"""`shim calls`, `shim transcript`, `shim recording`, `shim db url|psql`: the operator's commands.

Data goes to stdout, messages to stderr. Exit codes: 0 ok; 1 a runtime failure (database
unreachable, Twilio refused or failed, psql failed); 2 a usage or configuration error, including
a call sid that names no recorded call and a call that has no recording (the argument is wrong,
nothing was attempted against Twilio).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone

import structlog

from . import ops
from .config import Config

COMMANDS = frozenset({"calls", "transcript", "recording", "db"})
PSQL_HINT = ("psql is not on PATH: install the PostgreSQL client (Debian/Ubuntu: apt-get install postgresql-client; "
             "macOS: brew install libpq) or connect any SQL client to the DSN `shim db url --show-password` prints")


def register(sub) -> None:
    calls = sub.add_parser("calls", help="recent calls, newest first (a table; --json for JSON lines)")
    calls.add_argument("--since", help="only calls that started since: an age (30m, 2h, 7d, 1w) or an ISO date/time (2026-12-01, 2026-12-01T08:00Z)")
    calls.add_argument("--number", help="only calls from or to this number (E.164)")
    calls.add_argument("--assistant", help="only calls answered by this assistant (id or name)")
    calls.add_argument("--ended-reason", help="only calls that ended so (Vapi endedReason); a trailing * matches a prefix, e.g. 'pipeline-error-*'")
    calls.add_argument("--limit", type=int, default=ops.DEFAULT_LIMIT, help=f"at most this many calls (default {ops.DEFAULT_LIMIT})")
    calls.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")

    transcript = sub.add_parser("transcript", help="one call: both sides in spoken order, interruptions, tool calls and events")
    transcript.add_argument("call_sid", metavar="CALL_SID")
    transcript.add_argument("--json", action="store_true", help='one JSON object: {"call": {...}, "timeline": [...]}')

    recording = sub.add_parser("recording", help="download a call's recording from Twilio (TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN)")
    recording.add_argument("call_sid", metavar="CALL_SID")
    recording.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it ('-' for stdout); .mp3 fetches MP3, anything else WAV")
    recording.add_argument("--format", choices=sorted(("wav", "mp3")), help="override the format the file name implies")

    db = sub.add_parser("db", help="the database the shim uses (DATABASE_URL, or the embedded one under SHIM_DATA_DIR)")
    dsub = db.add_subparsers(dest="db_command", required=True)
    url = dsub.add_parser("url", help="print its DSN (password redacted)")
    url.add_argument("--show-password", action="store_true", help="print the password too")
    dsub.add_parser("psql", help="open psql on it (needs psql on PATH)")


def _stderr_logs(config: Config) -> None:
    """Warnings and errors only, and on stderr: stdout carries the data."""
    configured = logging.getLevelName(config.log_level.upper())
    level = max(logging.WARNING, configured if isinstance(configured, int) else logging.WARNING)
    renderer = structlog.processors.JSONRenderer() if config.log_format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=level)


def _fail(command: str, message: str, code: int) -> int:
    print(f"shim {command}: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, config: Config) -> int:
    _stderr_logs(config)
    command = args.command if args.command != "db" else f"db {args.db_command}"
    try:
        if args.command == "calls":
            return calls_command(args, config)
        if args.command == "transcript":
            return transcript_command(args, config)
        if args.command == "recording":
            return recording_command(args, config)
        if args.db_command == "url":
            return db_url_command(args, config)
        return db_psql_command(args, config)
    except ops.UsageError as exc:
        return _fail(command, str(exc), 2)
    except DatabaseUnavailable as exc:
        return _fail(command, str(exc), 1)
    except BrokenPipeError:  # `shim calls | head`: the reader left; not an error
        sys.stderr.close()
        return 0


class DatabaseUnavailable(RuntimeError):
    pass


def _query(config: Config, work):
    """Run `work(conn)` against the migrated database; DatabaseUnavailable when it cannot be reached."""
    import asyncpg

    from .cli import _run, _with_db

    try:
        return _run(_with_db(config, work))
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        from .db import redact_dsn

        where = redact_dsn(config.database_url) if config.database_url else f"the embedded database under {config.data_dir}"
        raise DatabaseUnavailable(f"cannot reach {where}: {type(exc).__name__}: {exc}") from None


def calls_command(args, config: Config) -> int:
    flt = ops.CallFilter(
        since=ops.parse_since(args.since, datetime.now(timezone.utc)) if args.since is not None else None,
        number=args.number, assistant=args.assistant, ended_reason=args.ended_reason, limit=args.limit,
    )
    rows = _query(config, lambda conn: ops.fetch_calls(conn, flt))
    out = sys.stdout
    if args.json:
        for row in rows:
            out.write(ops.call_summary_json(row).decode() + "\n")
    elif rows:
        out.write(ops.format_calls_table(rows) + "\n")
    if not rows:
        print("shim calls: no calls match", file=sys.stderr)
    out.flush()
    return 0


def transcript_command(args, config: Config) -> int:
    transcript = _query(config, lambda conn: ops.fetch_transcript(conn, args.call_sid))
    if transcript is None:
        return _fail("transcript", f"no call {args.call_sid!r} in the database (see `shim calls`)", 2)
    if args.json:
        sys.stdout.write(ops.transcript_json(transcript).decode() + "\n")
    else:
        sys.stdout.write(ops.format_transcript(transcript) + "\n")
    sys.stdout.flush()
    return 0


def recording_command(args, config: Config) -> int:
    from . import recordings

    fmt = args.format or ("mp3" if args.output.lower().endswith(".mp3") else "wav")
    if args.output != "-":
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            return _fail("recording", f"-o {args.output!r}: directory {parent} does not exist", 2)

    async def lookup(conn):
        return await conn.fetchrow("SELECT call_sid, recording_url FROM calls WHERE call_sid = $1", args.call_sid)

    row = _query(config, lookup)
    if row is None:
        return _fail("recording", f"no call {args.call_sid!r} in the database (see `shim calls`)", 2)
    try:
        media = recordings.media_request(config, args.call_sid, row["recording_url"], fmt)
        written = recordings.download(media, args.output)
    except recordings.RecordingError as exc:
        return _fail("recording", str(exc), 2 if exc.usage else 1)
    if args.output != "-":
        print(f"{args.output} ({written} bytes, {fmt}, recording {media.recording_sid})", file=sys.stderr)
    return 0


def _embedded_running(config: Config) -> bool:
    """Whether another process (a `shim serve`) already runs the embedded server."""
    import psutil

    pidfile = (config.data_dir.expanduser() / "pgdata" / "postmaster.pid")
    try:
        pid = int(pidfile.read_text().splitlines()[0])
        return psutil.Process(pid).name() == "postgres"
    except (OSError, ValueError, IndexError, psutil.Error):
        return False


def db_url_command(args, config: Config) -> int:
    from .db import EmbeddedPostgres, redact_dsn

    if config.database_url:
        dsn = config.database_url
    else:
        running = _embedded_running(config)
        try:
            embedded = EmbeddedPostgres.start(config.data_dir)
        except Exception as exc:  # the wheel's errors are not typed
            raise DatabaseUnavailable(f"cannot start the embedded database under {config.data_dir}: {exc}") from None
        dsn = embedded.dsn
        embedded.stop()
        if not running:
            print("shim db url: the embedded server runs only while a shim process uses it: keep `shim serve` "
                  "running, or use `shim db psql`, which starts it for the session", file=sys.stderr)
    print(dsn if args.show_password else redact_dsn(dsn))
    return 0


def psql_target(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN for psql's command line without its password (argv is visible to every local user
    in `ps`), and the environment that carries the password instead (PGPASSWORD)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    env = dict(os.environ)
    if "://" not in dsn:
        return dsn, env
    parts = urlsplit(dsn)
    userinfo, at, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not (at and colon):
        return dsn, env
    env["PGPASSWORD"] = unquote(password)
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment)), env


def db_psql_command(args, config: Config) -> int:
    psql = shutil.which("psql")
    if psql is None:
        return _fail("db psql", PSQL_HINT, 1)
    if config.database_url:
        dsn, env = psql_target(config.database_url)
        sys.stdout.flush()
        os.execve(psql, [psql, dsn], env)  # nothing of ours left to clean up
    from .db import EmbeddedPostgres

    try:
        embedded = EmbeddedPostgres.start(config.data_dir)
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot start the embedded database under {config.data_dir}: {exc}") from None
    # A child, not exec: the embedded server must be released when psql exits. Ctrl-C belongs
    # to psql (it cancels the query), so this process ignores it meanwhile.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.call([psql, embedded.dsn])
    finally:
        signal.signal(signal.SIGINT, previous)
        embedded.stop()
