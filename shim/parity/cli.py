"""`shim parity run | import-vapi | replay | report`: argument parsing and the I/O around shim.parity.

Exit codes: 0 ok; 1 runtime failure (Vapi unreachable, runs failed, database error); 2 usage or
configuration error (bad flag values, missing VAPI_API_KEY / TWILIO_AUTH_TOKEN, bad scenario).
Data goes to stdout; logs and the progress bar to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from typing import Any

from ..config import Config


def _date(value: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a date or ISO date-time, e.g. 2026-11-24") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def add_parser(sub: Any) -> None:
    parity = sub.add_parser("parity", help="prove the shim against Vapi: scripted A/B runs, Vapi call import, report")
    psub = parity.add_subparsers(dest="parity_command", required=True)

    run = psub.add_parser("run", help="play a scenario N times against the shim and/or Vapi; one parity_runs row per run")
    run.add_argument("--scenario", required=True, help="scenario file (YAML or JSON)")
    run.add_argument("--runs", type=int, default=1, help="runs per stack (default 1)")
    run.add_argument("--stack", choices=("shim", "vapi", "both"), default="shim")
    run.add_argument("--target", help="the shim deployment's base URL (default PUBLIC_URL)")
    run.add_argument("--concurrency", type=int, default=1, help="runs in flight at once (default 1)")
    run.add_argument("--number", default="+15550002222", help="the shim number called (E.164; its assistant answers)")
    run.add_argument("--from", dest="from_number", default="+15550001111", help="the caller number (E.164)")

    imp = psub.add_parser("import-vapi", help="import Vapi's call log (GET /call) into calls/utterances/tool_calls")
    imp.add_argument("--since", required=True, type=_date, help="calls created at or after this date (UTC unless given)")
    imp.add_argument("--assistant", help="only this Vapi assistant's calls")

    rpl = psub.add_parser("replay", help="replay real Vapi calls (customer channel of the stereo recording) against the shim")
    which = rpl.add_mutually_exclusive_group(required=True)
    which.add_argument("--vapi-call", action="append", metavar="ID", help="a Vapi call id (repeatable)")
    which.add_argument("--since", type=_date, help="every ended Vapi call created at or after this date")
    rpl.add_argument("--assistant", help="with --since: only this assistant's calls")
    rpl.add_argument("--target", help="the shim deployment's base URL (default PUBLIC_URL)")
    rpl.add_argument("--number", default="+15550002222", help="the shim number called (E.164)")
    rpl.add_argument("--from", dest="from_number", default="+15550001111", help="the caller number (E.164)")

    rep = psub.add_parser("report", help="drift, latency and cost per scenario and stack (and real traffic)")
    rep.add_argument("--assistant", help="only runs/calls of this assistant")
    rep.add_argument("--since", type=_date, help="only runs/calls started at or after this date")
    rep.add_argument("--format", choices=("table", "md", "json", "html"), default="table")


def _err(message: str) -> None:
    print(f"shim parity: {message}", file=sys.stderr)


def _logs_to_stderr(config: Config) -> None:
    """structlog lines on stderr: stdout carries the command's data."""
    import logging

    import structlog

    renderer = structlog.processors.JSONRenderer() if config.log_format == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(config.log_level.upper())),
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),  # the stderr of the moment
        cache_logger_on_first_use=False,  # the CLI may run inside a process that configures structlog again (tests)
    )


def main(args: argparse.Namespace, config: Config, run_coro) -> int:
    _logs_to_stderr(config)
    if args.parity_command == "import-vapi":
        key = os.environ.get("VAPI_API_KEY", "").strip()
        if not key:
            _err("VAPI_API_KEY is not set")
            return 2
        return run_coro(_with_db(config, lambda conn: _import(conn, args, key)))
    if args.parity_command == "report":
        return run_coro(_with_db(config, lambda conn: _report(conn, args)))
    if args.parity_command == "replay":
        key = os.environ.get("VAPI_API_KEY", "").strip()
        problems = [m for m, bad in (("VAPI_API_KEY is not set", not key),
                                     ("TWILIO_AUTH_TOKEN is not set", not config.twilio_auth_token)) if bad]
        if problems:
            _err("replay: " + "; ".join(problems))
            return 2
        return run_coro(_with_db(config, lambda conn: _replay(conn, args, config, key)))
    if args.parity_command == "run":
        from .runner import run_command

        return run_command(args, config, run_coro, _with_db)
    return 2


