"""`shim` command line: serve, numbers."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

import orjson

from . import ops_cli
from .config import Config, ConfigError

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


def _run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _serve(config: Config, host: str, port: int, media_port: int | None) -> None:
    import uvicorn

    from .app import create_app
    from .twilio_media import MAX_FRAME_BYTES

    app = create_app(config, media_host=host, media_port=media_port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="on",
            log_config=None,
            access_log=False,
            ws="websockets-sansio",
            ws_max_size=MAX_FRAME_BYTES,  # the single-port media fallback: Twilio frames are small
            proxy_headers=False,  # signatures use PUBLIC_URL, never forwarded headers
            timeout_graceful_shutdown=int(config.drain_timeout_s) + 5,
        )
    )
    await server.serve()


async def _with_db(config: Config, work):
    from .db import resolve_dsn
    from .store import migrate

    import asyncpg

    dsn, embedded = resolve_dsn(config.database_url, config.data_dir)
    try:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service (HTTP webhooks + media streams)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--media-port", type=int, default=None,
                       help="serve /twilio/media on this port with picows (set PUBLIC_MEDIA_URL to match)")

    tr = sub.add_parser("translate", help="print the Realtime session an exported Vapi assistant becomes; findings on stderr")
    tr.add_argument("file", help="exported assistant JSON (GET /assistant/{id})")
    tr.add_argument("--tools", help="saved tools JSON (a list, or one tool) that model.toolIds name")
    tr.add_argument("--var", action="append", default=[], metavar="K=V", help="template variable (repeatable)")
    tr.add_argument("--from", dest="from_number", default="+15550001111", help="caller number for {{customer.number}}")
    tr.add_argument("--to", dest="to_number", default="+15550002222", help="called number for {{phoneNumber.number}}")

    assistants = sub.add_parser("assistants", help="exported Vapi assistants")
    asub = assistants.add_subparsers(dest="assistants_command", required=True)
    pull = asub.add_parser("pull", help="fetch assistants and their saved tools from the Vapi API (VAPI_API_KEY) into SHIM_ASSISTANTS_DIR")
    pull.add_argument("ids", nargs="+", metavar="ID")

    from . import numbers_cli

    numbers_cli.register(sub)  # shim numbers set | list | migrate | rollback | split | history
    ops_cli.register(sub)  # calls, transcript, recording, db

    from .parity import cli as parity_cli  # shim parity run | import-vapi | report

    parity_cli.add_parser(sub)

    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"shim: {exc}", file=sys.stderr)
        return 2
    if args.command == "parity":
        return parity_cli.main(args, config, _run)
    if args.command == "translate":
        return translate_command(args, config)
    if args.command == "assistants":
        return pull_command(args, config)
    if args.command in ops_cli.COMMANDS:
        return ops_cli.run(args, config)

    from . import logs

    logs.configure(config.log_format, config.log_level)

    if args.command == "serve":
        _run(_serve(config, args.host, args.port, args.media_port))
        return 0

    if args.command == "numbers":
        return numbers_cli.run(args, config)
    return 2


def _read_json(path: str, what: str):
    try:
        raw = open(path, "rb").read()
    except OSError as exc:
        raise SystemExit(f"shim translate: {what} {path}: {exc.strerror}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SystemExit(f"shim translate: {what} {path}: not JSON ({exc})") from None


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
