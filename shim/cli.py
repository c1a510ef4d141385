"""shim: Twilio Media Streams <-> OpenAI Realtime, configured by exported Vapi assistants.

Data goes to stdout, logs and errors to stderr. Exit codes: 0 ok, 1 runtime failure (a service
unreachable, a request failed), 2 usage or configuration error (nothing was done)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import orjson

from . import numbers_cli, ops_cli
from .config import Config, ConfigError, default_workers
from .parity import cli as parity_cli
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Failure, UserError  # noqa: F401 - the commands' convention


# Environment each command reads (shown in --help; the README's configuration table has them all).
DB_ENV = "DATABASE_URL (unset: embedded PostgreSQL in SHIM_DATA_DIR), SHIM_DATA_DIR, SHIM_LOG_LEVEL, SHIM_LOG_FORMAT"
SERVE_ENV = (
    "TWILIO_AUTH_TOKEN, OPENAI_API_KEY, PUBLIC_URL (required); PUBLIC_MEDIA_URL, PORT, SHIM_MEDIA_PORT, "
    "TWILIO_ACCOUNT_SID, DATABASE_URL, SHIM_DATA_DIR, SHIM_ASSISTANTS_DIR, SHIM_DEFAULT_ASSISTANT, "
    "SHIM_DRAIN_TIMEOUT, SHIM_METRICS_TOKEN, SHIM_METRICS_PORT, SHIM_ADMIN_TOKEN, SHIM_SECRETS_FILE, SHIM_VAPI_SECRET, "
    "SHIM_TOOL_URL_ALLOW, SHIM_PRICES_FILE, SHIM_WORKERS, "
    "SHIM_VOICE_MAP, SHIM_TRANSCRIPTION_MODEL, SHIM_ANALYSIS_MODEL, OPENAI_REALTIME_URL, "
    "OPENAI_REALTIME_MODEL, OPENAI_BASE_URL, TWILIO_API_BASE, SHIM_LOG_LEVEL, SHIM_LOG_FORMAT"
)


def _run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def _require(config: Config, *, serving: bool, media_port: int | None = None) -> None:
    problems = config.problems(serving=serving, media_port=media_port)
    if problems:
        raise ConfigError.of(problems)


async def _with_db(config: Config, work):
    from .db import cli_connection

    async with cli_connection(config) as conn:
        return await work(conn)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shim")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        from . import __version__

        return __version__


def _workers_arg(raw: str) -> int:
    from .config import workers_count

    try:
        count = workers_count(raw, "--workers")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--workers=")) from None
    if count is None:
        raise argparse.ArgumentTypeError("'': expected a positive number of worker processes")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each command's --help lists the environment it reads. Configuration: README.md#configuration-environment",
    )
    parser.add_argument("--version", action="version", version=f"shim {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, env: str, parent=sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, description=help, epilog=f"environment: {env}")

    serve = command("serve", "run the service (Twilio webhooks, media streams, /healthz, /readyz, /metrics)", SERVE_ENV)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8080),
                       help="the one public port: webhooks, health, and the media stream on /twilio/media (default: $PORT or 8080)")
    serve.add_argument("--media-port", type=int, default=None,
                       help="also serve /twilio/media on its own port (set PUBLIC_MEDIA_URL to match); default: SHIM_MEDIA_PORT or none")
    serve.add_argument("--workers", type=_workers_arg, default=None, metavar="N",
                       help="worker processes sharing the ports (SO_REUSEPORT), each a whole server; 1: one process, "
                            "no parent (default: SHIM_WORKERS, else one per CPU core)")

    check = command("check", "validate the configuration and reach Postgres, the OpenAI endpoint and every assistant, without serving", SERVE_ENV)
    check.add_argument("--media-port", type=int, default=None, help="check as for `shim serve --media-port`")
    check.add_argument("--offline", action="store_true", help="skip the network probes (configuration and assistants only)")
    check.add_argument("--json", action="store_true", help="one JSON object per check on stdout")

    tr = command("translate", "print the Realtime session an exported Vapi assistant becomes; findings on stderr",
                 "OPENAI_REALTIME_MODEL, SHIM_TRANSCRIPTION_MODEL, SHIM_VOICE_MAP")
    tr.add_argument("file", help="exported assistant JSON (GET /assistant/{id})")
    tr.add_argument("--tools", help="saved tools JSON (a list, or one tool) that model.toolIds name")
    tr.add_argument("--var", action="append", default=[], metavar="K=V", help="template variable (repeatable)")
    tr.add_argument("--from", dest="from_number", default="+15550001111", help="caller number for {{customer.number}}")
    tr.add_argument("--to", dest="to_number", default="+15550002222", help="called number for {{phoneNumber.number}}")

    assistants = command("assistants", "exported Vapi assistants", "see the subcommands")
    asub = assistants.add_subparsers(dest="assistants_command", required=True, metavar="SUBCOMMAND")
    pull = command("pull", "fetch assistants and their saved tools from the Vapi API into SHIM_ASSISTANTS_DIR",
                   "VAPI_API_KEY (required), VAPI_BASE_URL, SHIM_ASSISTANTS_DIR; exit 3: the key was rejected", asub)
    pull.add_argument("ids", nargs="+", metavar="ID")

    numbers_cli.register(sub)  # shim numbers set | list | migrate | rollback | split | history
    ops_cli.register(sub)  # calls, transcript, recording, db
    parity_cli.add_parser(sub)  # shim parity run | import-vapi | replay | report
    _describe_environment(sub)
    return parser


TWILIO_ENV = "TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_API_BASE"
# Environment of the commands registered by their own modules, shown in their --help.
COMMAND_ENV = {
    "numbers set": DB_ENV + ", SHIM_ASSISTANTS_DIR",
    "numbers list": TWILIO_ENV + ", PUBLIC_URL, " + DB_ENV,
    "numbers migrate": TWILIO_ENV + ", PUBLIC_URL, SHIM_ASSISTANTS_DIR, " + DB_ENV,
    "numbers rollback": TWILIO_ENV + ", " + DB_ENV,
    "numbers split": DB_ENV,
    "numbers history": DB_ENV,
    "calls": DB_ENV, "transcript": DB_ENV, "db": DB_ENV,
    "recording": TWILIO_ENV + ", " + DB_ENV,
    "parity": ("TWILIO_AUTH_TOKEN, PUBLIC_URL (the shim stack); VAPI_API_KEY, VAPI_BASE_URL (the Vapi stack, import); "
               "OPENAI_API_KEY, OPENAI_BASE_URL (speech for say: turns); SHIM_PRICES_FILE, SHIM_PARITY_AGENT_SILENCE_S, "
               "SHIM_PARITY_MAX_WAIT_S, " + DB_ENV),
}


def _describe_environment(sub: argparse._SubParsersAction, prefix: str = "") -> None:
    """Give every command without an `environment:` epilog the one COMMAND_ENV names."""
    for name, parser in sub.choices.items():
        path = f"{prefix}{name}"
        env = COMMAND_ENV.get(path) or COMMAND_ENV.get(path.split()[0])
        if env and not parser.epilog:
            parser.epilog = f"environment: {env}"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _describe_environment(action, path + " ")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    where = "shim " + " ".join(a for a in (args.command, getattr(args, f"{args.command}_command", None)) if a)
    try:
        return dispatch(args)
    except ConfigError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (UserError, Failure) as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: one line; the traceback on request
        if os.environ.get("SHIM_LOG_LEVEL", "").strip().lower() == "debug":
            raise
        print(f"{where}: {type(exc).__name__}: {exc} (SHIM_LOG_LEVEL=debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def dispatch(args) -> int:
    config = Config.from_env(strict=args.command not in ("serve", "check"))  # those two report all problems together
    from . import logs
    from .workers import WorkerSlot

    worker = WorkerSlot.from_env() if args.command == "serve" else None  # one of `shim serve --workers N`
    # Before anything logs: structlog's default would print to stdout, which is for data.
    logs.configure(config.log_format, config.log_level, worker=worker.index if worker else None)
    if args.command == "translate":
        return translate_command(args, config)
    if args.command == "assistants":
        return pull_command(args, config)
    if args.command in ops_cli.COMMANDS:
        return ops_cli.run(args, config)

    if args.command == "serve":
        from .serve import serve

        media_port = args.media_port if args.media_port is not None else config.media_port
        _require(config, serving=True, media_port=media_port)
        workers = args.workers or config.workers or default_workers()
        if workers > 1 and worker is None:
            from .workers import supervise

            return supervise(config, args.host, args.port, media_port, workers)
        _run(serve(config, args.host, args.port, media_port, worker))
        return EXIT_OK

    if args.command == "check":
        from .check import run_check

        media_port = args.media_port if args.media_port is not None else config.media_port
        return _run(run_check(config, media_port=media_port, offline=args.offline, as_json=args.json))

    if args.command == "numbers":
        return numbers_cli.run(args, config)
    if args.command == "parity":
        return parity_cli.main(args, config, _run)
    return EXIT_USAGE


def _read_json(path: str, what: str):
    try:
        raw = open(path, "rb").read()
    except OSError as exc:
        raise UserError(f"{what} {path}: {exc.strerror}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UserError(f"{what} {path}: not JSON ({exc})") from None


def pull_command(args, config: Config) -> int:
    """Exit codes: 0 all pulled; 1 some failed (the others are on disk); 2 usage (bad id, no
    key: no request made); 3 the key was rejected."""
    import os

    from .vapi_api import VAPI_BASE_URL, InvalidIdError, PullError, VapiApiError, VapiAuthError, pull_assistants

    key = os.environ.get("VAPI_API_KEY", "").strip()
    if not key:
        print("shim assistants pull: VAPI_API_KEY is not set", file=sys.stderr)
        return 2
    base_url = os.environ.get("VAPI_BASE_URL", VAPI_BASE_URL).strip().rstrip("/")
    try:
        results = _run(pull_assistants(args.ids, api_key=key, dest=config.assistants_dir, base_url=base_url))
    except InvalidIdError as exc:
        print(f"shim assistants pull: {exc}", file=sys.stderr)
        return 2
    except VapiAuthError as exc:
        print(f"shim assistants pull: {exc}", file=sys.stderr)
        return 3
    except PullError as exc:
        for result in exc.results:
            print(f"{result.assistant_id} -> {result.path} (+{len(result.tool_paths)} tools)")
        print(f"shim assistants pull: {exc}", file=sys.stderr)
        return 1
    except VapiApiError as exc:
        print(f"shim assistants pull: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(f"{result.assistant_id} -> {result.path} (+{len(result.tool_paths)} tools)")
        for warning in result.warnings:
            print(f"shim assistants pull: {result.assistant_id}: warning: {warning}", file=sys.stderr)
    return 0


def translate_command(args, config: Config) -> int:
    from pathlib import Path

    from .assistant import AssistantError, CallContext, load_saved_tools
    from .translate import translate

    assistant = _read_json(args.file, "assistant")
    saved: dict = {}
    if args.tools:
        tools = _read_json(args.tools, "--tools")
        for i, tool in enumerate(tools if isinstance(tools, list) else [tools]):
            if not isinstance(tool, dict) or not isinstance(tool.get("id"), str):
                print(f"shim translate: --tools {args.tools}[{i}]: got {str(tool)[:80]!r}, expected a saved tool object with an id", file=sys.stderr)
                return 2
            saved[tool["id"]] = tool
    # Saved tools `shim assistants pull` wrote beside the assistant (tools/<id>.json) count too.
    model = assistant.get("model") if isinstance(assistant, dict) else None
    for tool_id, tool in load_saved_tools(Path(args.file).parent, model.get("toolIds") if isinstance(model, dict) else None).items():
        saved.setdefault(tool_id, tool)
    variables = {}
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"shim translate: --var {item!r}: expected K=V", file=sys.stderr)
            return 2
        variables[key] = value
    assistant_id = Path(args.file).stem.split(".")[0]
    ctx = CallContext(call_sid="CA" + "0" * 32, from_number=args.from_number, to_number=args.to_number, variables=variables)
    try:
        setup = translate(assistant_id, assistant, ctx, model=config.openai_realtime_model, saved_tools=saved,
                          transcription_model=config.transcription_model, voice_overrides=dict(config.voice_map))
    except AssistantError as exc:
        print(f"shim translate: {args.file}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(setup.session, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(findings_table(setup.findings), file=sys.stderr)
    return 0


def findings_table(findings) -> str:
    rows = [(f.status, f.path, f.detail) for f in findings]
    if not rows:
        return "no findings"
    w0 = max(len("status"), *(len(r[0]) for r in rows))
    w1 = max(len("field"), *(len(r[1]) for r in rows))
    lines = [f"{'status':<{w0}}  {'field':<{w1}}  what the shim does", f"{'-' * w0}  {'-' * w1}  {'-' * 18}"]
    order = {"unsupported": 0, "approximated": 1, "mapped": 2}
    for status, path, detail in sorted(rows, key=lambda r: (order.get(r[0], 3), r[1])):
        lines.append(f"{status:<{w0}}  {path:<{w1}}  {detail}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
