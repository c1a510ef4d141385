"""`shim calls`, `shim transcript`, `shim recording`, `shim db url|psql`: output on stdout, messages
on stderr, exit codes 0 / 1 (runtime failure) / 2 (usage), against the real Postgres and the
Twilio REST stand-in."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import structlog

from shim.cli import main
from shim.testing.fake_twilio_api import FakeTwilioApi
from tests.calls_seed import ACCOUNT, seed

TOKEN = "twilio-auth-token-for-tests"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch, db_dsn, tmp_path):
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_BASE", "SHIM_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    monkeypatch.setenv("SHIM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHIM_LOG_FORMAT", "json")
    return monkeypatch


async def shim(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a worker thread (it runs its own event loop), like `shim ARGV…`."""
    capsys.readouterr()  # drop what the test's own setup printed
    handlers = list(logging.getLogger().handlers)
    try:
        code = await asyncio.to_thread(main, list(argv))
    finally:  # the CLI configures logging for its process: leave the test process as it was
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = handlers
    out, err = capsys.readouterr()
    return code, out, err


async def test_calls_table(env, db_dsn, tmp_path, capsys):
    s = await seed(db_dsn, tmp_path)
    code, out, err = await shim(capsys, "calls")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["when", "(UTC)"] and "p50 latency" in lines[0] and "tools ok/failed" in lines[0]
    assert [line.split()[2] for line in lines[2:]] == [s.failed, s.xss, s.dental, s.old]
    dental = next(line for line in lines if s.dental in line)
    assert "+15550001111" in dental and "dental" in dental and "1m23s" in dental and "420 ms" in dental and "1/1" in dental


async def test_calls_json_lines_and_filters(env, db_dsn, tmp_path, capsys):
    s = await seed(db_dsn, tmp_path)
    code, out, err = await shim(capsys, "calls", "--json", "--assistant", "luna", "--since", "2026-11-30")
    assert code == 0 and err == ""
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert [r["call_sid"] for r in rows] == [s.failed]
    assert rows[0]["ended_reason"] == "pipeline-error-openai-llm-failed" and rows[0]["has_recording"] is False
    assert "custom_parameters" not in rows[0]
    code, out, _ = await shim(capsys, "calls", "--json", "--ended-reason", "customer-ended-call", "--number", "+15550002222")
    assert [orjson.loads(line)["call_sid"] for line in out.splitlines()] == [s.xss]


async def test_calls_with_no_match_prints_nothing_on_stdout(env, db_dsn, tmp_path, capsys):
    await seed(db_dsn, tmp_path)
    code, out, err = await shim(capsys, "calls", "--number", "+19990000000")
    assert (code, out) == (0, "") and "no calls match" in err


@pytest.mark.parametrize("argv, message", [
    (("calls", "--since", "yesterday"), "--since 'yesterday'"),
    (("calls", "--limit", "0"), "--limit 0"),
])
async def test_calls_usage_errors_exit_2(env, capsys, argv, message):
    code, out, err = await shim(capsys, *argv)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


async def test_transcript_text_and_json(env, db_dsn, tmp_path, capsys):
    s = await seed(db_dsn, tmp_path)
    code, out, err = await shim(capsys, "transcript", s.dental)
    assert code == 0 and err == ""
    assert out.index("Hi, thanks for calling") < out.index("What are your hours") < out.index("check_availability(")
    assert "interrupted: heard 1700 ms of 5200 ms" in out and "ok in 312 ms" in out and "timeout after 20000 ms" in out
    code, out, err = await shim(capsys, "transcript", s.dental, "--json")
    body = orjson.loads(out)
    assert code == 0 and body["call"]["call_sid"] == s.dental
    assert [e["role"] for e in body["timeline"] if e["type"] == "utterance"] == ["assistant", "user", "assistant", "user", "assistant", "assistant"]
    assert "secret-stream-token" not in out


async def test_transcript_of_an_unknown_call_is_a_usage_error(env, db_dsn, tmp_path, capsys):
    await seed(db_dsn, tmp_path)
    code, out, err = await shim(capsys, "transcript", "CA" + "9" * 32)
    assert code == 2 and out == "" and "no call 'CA999" in err


async def test_database_unreachable_is_a_runtime_failure(env, capsys):
    env.setenv("DATABASE_URL", "postgresql://shim:hunter2@127.0.0.1:1/shim")
    code, out, err = await shim(capsys, "calls")
    assert code == 1 and out == "" and "database postgresql://shim:***@127.0.0.1:1/shim" in err
    assert "hunter2" not in err


@pytest.mark.parametrize("url", ["postgresql://shim:hunter2@[db/shim", "postgresql://shim:hunter2@db:port/shim",
                                 "mysql://shim:hunter2@db/shim"])
@pytest.mark.parametrize("argv", [("calls",), ("numbers", "history", "+15550002222")])
async def test_a_malformed_database_url_is_a_usage_error_not_a_traceback(env, capsys, url, argv):
    env.setenv("DATABASE_URL", url)
    code, out, err = await shim(capsys, *argv)
    assert code == 2 and "DATABASE_URL" in err and "expected postgresql://user:password@host" in err
    assert "Traceback" not in err and "hunter2" not in err + out
    assert out == ""


# --- recordings -----------------------------------------------------------------------------


@pytest.fixture
async def twilio(env):
    async with FakeTwilioApi(ACCOUNT, TOKEN) as api:
        env.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
        env.setenv("TWILIO_AUTH_TOKEN", TOKEN)
        env.setenv("TWILIO_API_BASE", api.url)
        yield api


