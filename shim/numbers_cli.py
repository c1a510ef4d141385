"""`shim numbers …`: set, list, migrate, split, rollback, history.

Data goes to stdout, messages to stderr. Exit codes: 0 done (or nothing to do), 2 usage or
validation error (nothing was changed anywhere), 1 a failure talking to Twilio or Postgres
(the audit row in number_changes says how far it got).

Every change is one audit row in `number_changes`, written before Twilio is touched with
outcome 'pending' and settled to 'ok' or 'failed' afterwards: a crash or a lost connection
between the two leaves the row 'pending', which says exactly that.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import sys
from typing import Any

import orjson

from .config import Config
from .numbers import (
    NumberInputError,
    Route,
    VoiceSettings,
    aligned_table,
    check_e164,
    check_percent,
    describe_changes,
    fallback_number,
    plan_migrate,
    points_to,
    redact_url,
    redact_urls,
)

OK, FAILED, USAGE = 0, 1, 2
HEALTH_TIMEOUT_S = 5.0


class CommandError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def usage(message: str) -> CommandError:
    return CommandError(message, USAGE)


def failure(message: str) -> CommandError:
    return CommandError(message, FAILED)


# --- argument parsing -------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    numbers = sub.add_parser(
        "numbers", help="move Twilio numbers between Vapi and the shim; which assistant answers which number",
        description="Exit codes: 0 ok, 2 usage/validation error (nothing changed), 1 failure talking to Twilio or Postgres.",
    )
    nsub = numbers.add_subparsers(dest="numbers_command", required=True)

    def fallback(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fallback-number", metavar="E164",
                       help="Vapi's fallbackDestination: where callers are transferred when the model cannot be reached "
                            "again mid-call (instead of the apology and a hang-up); 'none' clears it; kept when omitted")

    def actor(p: argparse.ArgumentParser) -> None:
        p.add_argument("--actor", help="who is making the change, for the audit trail (default: the OS user)")

    nset = nsub.add_parser("set", help="route NUMBER to an assistant, or to a server that picks one (local table only)")
    nset.add_argument("number")
    who = nset.add_mutually_exclusive_group(required=True)
    who.add_argument("--assistant", help="assistant id (SHIM_ASSISTANTS_DIR/<id>.json)")
    who.add_argument("--server-url", help="ask this server with Vapi's assistant-request on every call")
    fallback(nset)
    actor(nset)

    nlist = nsub.add_parser("list", help="every number on the Twilio account: where its Voice URL points, its assistant and split")
    nlist.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    mig = nsub.add_parser("migrate", help="point NUMBER's Voice URL at this deployment (PUBLIC_URL), recording its current settings")
    mig.add_argument("number")
    mig.add_argument("--assistant", required=True, help="assistant id that answers the number (SHIM_ASSISTANTS_DIR/<id>.json)")
    mig.add_argument("--dry-run", action="store_true", help="print the before/after and change nothing")
    fallback(mig)
    actor(mig)

    rb = nsub.add_parser("rollback", help="restore NUMBER's recorded Twilio voice settings (back to Vapi)")
    rb.add_argument("number")
    actor(rb)

    sp = nsub.add_parser("split", help="the shim answers N%% of NUMBER's callers (sticky per caller); the others go to the recorded Voice URL")
    sp.add_argument("number")
    sp.add_argument("--percent", required=True, metavar="N", help="0 to 100")
    actor(sp)

    hist = nsub.add_parser("history", help="the audit trail of NUMBER's changes")
    hist.add_argument("number")
    hist.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run(args: argparse.Namespace, config: Config) -> int:
    command = args.numbers_command
    try:
        handler = {
            "set": cmd_set, "list": cmd_list, "migrate": cmd_migrate, "rollback": cmd_rollback,
            "split": cmd_split, "history": cmd_history,
        }[command]
        return _run(handler(args, config))
    except NumberInputError as exc:
        _err(command, str(exc))
        return USAGE
    except CommandError as exc:
        _err(command, str(exc))
        return exc.code
    except BrokenPipeError:  # `shim numbers list --json | head`: the reader left, which is not an error
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


def _run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _err(command: str, message: str) -> None:
    print(f"shim numbers {command}: {message}", file=sys.stderr)


def _out(line: str = "") -> None:
    print(line, flush=True)


def _actor(args: argparse.Namespace) -> str:
    if getattr(args, "actor", None):
        return args.actor
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


# --- Postgres ---------------------------------------------------------------------------------


def _database(config: Config):
    from .db import cli_connection  # config checked, schema migrated; unreachable: exit 1

    return cli_connection(config)


_ROW = "number, assistant_id, server_url, split_percent, previous_settings, twilio_sid, migrated_at"


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


async def _row(conn, number: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(f"SELECT {_ROW} FROM numbers WHERE number = $1", number)
    if row is None:
        return None
    out = dict(row)
    out["previous_settings"] = _json(out["previous_settings"])
    return out


async def _audit(conn, number: str, action: str, before: Any, after: Any, actor: str, outcome: str = "ok",
                 error: str | None = None) -> int:
    return await conn.fetchval(
        """INSERT INTO number_changes (number, action, before, after, actor, outcome, error)
           VALUES ($1, $2, $3::jsonb, $4::jsonb, $5, $6, $7) RETURNING id""",
        number, action, orjson.dumps(redact_urls(before)).decode(), orjson.dumps(redact_urls(after)).decode(), actor, outcome, error,
    )


async def _settle(conn, change_id: int, outcome: str, error: str | None = None) -> None:
    await conn.execute("UPDATE number_changes SET outcome = $2, error = $3 WHERE id = $1", change_id, outcome, error)


async def _refresh_snapshot(conn, config: Config) -> None:
    """Best effort: the routing snapshot in SHIM_DATA_DIR, for an instance on this host that
    starts while Postgres is down (running instances follow the table by themselves)."""
    from .routes import SNAPSHOT_NAME, snapshot_from

    try:
        await snapshot_from(conn, config.data_dir / SNAPSHOT_NAME)
    except Exception as exc:  # never fails a change that is already made
        _err("snapshot", f"routing snapshot not refreshed ({type(exc).__name__})")


# --- Twilio -----------------------------------------------------------------------------------


def _twilio(config: Config):
    from .twilio_numbers import NumbersApi

    missing = [n for n, v in (("TWILIO_ACCOUNT_SID", config.twilio_account_sid), ("TWILIO_AUTH_TOKEN", config.twilio_auth_token)) if not v]
    if missing:
        raise usage(f"{' and '.join(missing)} must be set (the Twilio account that owns the numbers)")
    return NumbersApi(config)


async def _twilio_call(fn, *args):
    from .twilio_numbers import TwilioApiError, TwilioAuthError

    try:
        return await asyncio.to_thread(fn, *args)
    except (TwilioAuthError, TwilioApiError) as exc:
        raise failure(str(exc)) from None


async def _find_on_account(api, number: str):
    found = await _twilio_call(api.find, number)
    if found is None:
        raise usage(f"{number} is not a phone number of Twilio account {api.account_sid} (IncomingPhoneNumbers has no such number)")
    return found


_KEEP = object()  # --fallback-number not given: the stored one stays


def _fallback(args) -> Any:
    raw = getattr(args, "fallback_number", None)
    if raw is None:
        return _KEEP
    try:
        return fallback_number(raw)
    except NumberInputError as exc:
        raise usage(f"--fallback-number: {exc}") from None


def _jsonb(value: Any) -> str | None:
    return orjson.dumps(value).decode() if isinstance(value, dict) else None


# --- set --------------------------------------------------------------------------------------


async def cmd_set(args, config: Config) -> int:
    number = check_e164(args.number)
    if args.assistant is not None:
        _check_assistant(config, args.assistant)  # as migrate: an id the voice webhook would refuse is refused here
    elif not re.match(r"^https?://[^\s]+$", args.server_url):
        raise usage(f"--server-url {args.server_url!r}: expected an http(s) URL")
    fallback = _fallback(args)
    async with _database(config) as conn:
        async with conn.transaction():
            old = await _row(conn, number)
            await conn.execute(
                """INSERT INTO numbers (number, assistant_id, server_url, fallback_destination, updated_at)
                   VALUES ($1, $2, $3, $4::jsonb, now())
                   ON CONFLICT (number) DO UPDATE SET assistant_id = EXCLUDED.assistant_id,
                       server_url = EXCLUDED.server_url, updated_at = now(),
                       fallback_destination = CASE WHEN $5 THEN EXCLUDED.fallback_destination
                                                   ELSE numbers.fallback_destination END""",
                number, args.assistant, args.server_url, _jsonb(fallback), fallback is not _KEEP,
            )
            before = {"assistant_id": old["assistant_id"], "server_url": old["server_url"]} if old else None
            after = {"assistant_id": args.assistant, "server_url": args.server_url}
            if fallback is not _KEEP:
                after["fallback_destination"] = fallback
            await _audit(conn, number, "set", before, after, _actor(args))
        await _refresh_snapshot(conn, config)
    _out(f"{number} -> {args.assistant or 'assistant-request ' + redact_url(args.server_url)}")
    return OK


# --- list -------------------------------------------------------------------------------------


async def cmd_list(args, config: Config) -> int:
    api = _twilio(config)
    on_account = await _twilio_call(api.list_all)
    rows: dict[str, dict[str, Any]] = {}
    try:
        async with _database(config) as conn:
            rows = {r["number"]: dict(r) for r in await conn.fetch(f"SELECT {_ROW} FROM numbers ORDER BY number")}
    except CommandError as exc:
        _err("list", f"{exc}: assistant and split are left empty")
    records = []
    for pn in sorted(on_account, key=lambda p: p.phone_number):
        row = rows.pop(pn.phone_number, None)
        records.append({
            "number": pn.phone_number, "sid": pn.sid, "friendly_name": pn.friendly_name,
            "points_to": points_to(pn.settings.voice_url, config.public_url), "voice_url": redact_url(pn.settings.voice_url),
            "assistant_id": row["assistant_id"] if row else None,
            "split_percent": row["split_percent"] if row else None,
            "migrated": bool(row and row["migrated_at"]), "on_account": True,
        })
    for number, row in rows.items():  # routed locally (`numbers set`) but not on this Twilio account
        records.append({
            "number": number, "sid": None, "friendly_name": None, "points_to": None, "voice_url": None,
            "assistant_id": row["assistant_id"], "split_percent": row["split_percent"],
            "migrated": bool(row["migrated_at"]), "on_account": False,
        })
    if args.json:
        for record in records:
            _out(orjson.dumps(record).decode())
        return OK
    table = [
        [r["number"], r["points_to"] or "(not on account)", r["assistant_id"] or "",
         f"{r['split_percent']}%" if r["split_percent"] is not None and (r["migrated"] or r["points_to"] == "shim") else "",
         r["voice_url"] or "", r["friendly_name"] or ""]
        for r in records
    ]
    _out(aligned_table(["NUMBER", "POINTS TO", "ASSISTANT", "SPLIT", "VOICE URL", "NAME"], table))
    return OK


# --- migrate ----------------------------------------------------------------------------------


def _check_assistant(config: Config, assistant_id: str) -> None:
    """The assistant must load and translate, as it will on a call."""
    from .assistant import AssistantError, CallContext, load_assistant, load_saved_tools
    from .translate import translate

    try:
        assistant = load_assistant(config.assistants_dir, assistant_id)
        model = assistant.get("model")
        saved = load_saved_tools(config.assistants_dir, model.get("toolIds") if isinstance(model, dict) else None)
        ctx = CallContext(call_sid="CA" + "0" * 32, from_number="+15550001111", to_number="+15550002222", variables={})
        translate(assistant_id, assistant, ctx, model=config.openai_realtime_model, saved_tools=saved,
                  transcription_model=config.transcription_model, voice_overrides=dict(config.voice_map))
    except AssistantError as exc:
        raise usage(f"--assistant {assistant_id!r}: {exc}") from None


async def _check_deployment(config: Config) -> None:
    import httpx

    if not os.environ.get("PUBLIC_URL", "").strip():
        raise usage("PUBLIC_URL is not set: Twilio must be given this deployment's public URL (e.g. https://shim.example.com)")
    url = config.public_base + "/healthz"
    try:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as http:
            response = await http.get(url)
    except httpx.HTTPError as exc:
        raise usage(f"the deployment does not answer GET {url} ({type(exc).__name__}); start `shim serve` there first, "
                    "or fix PUBLIC_URL") from None
    if response.status_code != 200:
        raise usage(f"the deployment answered GET {url} with HTTP {response.status_code}, expected 200")


async def cmd_migrate(args, config: Config) -> int:
    from .twilio_numbers import TwilioApiError, TwilioAuthError

    number = check_e164(args.number)
    _check_assistant(config, args.assistant)
    fallback = _fallback(args)  # checked before anything changes
    api = _twilio(config)
    await _check_deployment(config)
    if not config.public_base.startswith("https://"):
        _err("migrate", f"warning: PUBLIC_URL {config.public_base} is not https; Twilio will send calls over plain HTTP")
    actor = _actor(args)
    async with _database(config) as conn:
        row = await _row(conn, number)
        pn = await _find_on_account(api, number)
        recorded = VoiceSettings.from_json(row["previous_settings"]) if row and row["previous_settings"] else None
        plan = plan_migrate(
            current=pn.settings, recorded=recorded, assistant_before=row["assistant_id"] if row else None,
            assistant_after=args.assistant, public_url=config.public_url,
            voice_application_sid=pn.voice_application_sid, trunk_sid=pn.trunk_sid, number=number,
        )
        split = row["split_percent"] if row and row["previous_settings"] else 100
        header = f"{number} ({pn.sid})"
        if not plan.changes_anything and row and row["migrated_at"]:
            _out(f"{header}: already on the shim with assistant {args.assistant} ({split}% of callers); nothing changed")
            return OK
        lines = describe_changes(plan.twilio_changes, plan.target)
        lines.append(f"  {'assistant':<20}  {plan.assistant_before or '(none)'} -> {plan.assistant_after}"
                     if plan.assistant_before != plan.assistant_after else f"  {'assistant':<20}  {plan.assistant_after} (unchanged)")
        lines.append("  recorded for rollback: " + ", ".join(f"{k}={redact_url(v) or '(empty)'}" for k, v in plan.previous.to_json().items()))
        if args.dry_run:
            _out(f"{header}: dry run, nothing changed; migrate would set:")
            for line in lines:
                _out(line)
            for note in plan.notes:
                _out(f"  note: {note}")
            return OK

        before = {**pn.settings.to_json(), "assistant_id": plan.assistant_before, "split_percent": row["split_percent"] if row else None}
        after = {**plan.target.to_json(), "assistant_id": plan.assistant_after, "split_percent": split}
        # 1. Record what rollback will restore, and open the audit row, before Twilio changes.
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO numbers (number, assistant_id, previous_settings, twilio_sid, fallback_destination, updated_at)
                   VALUES ($1, $2, $3::jsonb, $4, $5::jsonb, now())
                   ON CONFLICT (number) DO UPDATE SET assistant_id = EXCLUDED.assistant_id,
                       previous_settings = EXCLUDED.previous_settings, twilio_sid = EXCLUDED.twilio_sid, updated_at = now(),
                       fallback_destination = CASE WHEN $6 THEN EXCLUDED.fallback_destination
                                                   ELSE numbers.fallback_destination END""",
                number, args.assistant, orjson.dumps(plan.previous.to_json()).decode(), pn.sid,
                _jsonb(fallback), fallback is not _KEEP,
            )
            change_id = await _audit(conn, number, "migrate", before, after, actor, outcome="pending")
        # 2. Twilio.
        if plan.twilio_changes:
            try:
                await asyncio.to_thread(api.update, pn.sid, plan.target)
            except (TwilioAuthError, TwilioApiError) as exc:
                applied = getattr(exc, "applied", False)
                await _after_twilio_failure(conn, change_id, number, row, exc, applied)
                raise failure(f"{exc}; " + ("Twilio is unchanged" if applied is False else
                              "it is unknown whether Twilio applied the change: check `shim numbers list`; "
                              "`shim numbers rollback` restores the recorded settings")) from None
        # 3. Settle.
        try:
            async with conn.transaction():
                await conn.execute("UPDATE numbers SET migrated_at = now(), updated_at = now() WHERE number = $1", number)
                await _settle(conn, change_id, "ok")
        except Exception as exc:
            raise failure(f"Twilio was updated but Postgres could not record it ({type(exc).__name__}: {exc}); "
                          f"audit row {change_id} stays 'pending'") from None
        await _refresh_snapshot(conn, config)
    _out(f"{header}: on the shim, assistant {args.assistant}, {split}% of callers")
    for line in lines:
        _out(line)
    for note in plan.notes:
        _err("migrate", f"note: {note}")
    return OK


