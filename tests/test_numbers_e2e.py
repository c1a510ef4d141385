"""`shim numbers` end to end: the real CLI (a subprocess) against the Twilio REST stand-in and a
real Postgres, and the real server answering signed /twilio/voice webhooks for the numbers it
moved."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import asyncpg
import orjson
from twilio.rest.api.v2010.account.incoming_phone_number import IncomingPhoneNumberInstance, IncomingPhoneNumberPage

from shim.numbers import VAPI_INBOUND_URL, split_bucket
from shim.testing._serve import free_port
from shim.testing.fake_realtime import Script
from shim.testing.fake_twilio_api import FakeTwilioApi
from shim.testing.pg_proxy import PgProxy

from .harness import AUTH_TOKEN, REPO, SHIM_NUMBER, Running, running_shim

ACCOUNT = "AC" + "7" * 32
VOICE_FIELDS = ("voice_url", "voice_method", "voice_fallback_url", "voice_fallback_method", "status_callback", "status_callback_method")
VAPI_STATUS = "https://api.vapi.ai/twilio/call_status"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.out.splitlines() if line.strip()]


@dataclass
class Stack:
    twilio: FakeTwilioApi
    run: Running
    dsn: str
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "SHIM_", "PUBLIC_", "DATABASE_URL"))}
        env.update({
            "TWILIO_ACCOUNT_SID": ACCOUNT, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_API_BASE": self.twilio.url,
            "PUBLIC_URL": self.run.config.public_url, "DATABASE_URL": self.dsn,
            "SHIM_ASSISTANTS_DIR": str(self.run.config.assistants_dir), "SHIM_DATA_DIR": str(self.tmp / "cli"),
            # Info logs (e.g. which database) still go to stdout in this branch; the CLI-hygiene
            # work moves every log line to stderr.
            "SHIM_LOG_FORMAT": "console", "SHIM_LOG_LEVEL": "warning",
        })
        env.update(extra)
        return env

    async def cli(self, *argv: str, **extra_env: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shim.cli", "numbers", *argv, env=self.env(**extra_env), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return Result(proc.returncode, out.decode(), err.decode())

    async def ring(self, to: str = SHIM_NUMBER, from_: str = "+14155550123") -> ElementTree.Element:
        response = await self.run.voice_webhook(f"CA{uuid.uuid4().hex}", to=to, from_=from_)
        assert response.status_code == 200, response.text
        return ElementTree.fromstring(response.text)


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, db_dsn: str, *, server_dsn: str | None = None, **overrides):
    async with FakeTwilioApi(ACCOUNT, AUTH_TOKEN) as twilio:
        # No default assistant: a routed call proves the routing table answered it.
        async with running_shim(tmp_path, server_dsn or db_dsn, Script(), default_assistant="", **overrides) as run:
            yield Stack(twilio, run, db_dsn, tmp_path)


def vapi_number(twilio: FakeTwilioApi, number: str = SHIM_NUMBER) -> dict:
    sid = twilio.add_number(number, status_callback=VAPI_STATUS, voice_fallback_url=None)
    return dict(twilio.phone_numbers[sid])


def voice_settings(number: dict) -> dict:
    return {k: number[k] for k in VOICE_FIELDS}


def streams_to_shim(twiml: ElementTree.Element) -> bool:
    return twiml.find("./Connect/Stream") is not None


async def query(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


# --- migrate, dry run, idempotence, rollback ----------------------------------------------------


async def test_migrate_answers_on_the_shim_and_rollback_restores_the_recorded_settings(tmp_path, db_dsn):
    async with stack(tmp_path, db_dsn) as s:
        original = vapi_number(s.twilio)
        public = s.run.config.public_url

        dry = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo", "--dry-run")
        assert dry.code == 0, dry.err
        assert "dry run, nothing changed" in dry.out
        assert f"VoiceUrl              {VAPI_INBOUND_URL} -> {public}/twilio/voice" in dry.out
        assert not s.twilio.updates()
        assert await query(s.dsn, "SELECT * FROM numbers") == [] and await query(s.dsn, "SELECT * FROM number_changes") == []

        migrated = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo", "--actor", "alice")
        assert migrated.code == 0, migrated.err
        now = s.twilio.number(SHIM_NUMBER)
        assert voice_settings(now) == {
            "voice_url": f"{public}/twilio/voice", "voice_method": "POST",
            "voice_fallback_url": VAPI_INBOUND_URL, "voice_fallback_method": "POST",
            "status_callback": f"{public}/twilio/status", "status_callback_method": "POST",
        }
        row = (await query(s.dsn, "SELECT assistant_id, split_percent, previous_settings, migrated_at FROM numbers"))[0]
        assert row["assistant_id"] == "demo" and row["split_percent"] == 100 and row["migrated_at"] is not None
        assert orjson.loads(row["previous_settings"]) == {
            "VoiceUrl": VAPI_INBOUND_URL, "VoiceMethod": "POST", "VoiceFallbackUrl": None,
            "VoiceFallbackMethod": "POST", "StatusCallback": VAPI_STATUS, "StatusCallbackMethod": "POST",
        }
        twiml = await s.ring()
        stream = twiml.find("./Connect/Stream")
        assert stream is not None and {p.get("name"): p.get("value") for p in stream}["assistant"] == "demo"

        again = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo")
        assert again.code == 0 and "nothing changed" in again.out
        assert len(s.twilio.updates()) == 1

        back = await s.cli("rollback", SHIM_NUMBER)
        assert back.code == 0, back.err
        restored = s.twilio.number(SHIM_NUMBER)
        recorded = orjson.loads(row["previous_settings"])
        assert restored["voice_url"] == recorded["VoiceUrl"] == original["voice_url"]
        assert restored["status_callback"] == recorded["StatusCallback"] == original["status_callback"]
        assert (restored["voice_method"], restored["voice_fallback_method"], restored["status_callback_method"]) == ("POST", "POST", "POST")
        assert restored["voice_fallback_url"] in ("", None)  # recorded as null; Twilio clears a URL sent empty
        assert s.twilio.updates()[-1].form == {
            "VoiceUrl": VAPI_INBOUND_URL, "VoiceMethod": "POST", "VoiceFallbackUrl": "",
            "VoiceFallbackMethod": "POST", "StatusCallback": VAPI_STATUS, "StatusCallbackMethod": "POST",
        }
        row = (await query(s.dsn, "SELECT previous_settings, migrated_at, split_percent FROM numbers"))[0]
        assert row["previous_settings"] is None and row["migrated_at"] is None

        twice = await s.cli("rollback", SHIM_NUMBER)
        assert twice.code == 2 and "never migrated" in twice.err

        history = await s.cli("history", SHIM_NUMBER, "--json")
        assert history.code == 0
        changes = history.lines()
        assert [(c["action"], c["outcome"]) for c in changes] == [("migrate", "ok"), ("rollback", "ok")]
        assert changes[0]["actor"] == "alice" and changes[1]["actor"]
        assert changes[0]["before"]["VoiceUrl"] == VAPI_INBOUND_URL and changes[0]["after"]["VoiceUrl"] == f"{public}/twilio/voice"
        assert changes[1]["after"]["StatusCallback"] == VAPI_STATUS
        table = await s.cli("history", SHIM_NUMBER)
        assert table.out.splitlines()[0].split() == ["AT", "ACTION", "ACTOR", "OUTCOME", "CHANGE"]
        assert "VoiceUrl " + VAPI_INBOUND_URL + " -> " + f"{public}/twilio/voice" in table.out

        # Every one of the six settings set, methods mixed: all come back exactly as they were.
        sid = s.twilio.add_number(
            "+15550003333", voice_url="https://ivr.example.com/answer", voice_method="GET",
            voice_fallback_url="https://ivr.example.com/sorry", voice_fallback_method="GET",
            status_callback="https://ivr.example.com/status", status_callback_method="GET",
        )
        before = voice_settings(s.twilio.phone_numbers[sid])
        assert (await s.cli("migrate", "+15550003333", "--assistant", "demo")).code == 0
        assert s.twilio.phone_numbers[sid]["voice_fallback_url"] == "https://ivr.example.com/answer"
        assert s.twilio.phone_numbers[sid]["voice_fallback_method"] == "GET"
        assert (await s.cli("rollback", "+15550003333")).code == 0
        assert voice_settings(s.twilio.phone_numbers[sid]) == before


# --- split ----------------------------------------------------------------------------------------


async def test_split_sends_a_sticky_share_of_callers_back_to_vapi(tmp_path, db_dsn):
    async with stack(tmp_path, db_dsn) as s:
        vapi_number(s.twilio)
        assert (await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo")).code == 0
        # A caller the 30% split keeps off the shim, to time how fast the change goes live.
        probe = next(f"+1212555{n:04d}" for n in range(10_000) if split_bucket(SHIM_NUMBER, f"+1212555{n:04d}") >= 30)
        assert streams_to_shim(await s.ring(from_=probe))

        split = await s.cli("split", SHIM_NUMBER, "--percent", "30")
        assert split.code == 0, split.err
        issued = time.monotonic()
        while streams_to_shim(await s.ring(from_=probe)):
            assert time.monotonic() - issued < 5, "the split was not live within 5 s"
            await asyncio.sleep(0.05)

        callers = [f"+1415{n:07d}" for n in range(200)]
        sides = {}
        for caller in callers:
            twiml = await s.ring(from_=caller)
            if streams_to_shim(twiml):
                sides[caller] = "shim"
            else:
                redirect = twiml.find("./Redirect")
                assert redirect is not None and redirect.get("method") == "POST" and redirect.text == VAPI_INBOUND_URL
                assert len(twiml) == 1  # nothing answers the call before Vapi gets it
                sides[caller] = "vapi-redirect"
        on_shim = sum(1 for side in sides.values() if side == "shim")
        assert 40 <= on_shim <= 80, on_shim  # 30% of 200 is 60; sd ~6.5
        for caller in callers[:50]:  # the same person reaches the same stack again
            assert ("shim" if streams_to_shim(await s.ring(from_=caller)) else "vapi-redirect") == sides[caller]

        await s.run.drain()
        counts = dict(await query(s.dsn, "SELECT stack, count(*) FROM calls WHERE to_number = $1 AND from_number LIKE '+1415%' GROUP BY stack", SHIM_NUMBER))
        assert counts == {"shim": on_shim + sum(1 for c in callers[:50] if sides[c] == "shim"),
                          "vapi-redirect": 250 - counts.get("shim", 0)}

        # A second instance, started after the split, applies it too (the state is in Postgres),
        # and both follow the next changes within 5 s.
        async with running_shim(tmp_path / "second", s.dsn, Script(), default_assistant="") as second:
            other = Stack(s.twilio, second, s.dsn, tmp_path / "second")
            assert not streams_to_shim(await other.ring(from_=probe))
            for percent, expect in (("0", False), ("100", True)):
                assert (await s.cli("split", SHIM_NUMBER, "--percent", percent)).code == 0
                issued = time.monotonic()
                for instance in (s, other):
                    while [streams_to_shim(await instance.ring(from_=c)) for c in callers[:20]] != [expect] * 20:
                        assert time.monotonic() - issued < 5, f"--percent {percent} not live on every instance within 5 s"
                        await asyncio.sleep(0.05)
        history = (await s.cli("history", SHIM_NUMBER, "--json")).lines()
        assert [(c["action"], c["before"], c["after"]) for c in history if c["action"] == "split"] == [
            ("split", {"split_percent": 100}, {"split_percent": 30}),
            ("split", {"split_percent": 30}, {"split_percent": 0}),
            ("split", {"split_percent": 0}, {"split_percent": 100}),
        ]
        assert not any(r.method == "POST" for r in s.twilio.updates()[1:])  # a split never touches Twilio


# --- Postgres away ----------------------------------------------------------------------------------


async def test_routing_survives_postgres_being_down_and_a_restart_during_the_outage(tmp_path, db_dsn):
    proxy = PgProxy.from_dsn(db_dsn)
    await proxy.start()
    data_dir = tmp_path / "data"
    try:
        async with stack(tmp_path, db_dsn, server_dsn=proxy.dsn_for(db_dsn), data_dir=data_dir) as s:
            vapi_number(s.twilio)
            vapi_number(s.twilio, "+15550003333")
            assert (await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo")).code == 0
            assert (await s.cli("set", "+15550004444", "--assistant", "demo")).code == 0
            assert (await s.cli("migrate", "+15550003333", "--assistant", "demo")).code == 0
            assert (await s.cli("split", "+15550003333", "--percent", "0")).code == 0
            await asyncio.sleep(0.5)  # NOTIFY has reached the server's listener
            await proxy.pause()
            assert streams_to_shim(await s.ring())
            assert streams_to_shim(await s.ring(to="+15550004444"))
            assert (await s.ring(to="+15550003333")).find("./Redirect").text == VAPI_INBOUND_URL
            unknown = await s.ring(to="+15559999999")
            assert unknown.find("./Say") is not None  # a number nobody configured is still "not in service"
            await proxy.resume()  # (so the server's writer drains at once when it stops)

        await proxy.pause()

        # A restart while Postgres is still away starts from the snapshot of the table.
        async with stack(tmp_path, db_dsn, server_dsn=proxy.dsn_for(db_dsn), data_dir=data_dir) as s:
            assert streams_to_shim(await s.ring())
            assert streams_to_shim(await s.ring(to="+15550004444"))
            await proxy.resume()

        # An instance that never ran before the outage knows the numbers the CLI set on its host.
        set_only = tmp_path / "set-only"
        assert (await s.cli("set", "+15550005555", "--assistant", "demo", SHIM_DATA_DIR=str(set_only))).code == 0
        await proxy.pause()
        async with stack(tmp_path, db_dsn, server_dsn=proxy.dsn_for(db_dsn), data_dir=set_only) as s:
            assert streams_to_shim(await s.ring(to="+15550005555"))
            await proxy.resume()

        await proxy.pause()
        # Without even a snapshot, a number's calls go to its fallback URL (Vapi), never "not in service".
        async with stack(tmp_path, db_dsn, server_dsn=proxy.dsn_for(db_dsn), data_dir=tmp_path / "fresh") as s:
            response = await s.run.voice_webhook(f"CA{uuid.uuid4().hex}", to=SHIM_NUMBER)
            assert response.status_code == 503
    finally:
        await proxy.resume()
        await proxy.stop()


# --- errors -------------------------------------------------------------------------------------------


async def test_errors_name_the_problem_use_the_documented_exit_codes_and_change_nothing(tmp_path, db_dsn):
    async with stack(tmp_path, db_dsn) as s:
        original = vapi_number(s.twilio)

        bad = await s.cli("migrate", "555-0100", "--assistant", "demo")
        assert bad.code == 2 and "expected E.164" in bad.err
        unknown = await s.cli("migrate", SHIM_NUMBER, "--assistant", "nobody")
        assert unknown.code == 2 and "nobody" in unknown.err and "nobody.json" in unknown.err
        assert not s.twilio.requests  # checks fail before Twilio is asked anything

        down = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo", PUBLIC_URL=f"http://127.0.0.1:{free_port()}")
        assert down.code == 2 and "/healthz" in down.err
        assert not s.twilio.updates()

        absent = await s.cli("migrate", "+15550009999", "--assistant", "demo")
        assert absent.code == 2 and "+15550009999 is not a phone number of Twilio account" in absent.err

        refused = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo", TWILIO_AUTH_TOKEN="wrong")
        assert refused.code == 1 and "HTTP 401" in refused.err and "TWILIO_AUTH_TOKEN" in refused.err
        assert "wrong" not in refused.err + refused.out

        unreachable = await s.cli("list", TWILIO_API_BASE=f"http://127.0.0.1:{free_port()}")
        assert unreachable.code == 1 and "could not reach Twilio" in unreachable.err

        s.twilio.update_faults.append((400, 21502, "Invalid VoiceUrl"))
        rejected = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo")
        assert rejected.code == 1 and "Twilio error 21502" in rejected.err and "Invalid VoiceUrl" in rejected.err
        assert "Twilio is unchanged" in rejected.err
        assert voice_settings(s.twilio.number(SHIM_NUMBER)) == voice_settings(original)
        assert await query(s.dsn, "SELECT * FROM numbers") == []  # not left half-migrated
        audit = await query(s.dsn, "SELECT action, outcome, error FROM number_changes")
        assert [(a["action"], a["outcome"]) for a in audit] == [("migrate", "failed")] and "21502" in audit[0]["error"]

        assert (await s.cli("rollback", SHIM_NUMBER)).code == 2
        not_migrated = await s.cli("split", SHIM_NUMBER, "--percent", "10")
        assert not_migrated.code == 2 and "not migrated" in not_migrated.err
        assert (await s.cli("split", SHIM_NUMBER, "--percent", "110")).code == 2
        assert (await s.cli("list", TWILIO_ACCOUNT_SID="")).code == 2
        assert voice_settings(s.twilio.number(SHIM_NUMBER)) == voice_settings(original)


async def test_a_failure_after_the_twilio_update_leaves_the_audit_row_saying_so(tmp_path, db_dsn):
    async with stack(tmp_path, db_dsn) as s:
        original = vapi_number(s.twilio)
        s.twilio.fail_after_update.append((500, 20500, "Internal Server Error"))
        result = await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo")
        assert result.code == 1 and "unknown whether Twilio applied" in result.err
        assert s.twilio.number(SHIM_NUMBER)["voice_url"].endswith("/twilio/voice")  # it was applied
        audit = (await query(s.dsn, "SELECT outcome, error FROM number_changes"))[0]
        assert audit["outcome"] == "pending" and "unknown whether Twilio applied it" in audit["error"]
        # What was recorded before the update is what brings the number back.
        assert (await s.cli("rollback", SHIM_NUMBER)).code == 0
        assert voice_settings(s.twilio.number(SHIM_NUMBER))["voice_url"] == original["voice_url"]
        assert voice_settings(s.twilio.number(SHIM_NUMBER))["status_callback"] == original["status_callback"]


# --- list ---------------------------------------------------------------------------------------------


async def test_list_pages_through_the_account_and_says_where_each_number_points(tmp_path, db_dsn):
    async with stack(tmp_path, db_dsn) as s:
        vapi_number(s.twilio)
        for n in range(205):  # more than one page of 200
            s.twilio.add_number(f"+1650555{n:04d}")
        s.twilio.add_number("+15550007777", voice_url="https://handler.twilio.com/twiml/EH0")
        assert (await s.cli("migrate", SHIM_NUMBER, "--assistant", "demo")).code == 0
        assert (await s.cli("split", SHIM_NUMBER, "--percent", "10")).code == 0
        assert (await s.cli("set", "+15550008888", "--assistant", "demo")).code == 0
        s.twilio.faults.append((429, 20429, "Too Many Requests"))  # retried

        listed = await s.cli("list", "--json")
        assert listed.code == 0, listed.err
        rows = {r["number"]: r for r in listed.lines()}
        pages = [r for r in s.twilio.requests if r.path.split("?")[0].endswith("/IncomingPhoneNumbers.json")]
        assert any("PageToken=" in r.path for r in pages)
        assert len(rows) == 205 + 2 + 1  # the account's, and one routed only locally
        assert rows[SHIM_NUMBER] | {"sid": None} == {
            "number": SHIM_NUMBER, "sid": None, "friendly_name": "(555) 000-2222", "points_to": "shim",
            "voice_url": s.run.config.public_url + "/twilio/voice", "assistant_id": "demo", "split_percent": 10,
            "migrated": True, "on_account": True,
        }
        assert rows["+16505550204"]["points_to"] == "vapi" and rows["+16505550204"]["assistant_id"] is None
        assert rows["+15550007777"]["points_to"] == "other"
        assert rows["+15550008888"]["on_account"] is False and rows["+15550008888"]["assistant_id"] == "demo"
        set_history = (await s.cli("history", "+15550008888", "--json")).lines()
        assert [(c["action"], c["before"], c["after"]) for c in set_history] == [
            ("set", None, {"assistant_id": "demo", "server_url": None})]
        # --fallback-number: checked before anything changes, kept when omitted, cleared with 'none'
        bad = await s.cli("set", "+15550008888", "--assistant", "demo", "--fallback-number", "555-1234")
        assert bad.code == 2 and "--fallback-number" in bad.err and "E.164" in bad.err
        assert (await s.cli("set", "+15550008888", "--assistant", "demo", "--fallback-number", "+15557654321")).code == 0
        assert (await s.cli("set", "+15550008888", "--assistant", "demo")).code == 0
        conn = await asyncpg.connect(db_dsn)
        try:
            kept = await conn.fetchval("SELECT fallback_destination FROM numbers WHERE number = '+15550008888'")
            assert orjson.loads(kept) == {"type": "number", "number": "+15557654321"}
            assert (await s.cli("set", "+15550008888", "--assistant", "demo", "--fallback-number", "none")).code == 0
            assert await conn.fetchval("SELECT fallback_destination FROM numbers WHERE number = '+15550008888'") is None
        finally:
            await conn.close()

        table = await s.cli("list")
        header, rule, *lines = table.out.splitlines()
        assert header.split() == ["NUMBER", "POINTS", "TO", "ASSISTANT", "SPLIT", "VOICE", "URL", "NAME"]
        mine = next(line for line in lines if line.startswith(SHIM_NUMBER))
        assert mine.split()[1:4] == ["shim", "demo", "10%"]
        assert header.index("ASSISTANT") == mine.index("demo")  # aligned


# --- the stand-in answers in Twilio's shapes -------------------------------------------------------------


async def test_the_stand_in_answers_in_twilios_shapes(tmp_path):
    from twilio.rest import Client

    async with FakeTwilioApi(ACCOUNT, AUTH_TOKEN) as twilio:
        sid = twilio.add_number(SHIM_NUMBER)
        client = Client(ACCOUNT, AUTH_TOKEN, environment={})
        client.api.base_url = twilio.url
        numbers = client.api.v2010.accounts(ACCOUNT).incoming_phone_numbers
        page = await asyncio.to_thread(numbers.page, phone_number="+1555000")
        assert isinstance(page, IncomingPhoneNumberPage) and [n.sid for n in page] == [sid]
        raw = twilio.phone_numbers[sid]
        instance = IncomingPhoneNumberInstance(client.api.v2010, raw, ACCOUNT)
        # Every field twilio-python reads is sent; the one it skips is a link list the API also sends.
        read = {k for k in vars(instance) if not k.startswith("_")}
        assert read <= set(raw) and set(raw) - read == {"subresource_uris"}
        list_keys = {"end", "first_page_uri", "incoming_phone_numbers", "next_page_uri", "page", "page_size",
                     "previous_page_uri", "start", "uri"}
        import httpx

        async with httpx.AsyncClient(auth=(ACCOUNT, AUTH_TOKEN)) as http:
            body = (await http.get(f"{twilio.url}/2010-04-01/Accounts/{ACCOUNT}/IncomingPhoneNumbers.json")).json()
            missing = await http.get(f"{twilio.url}/2010-04-01/Accounts/{ACCOUNT}/IncomingPhoneNumbers/PN{'0' * 32}.json")
            unauthorized = await http.get(f"{twilio.url}/2010-04-01/Accounts/{ACCOUNT}/IncomingPhoneNumbers.json", auth=(ACCOUNT, "x"))
        assert set(body) == list_keys
        assert missing.status_code == 404 and set(missing.json()) == {"code", "message", "more_info", "status"}
        assert missing.json()["code"] == 20404 and unauthorized.json()["code"] == 20003


async def test_instances_follow_the_table_without_notifications_too(tmp_path, db_dsn):
    async with stack(tmp_path, db_dsn) as s:
        conn = await asyncpg.connect(db_dsn)
        try:
            await conn.execute(
                "INSERT INTO numbers (number, assistant_id, split_percent, previous_settings) VALUES ($1, 'demo', 0, $2::jsonb)",
                SHIM_NUMBER, orjson.dumps({"VoiceUrl": VAPI_INBOUND_URL, "VoiceMethod": "POST"}).decode())
            assert not streams_to_shim(await s.ring())
            await conn.execute("ALTER TABLE numbers DISABLE TRIGGER numbers_changed")  # no NOTIFY: the poll alone
            await conn.execute("UPDATE numbers SET split_percent = 100, updated_at = now()")
            changed = time.monotonic()
            while not streams_to_shim(await s.ring()):
                assert time.monotonic() - changed < 5, "not picked up by the periodic check within 5 s"
                await asyncio.sleep(0.1)
        finally:
            await conn.close()


async def test_credentials_in_a_voice_url_are_restored_but_never_shown_or_audited(tmp_path, db_dsn):
    """Twilio takes HTTP Basic credentials in webhook URLs: rollback must restore them exactly,
    and no output, audit row or log line may show the password."""
    secret_url = "https://ivr:s3cret-pw@ivr.example.com/answer"
    async with stack(tmp_path, db_dsn) as s:
        sid = s.twilio.add_number("+15550003333", voice_url=secret_url, status_callback="https://ivr:s3cret-pw@ivr.example.com/status")
        before = voice_settings(s.twilio.phone_numbers[sid])
        results = [
            await s.cli("migrate", "+15550003333", "--assistant", "demo", "--dry-run"),
            await s.cli("migrate", "+15550003333", "--assistant", "demo"),
            await s.cli("list"), await s.cli("list", "--json"),
            await s.cli("split", "+15550003333", "--percent", "0"),
        ]
        twiml = await s.ring(to="+15550003333")
        assert twiml.find("./Redirect").text == secret_url  # Twilio itself gets the credentials it needs
        results += [await s.cli("rollback", "+15550003333"), await s.cli("history", "+15550003333"),
                    await s.cli("history", "+15550003333", "--json")]
        assert all(r.code == 0 for r in results), [r.err for r in results]
        assert voice_settings(s.twilio.phone_numbers[sid]) == before  # restored exactly, password included
        shown = "".join(r.out + r.err for r in results)
        assert "ivr:***@ivr.example.com/answer" in shown and "s3cret-pw" not in shown
        audit = await query(s.dsn, "SELECT before::text || after::text AS both FROM number_changes")
        assert audit and not any("s3cret-pw" in a["both"] for a in audit)


async def test_a_reader_that_leaves_early_is_not_an_error(tmp_path, db_dsn):
    """`shim numbers history N --json | head -1`: the rest of the output has nowhere to go."""
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.executemany("INSERT INTO number_changes (number, action, before, after, actor) VALUES ($1, 'split', '{}', '{}', 'x')",
                               [(SHIM_NUMBER,)] * 50)
    finally:
        await conn.close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "DATABASE_URL"))}
    env.update(DATABASE_URL=db_dsn, SHIM_DATA_DIR=str(tmp_path / "data"), SHIM_LOG_LEVEL="warning")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shim.cli", "numbers", "history", SHIM_NUMBER, "--json", env=env, cwd=REPO,
            stdout=write_end, stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
