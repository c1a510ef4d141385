"""Service configuration, read once from the environment (every variable is in the README)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable. Several
    problems are reported together, one per line (`problems` keeps them as a list)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        if len(problems) == 1:
            return cls(problems[0], problems)
        return cls(f"{len(problems)} configuration problems:\n" + "\n".join(f"  - {p}" for p in problems), problems)


def _ws_form(http_url: str, path: str) -> str:
    """The ws(s):// form of an http(s):// base URL, with `path` appended."""
    parts = urlsplit(http_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None:
        raise ConfigError(f"PUBLIC_URL={http_url!r}: expected an http:// or https:// URL")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def _seconds(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not 0 <= value <= 3600:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds between 0 and 3600")
    return value


def _switch(raw: str, name: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected 1 or 0")


def _port(raw: str, name: str) -> int | None:
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"{name}={raw!r}: expected a port number (1-65535)")
    return port


MAX_WORKERS = 256
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def workers_count(raw: str, name: str = "SHIM_WORKERS") -> int | None:
    """SHIM_WORKERS / --workers: a positive number of worker processes (unset: one per core)."""
    if not raw:
        return None
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 0 < count <= MAX_WORKERS:
        raise ConfigError(f"{name}={raw!r}: expected a positive number of worker processes (1-{MAX_WORKERS})")
    return count


def default_workers() -> int:
    """One worker per core this process may run on: the CPU affinity mask, capped by a cgroup v2
    CPU quota (`docker run --cpus`, Kubernetes limits), which the mask does not show. Off Linux, 1:
    elsewhere SO_REUSEPORT does not spread connections over the listeners."""
    if not sys.platform.startswith("linux"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


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


def _allow_list(raw: str, name: str) -> str:
    from shim_tools.egress import parse_allow_list

    try:
        parse_allow_list(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
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
    # SIGTERM to exit, in seconds: set it to the platform's kill timeout (fly.toml kill_timeout).
    # Live calls get all of it but DRAIN_RESERVE_S, kept for the apology, the rows and the reports.
    drain_timeout_s: float = 120.0
    transcription_model: str = "gpt-4o-mini-transcribe"
    voice_map: tuple[tuple[str, str], ...] = ()  # Vapi voiceId -> Realtime voice overrides
    twilio_api_base: str = "https://api.twilio.com"
    openai_base_url: str = "https://api.openai.com/v1"  # post-call analysis (chat completions)
    analysis_model: str = "gpt-4.1-mini"
    secrets_file: str = ""  # SHIM_SECRETS_FILE: X-Vapi-Secret / headers per assistant and tool
    tool_url_allow: str = ""  # SHIM_TOOL_URL_ALLOW: where customer URLs may point (tools/egress.py)
    metrics_token: str = ""  # SHIM_METRICS_TOKEN: /metrics wants `Authorization: Bearer <it>`
    metrics_port: int | None = None  # SHIM_METRICS_PORT: /metrics only there (a private port)
    # SHIM_PREWARM: open the model session from /twilio/voice, before the stream starts (shim/prewarm.py)
    prewarm: bool = True
    workers: int | None = None  # SHIM_WORKERS: `shim serve` worker processes (None: one per core)
    public_url_set: bool = True  # False when PUBLIC_URL was left to its loopback default
    parse_problems: tuple[str, ...] = ()  # malformed values, when read with strict=False

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
    def from_env(cls, env: dict[str, str] | None = None, *, strict: bool = True) -> Config:
        """Parse the environment. Every malformed value is collected and reported in ONE
        ConfigError (one problem per line); with strict=False they are kept on the config
        (`parse_problems`) and reported by `problems()` together with the rest. Values that are
        merely missing are checked by `problems()`, because only some commands need them."""
        env = dict(os.environ if env is None else env)
        problems: list[str] = []

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        def parsed(name: str, default: str, parse, fallback):
            try:
                return parse(get(name, default), name)
            except ConfigError as exc:
                problems.append(str(exc))
                return fallback

        public_url = get("PUBLIC_URL", cls.public_url)
        try:
            _ws_form(public_url, "")  # the scheme, named by its variable
        except ConfigError as exc:
            problems.append(str(exc))
        public_media_url = get("PUBLIC_MEDIA_URL")
        if public_media_url and urlsplit(public_media_url).scheme not in ("ws", "wss"):
            problems.append(f"PUBLIC_MEDIA_URL={public_media_url!r}: expected a ws:// or wss:// URL")
        log_level = get("SHIM_LOG_LEVEL", "info").lower()
        if log_level not in LOG_LEVELS:
            problems.append(f"SHIM_LOG_LEVEL={log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        log_format = get("SHIM_LOG_FORMAT", "json").lower()
        if log_format not in LOG_FORMATS:
            problems.append(f"SHIM_LOG_FORMAT={log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
        config = cls(
            openai_api_key=get("OPENAI_API_KEY"),
            openai_realtime_url=get("OPENAI_REALTIME_URL", cls.openai_realtime_url),
            openai_realtime_model=get("OPENAI_REALTIME_MODEL", cls.openai_realtime_model),
            twilio_account_sid=get("TWILIO_ACCOUNT_SID"),
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            public_url=public_url,
            public_url_set=bool(get("PUBLIC_URL")),
            public_media_url=public_media_url,
            media_port=parsed("SHIM_MEDIA_PORT", "", _port, None),
            database_url=get("DATABASE_URL"),
            data_dir=Path(get("SHIM_DATA_DIR", "./.shim")),
            assistants_dir=Path(get("SHIM_ASSISTANTS_DIR", "./assistants")),
            default_assistant=get("SHIM_DEFAULT_ASSISTANT"),
            log_format=log_format if log_format in LOG_FORMATS else "json",
            log_level=log_level if log_level in LOG_LEVELS else "info",
            drain_timeout_s=parsed("SHIM_DRAIN_TIMEOUT", str(cls.drain_timeout_s), _seconds, cls.drain_timeout_s),
            transcription_model=get("SHIM_TRANSCRIPTION_MODEL", cls.transcription_model),
            voice_map=parsed("SHIM_VOICE_MAP", "", lambda raw, _name: _voice_map(raw), ()),
            twilio_api_base=get("TWILIO_API_BASE", cls.twilio_api_base).rstrip("/"),
            openai_base_url=get("OPENAI_BASE_URL", cls.openai_base_url).rstrip("/"),
            analysis_model=get("SHIM_ANALYSIS_MODEL", cls.analysis_model),
            secrets_file=get("SHIM_SECRETS_FILE"),
            tool_url_allow=parsed("SHIM_TOOL_URL_ALLOW", "", _allow_list, ""),
            metrics_token=get("SHIM_METRICS_TOKEN"),
            metrics_port=parsed("SHIM_METRICS_PORT", "", _port, None),
            prewarm=parsed("SHIM_PREWARM", "1", lambda raw, name: _switch(raw or "1", name), True),
            workers=parsed("SHIM_WORKERS", "", workers_count, None),
            parse_problems=tuple(problems),
        )
        if problems and strict:
            raise ConfigError.of(problems)
        return config

    def problems(self, *, serving: bool = True, media_port: int | None = None) -> list[str]:
        """Everything wrong with this configuration for `shim serve` (serving=True) or for the
        commands that only touch the database (serving=False), as one line per problem."""
        from .validate import config_problems

        return [*self.parse_problems, *config_problems(self, serving=serving, media_port=media_port)]