async def _after_twilio_failure(conn, change_id: int, number: str, row: dict[str, Any] | None, exc: Exception,
                                applied: bool | None) -> None:
    try:
        async with conn.transaction():
            if applied is False:  # Twilio refused: put the row back as it was
                if row is None:
                    await conn.execute("DELETE FROM numbers WHERE number = $1", number)
                else:
                    await conn.execute(
                        """UPDATE numbers SET assistant_id = $2, previous_settings = $3::jsonb, twilio_sid = $4,
                               updated_at = now() WHERE number = $1""",
                        number, row["assistant_id"],
                        orjson.dumps(row["previous_settings"]).decode() if row["previous_settings"] is not None else None,
                        row["twilio_sid"],
                    )
                await _settle(conn, change_id, "failed", str(exc))
            else:
                await _settle(conn, change_id, "pending", f"unknown whether Twilio applied it: {exc}")
    except Exception as db_exc:  # the row stays 'pending', which says as much
        _err("audit", f"could not record the outcome of change {change_id}: {type(db_exc).__name__}")


# --- rollback ---------------------------------------------------------------------------------


async def cmd_rollback(args, config: Config) -> int:
    from .twilio_numbers import TwilioApiError, TwilioAuthError

    number = check_e164(args.number)
    api = _twilio(config)
    actor = _actor(args)
    async with _database(config) as conn:
        row = await _row(conn, number)
        if not row or not row["previous_settings"]:
            raise usage(f"{number} was never migrated (no recorded settings to restore): nothing to roll back")
        recorded = VoiceSettings.from_json(row["previous_settings"])
        pn = await _find_on_account(api, number)
        changes = pn.settings.differences(recorded)
        if changes and points_to(pn.settings.voice_url, config.public_url) != "shim":
            _err("rollback", f"warning: its Voice URL was {redact_url(pn.settings.voice_url)!r}, not this deployment; "
                             "restoring the recorded settings anyway")
        before = {**pn.settings.to_json(), "assistant_id": row["assistant_id"], "split_percent": row["split_percent"]}
        after = {**recorded.to_json(), "assistant_id": row["assistant_id"], "split_percent": 100}
        change_id = await _audit(conn, number, "rollback", before, after, actor, outcome="pending")
        if changes:
            try:
                await asyncio.to_thread(api.update, pn.sid, recorded)
            except (TwilioAuthError, TwilioApiError) as exc:
                applied = getattr(exc, "applied", False)
                await _after_twilio_failure(conn, change_id, number, row, exc, applied)
                raise failure(f"{exc}; " + ("Twilio is unchanged: the number is still on the shim" if applied is False
                              else "it is unknown whether Twilio applied it: run rollback again")) from None
        try:
            async with conn.transaction():
                await conn.execute(
                    """UPDATE numbers SET previous_settings = NULL, migrated_at = NULL, split_percent = 100,
                           updated_at = now() WHERE number = $1""", number)
                await _settle(conn, change_id, "ok")
        except Exception as exc:
            raise failure(f"Twilio was restored but Postgres could not record it ({type(exc).__name__}: {exc}); "
                          f"audit row {change_id} stays 'pending'") from None
        await _refresh_snapshot(conn, config)
    _out(f"{number} ({pn.sid}): rolled back to the recorded settings" + ("" if changes else " (Twilio already had them)"))
    for line in describe_changes(changes, recorded):
        _out(line)
    return OK