async def test_recording_downloads_the_wav_with_the_account_credentials(twilio, db_dsn, tmp_path, capsys):
    sid = twilio.add_recording("CA" + "1" * 32, seconds=0.5)
    s = await seed(db_dsn, tmp_path, recording_sid=sid, api_base="https://stale.example.com")
    target = tmp_path / "call.wav"
    code, out, err = await shim(capsys, "recording", s.dental, "-o", str(target))
    assert code == 0 and out == "" and str(target) in err
    assert target.read_bytes() == twilio.media(sid, "wav")
    # the URL is rebuilt on TWILIO_API_BASE: the stored host never gets the credentials
    assert twilio.of(f"/Accounts/{ACCOUNT}/Recordings/{sid}.wav")
    code, _, _ = await shim(capsys, "recording", s.dental, "-o", str(tmp_path / "call.mp3"))
    assert code == 0 and (tmp_path / "call.mp3").read_bytes() == twilio.media(sid, "mp3")


@pytest.mark.parametrize("case, code, message", [
    ("unknown call", 2, "no call 'CA9999"),
    ("no recording", 2, "has no recording"),
    ("wrong token", 1, "Twilio refused TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN"),
    ("not on twilio", 1, "HTTP 404): it may still be processing"),
    ("no credentials", 2, "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set"),
    ("twilio fails", 1, "Twilio answered HTTP 500"),
])
async def test_recording_errors_are_clear(twilio, env, db_dsn, tmp_path, capsys, case, code, message):
    sid = twilio.add_recording("CA" + "1" * 32)
    s = await seed(db_dsn, tmp_path, recording_sid=sid if case != "not on twilio" else "RE" + "c" * 32)
    call = {"unknown call": "CA" + "9" * 32, "no recording": s.failed}.get(case, s.dental)
    if case == "wrong token":
        env.setenv("TWILIO_AUTH_TOKEN", "not-the-token")
    if case == "no credentials":
        env.delenv("TWILIO_AUTH_TOKEN")
    if case == "twilio fails":
        twilio.fail_status = 500
    target = tmp_path / "out" / "call.wav"
    target.parent.mkdir()
    got, out, err = await shim(capsys, "recording", call, "-o", str(target))
    assert (got, out) == (code, "") and message in err and "Traceback" not in err
    assert list(target.parent.iterdir()) == []  # no partial file
    assert "not-the-token" not in err and TOKEN not in err


async def test_recording_to_a_missing_directory_is_a_usage_error(twilio, db_dsn, tmp_path, capsys):
    s = await seed(db_dsn, tmp_path)
    code, out, err = await shim(capsys, "recording", s.dental, "-o", str(tmp_path / "nope" / "x.wav"))
    assert code == 2 and "does not exist" in err and not twilio.requests


# --- db url / psql --------------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=60, **kw)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "SHIM_", "DATABASE_URL"))}
    return env | extra


async def test_db_url_redacts_the_password_unless_asked(env, capsys):
    env.setenv("DATABASE_URL", "postgresql://shim:p%40ss@db.internal:5432/shim?sslmode=require")
    code, out, err = await shim(capsys, "db", "url")
    assert code == 0 and out == "postgresql://shim:***@db.internal:5432/shim?sslmode=require\n" and err == ""
    code, out, err = await shim(capsys, "db", "url", "--show-password")
    assert code == 0 and out == "postgresql://shim:p%40ss@db.internal:5432/shim?sslmode=require\n"


def test_db_url_of_the_embedded_server(pg_server):
    if pg_server.embedded is None:
        pytest.skip("tests run on DATABASE_URL, not the embedded server")
    # Another process attaches to the running server (as `shim serve` would have started it).
    result = _cli(["db", "url"], _clean_env(SHIM_DATA_DIR=str(pg_server.embedded.pgdata.parent)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pg_server.embedded.dsn and result.stderr == ""


def test_db_psql_passes_the_password_outside_argv(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "psql"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "PGPASSWORD: $PGPASSWORD"\nexit 3\n')
    fake.chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", DATABASE_URL="postgresql://shim:p%40ss@db.internal/shim")
    result = _cli(["db", "psql"], env)
    assert result.returncode == 3  # psql's own exit code (the process became psql)
    assert result.stdout.splitlines() == ["argv: postgresql://shim@db.internal/shim", "PGPASSWORD: p@ss"]


def test_db_psql_without_psql_says_how_to_get_it(tmp_path):
    env = _clean_env(PATH=str(tmp_path), DATABASE_URL="postgresql://shim@db.internal/shim")
    result = _cli(["db", "psql"], env)
    assert result.returncode == 1 and result.stdout == ""
    assert "psql is not on PATH" in result.stderr and "postgresql-client" in result.stderr


@pytest.mark.skipif(shutil.which("psql") is None, reason="no psql on this machine")
async def test_db_psql_opens_the_database(db_dsn, tmp_path):
    s = await seed(db_dsn, tmp_path)
    result = await asyncio.to_thread(_cli, ["db", "psql"], _clean_env(DATABASE_URL=db_dsn),
                                     input="SELECT call_sid FROM calls WHERE ended_reason LIKE 'pipeline%';\n")
    assert result.returncode == 0, result.stderr
    assert s.failed in result.stdout


async def test_stdout_is_data_only_in_a_real_process(db_dsn, tmp_path):
    """The installed entry point, logs at debug: stdout still parses as JSON lines."""
    s = await seed(db_dsn, tmp_path)
    env = _clean_env(DATABASE_URL=db_dsn, SHIM_LOG_LEVEL="debug")
    result = await asyncio.to_thread(_cli, ["calls", "--json", "--number", "+15550002222"], env)
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(line)["call_sid"] for line in result.stdout.splitlines()] == [s.xss]
