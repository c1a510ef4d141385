"""Service configuration, read once from the environment (every variable is in the README)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def _ws_form(http_url: str, path: str) -> str:
    """The ws(s):// form of an http(s):// base URL, with `path` appended."""
    parts = urlsplit(http_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None:
        raise ConfigError(f"PUBLIC_URL={http_url!r}: expected an http:// or https:// URL")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def _float(raw: str, name: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None


def _voice_map(raw: str) -> tuple[tuple[str, str], ...]:
    """SHIM_VOICE_MAP: a JSON object {"<Vapi voiceId>": "<Realtime voice>", ...}."""
    if not raw:
        return ()
    from .translate import REALTIME_VOICES

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"SHIM_VOICE_MAP: expected a JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"SHIM_VOICE_MAP={raw[:80]!r}: expected a JSON object")
    for key, value in data.items():
        if value not in REALTIME_VOICES:
            raise ConfigError(f"SHIM_VOICE_MAP[{key!r}]={value!r}: expected one of {', '.join(REALTIME_VOICES)}")
    return tuple((str(k), str(v)) for k, v in data.items())


def _allow_list(raw: str) -> str:
    from tools.egress import parse_allow_list

    try:
        parse_allow_list(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return raw


@dataclass(frozen=True)
class Config:
    openai_api_key: str = ""
    openai_realtime_url: str = "wss://api.openai.com/v1/realtime"
    openai_realtime_model: str = "gpt-realtime-2.1"
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    public_url: str = "http://127.0.0.1:8080"
    # Where Twilio opens the media stream. Unset: the wss:// form of PUBLIC_URL, served by the
    # HTTP port (single-URL deployments). Set it to the fast picows media listener in production.
    public_media_url: str = ""
    media_port: int | None = None
    database_url: str = ""
    data_dir: Path = Path("./.shim")
    assistants_dir: Path = Path("./assistants")
    default_assistant: str = ""
    log_format: str = "json"  # "json" in production, "console" for humans
    log_level: str = "info"
    model_connect_timeout_s: float = 10.0
    writer_max_memory_rows: int = 50_000
    drain_timeout_s: float = 25.0
    transcription_model: str = "gpt-4o-mini-transcribe"
    voice_map: tuple[tuple[str, str], ...] = ()  # Vapi voiceId -> Realtime voice overrides
    twilio_api_base: str = "https://api.twilio.com"
    openai_base_url: str = "https://api.openai.com/v1"  # post-call analysis (chat completions)
    analysis_model: str = "gpt-4.1-mini"
    secrets_file: str = ""  # SHIM_SECRETS_FILE: X-Vapi-Secret / headers per assistant and tool
    tool_url_allow: str = ""  # SHIM_TOOL_URL_ALLOW: where customer URLs may point (tools/egress.py)

    @property
    def public_base(self) -> str:
        return self.public_url.rstrip("/")

    def http_url(self, path: str) -> str:
        """An externally visible https URL for `path`, built from PUBLIC_URL, never from a request."""
        return self.public_base + path

    @property
    def media_stream_url(self) -> str:
        """The exact <Stream url> Twilio dials, and the URL its upgrade signature covers."""
        if self.public_media_url:
            return self.public_media_url
        return _ws_form(self.public_url, "/twilio/media")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        public_url = get("PUBLIC_URL", cls.public_url)
        _ws_form(public_url, "")  # validates the scheme early, naming the variable
        media_port_raw = get("SHIM_MEDIA_PORT")
        try:
            media_port = int(media_port_raw) if media_port_raw else None
        except ValueError:
            raise ConfigError(f"SHIM_MEDIA_PORT={media_port_raw!r}: expected a port number") from None
        public_media_url = get("PUBLIC_MEDIA_URL")
        if public_media_url and urlsplit(public_media_url).scheme not in ("ws", "wss"):
            raise ConfigError(f"PUBLIC_MEDIA_URL={public_media_url!r}: expected a ws:// or wss:// URL")
        return cls(
            openai_api_key=get("OPENAI_API_KEY"),
            openai_realtime_url=get("OPENAI_REALTIME_URL", cls.openai_realtime_url),
            openai_realtime_model=get("OPENAI_REALTIME_MODEL", cls.openai_realtime_model),
            twilio_account_sid=get("TWILIO_ACCOUNT_SID"),
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            public_url=public_url,
            public_media_url=public_media_url,
            media_port=media_port,
            database_url=get("DATABASE_URL"),
            data_dir=Path(get("SHIM_DATA_DIR", "./.shim")),
            assistants_dir=Path(get("SHIM_ASSISTANTS_DIR", "./assistants")),
            default_assistant=get("SHIM_DEFAULT_ASSISTANT"),
            log_format=get("SHIM_LOG_FORMAT", "json"),
            log_level=get("SHIM_LOG_LEVEL", "info"),
            drain_timeout_s=_float(get("SHIM_DRAIN_TIMEOUT", "25"), "SHIM_DRAIN_TIMEOUT"),
            transcription_model=get("SHIM_TRANSCRIPTION_MODEL", cls.transcription_model),
            voice_map=_voice_map(get("SHIM_VOICE_MAP")),
            twilio_api_base=get("TWILIO_API_BASE", cls.twilio_api_base).rstrip("/"),
            openai_base_url=get("OPENAI_BASE_URL", cls.openai_base_url).rstrip("/"),
            analysis_model=get("SHIM_ANALYSIS_MODEL", cls.analysis_model),
            secrets_file=get("SHIM_SECRETS_FILE"),
            tool_url_allow=_allow_list(get("SHIM_TOOL_URL_ALLOW")),
        )