# --- split ------------------------------------------------------------------------------------


async def cmd_split(args, config: Config) -> int:
    number = check_e164(args.number)
    percent = check_percent(args.percent)
    async with _database(config) as conn:
        async with conn.transaction():
            row = await conn.fetchrow(f"SELECT {_ROW} FROM numbers WHERE number = $1 FOR UPDATE", number)
            if row is None or row["previous_settings"] is None:
                raise usage(f"{number} is not migrated: run `shim numbers migrate {number} --assistant ID` first "
                            "(the split sends the other callers to the Voice URL it records)")
            route = Route.from_row(row)
            if not route.redirect_url and percent < 100:
                raise usage(f"{number} had no Voice URL before it was migrated: there is nowhere to send the other "
                            f"{100 - percent}% of callers")
            if row["split_percent"] == percent:
                _out(f"{number}: the shim already answers {percent}% of callers; nothing changed")
                return OK
            await conn.execute("UPDATE numbers SET split_percent = $2, updated_at = now() WHERE number = $1", number, percent)
            await _audit(conn, number, "split", {"split_percent": row["split_percent"]}, {"split_percent": percent}, _actor(args))
        await _refresh_snapshot(conn, config)
    rest = 100 - percent
    _out(f"{number}: the shim answers {percent}% of callers" +
         (f", {rest}% are sent to {redact_url(route.redirect_url)}" if rest else "") + " (live on every instance within seconds)")
    return OK