async def _with_db(config: Config, work):
    from ..db import redact_dsn, resolve_dsn
    from ..store import migrate

    import asyncpg

    unreachable = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
    where = redact_dsn(config.database_url) if config.database_url else f"the embedded database under {config.data_dir}"
    embedded = None
    try:
        try:
            dsn, embedded = resolve_dsn(config.database_url, config.data_dir)
            await migrate(dsn)
            conn = await asyncpg.connect(dsn)
        except unreachable as exc:
            _err(f"cannot use {where}: {type(exc).__name__}: {exc}")
            return 1
        try:
            return await work(conn)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()


async def _import(conn, args, key: str) -> int:
    import json

    from ..vapi_api import VAPI_BASE_URL, VapiApiError, VapiAuthError
    from .vapi_client import VapiClient
    from .vapi_import import import_calls

    base = os.environ.get("VAPI_BASE_URL", VAPI_BASE_URL).strip().rstrip("/")

    def progress(stats) -> None:
        print(f"\rimport-vapi: {stats.seen} calls seen, {stats.inserted} new, {stats.updated} already there, "
              f"{stats.skipped} not ended", end="", file=sys.stderr, flush=True)

    try:
        async with VapiClient(base, key) as client:
            stats = await import_calls(conn, client, since=args.since, assistant_id=args.assistant,
                                       progress=progress if sys.stderr.isatty() else None)
    except VapiAuthError as exc:
        _err(str(exc))
        return 2
    except VapiApiError as exc:
        _err(str(exc))
        return 1
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(json.dumps(stats.to_json()))
    return 0


async def _replay(conn, args, config: Config, key: str) -> int:
    import json

    import httpx

    from ..vapi_api import VAPI_BASE_URL, VapiApiError, VapiAuthError
    from .replay import replay
    from .runner import Settings, run_batch
    from .vapi_client import VapiClient

    base = os.environ.get("VAPI_BASE_URL", VAPI_BASE_URL).strip().rstrip("/")
    settings = Settings(target=(args.target or config.http_url("")).rstrip("/"), auth_token=config.twilio_auth_token,
                        number=args.number, from_number=args.from_number, vapi_base=base, vapi_key=key)
    try:
        async with httpx.AsyncClient() as http:
            vapi = VapiClient(base, key, client=http)
            ids = list(args.vapi_call or [])
            if args.since is not None:
                ids = [c["id"] async for c in vapi.list_calls(since=args.since, assistant_id=args.assistant)
                       if c.get("status") == "ended"]
            results = await replay(conn, vapi, ids, settings, http, run_batch)
    except VapiAuthError as exc:
        _err(str(exc))
        return 2
    except VapiApiError as exc:
        _err(str(exc))
        return 1
    for result in results:
        print(json.dumps(result))
    return 0 if all(r.get("status") == "ok" for r in results) else 1


async def _report(conn, args) -> int:
    from .report import as_html, as_json, as_markdown, as_table, fetch_latencies, fetch_report

    report = await fetch_report(conn, assistant=args.assistant, since=args.since)
    if args.format == "json":
        sys.stdout.write(as_json(report))
    elif args.format == "md":
        sys.stdout.write(as_markdown(report))
    elif args.format == "html":
        latencies = await fetch_latencies(conn, assistant=args.assistant, since=args.since)
        title = "Parity report" + (f" — {args.assistant}" if args.assistant else "")
        sys.stdout.write(as_html(report, latencies, title=title))
    else:
        sys.stdout.write(as_table(report))
    return 0


def run_sync(coro):
    """asyncio.run with uvloop when available (the CLI's _run)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)