# --- history ----------------------------------------------------------------------------------


def _summary(before: Any, after: Any) -> str:
    before, after = before or {}, after or {}
    parts = []
    for key in dict.fromkeys([*before, *after]):
        a, b = before.get(key), after.get(key)
        if (a or "") != (b or ""):
            parts.append(f"{key} {a if a not in (None, '') else '(empty)'} -> {b if b not in (None, '') else '(empty)'}")
    return "; ".join(parts) or "(no change)"


async def cmd_history(args, config: Config) -> int:
    number = check_e164(args.number)
    async with _database(config) as conn:
        rows = await conn.fetch(
            "SELECT id, number, action, before, after, actor, at, outcome, error FROM number_changes "
            "WHERE number = $1 ORDER BY at, id", number)
    records = [{**dict(r), "before": _json(r["before"]), "after": _json(r["after"])} for r in rows]
    if not records:
        _err("history", f"no changes recorded for {number}")
    if args.json:
        for record in records:
            _out(orjson.dumps(record).decode())
        return OK
    table = [
        [r["at"].strftime("%Y-%m-%d %H:%M:%S%z"), r["action"], r["actor"],
         r["outcome"] + (f" ({r['error']})" if r["error"] else ""), _summary(r["before"], r["after"])]
        for r in records
    ]
    if records:
        _out(aligned_table(["AT", "ACTION", "ACTOR", "OUTCOME", "CHANGE"], table))
    return OK
