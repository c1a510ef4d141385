"""Where a webhook goes and which secrets it carries (https://docs.vapi.ai/server-url).

Exports rarely carry secrets: ``GET /assistant`` returns only ``isServerUrlSecretSet``, and Vapi
credentials (``server.credentialId``) are never exported. The customer supplies them to the shim in a
*secrets book*:

* ``SHIM_SECRETS_FILE``: a JSON file ::

      {"default":    {"secret": "...", "headers": {"Authorization": "Bearer ..."}},
       "assistants": {"<assistant id>": {"secret": "..."}},
       "tools":      {"<tool id or function name>": {"secret": "...", "headers": {...}}}}

  Every section is optional; an entry may also be a bare string (shorthand for ``{"secret": ...}``).
  ``secret`` becomes the ``X-Vapi-Secret`` header (Vapi's legacy inline secret); ``headers`` are sent
  as given (this is how a Vapi Bearer/custom-header credential is reproduced).
* ``SHIM_VAPI_SECRET``: a default ``X-Vapi-Secret`` (used when the file has no ``default.secret``).

`resolve_server` applies Vapi's precedence. Target: ``tool.server.url`` -> ``assistant.server.url``
(legacy ``assistant.serverUrl``) -> the phone number's server URL -> None (nothing is sent, no error).
Secret for the chosen target: the inline ``server.secret`` (legacy ``serverUrlSecret``) of that target
-> the book's entry for the tool (by tool id, then by function name) -> for the assistant id -> the
book's default -> none. Book headers are merged in the same order (more specific wins). Headers are
built as: ``Content-Type: application/json``, ``X-Vapi-Secret``, book headers, then ``server.headers``
verbatim (so an ``Authorization`` there overrides a credential, as in Vapi; names are
case-insensitive).

No secret value ever appears in a repr, an exception message or a log line from this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SecretEntry",
    "SecretsBook",
    "SecretsError",
    "ServerTarget",
    "redact_url",
    "resolve_server",
]

DEFAULT_TIMEOUT_S = 20.0  # Server.timeoutSeconds default (SPEC)
_TIMEOUT_RANGE = (1.0, 300.0)
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token
SECRET_HEADER = "X-Vapi-Secret"


class SecretsError(ValueError):
    """The secrets book (file or environment) is unusable; the message names the file and key."""


def redact_url(url: str) -> str:
    """`url` without query string, fragment or user:password (both may hold a token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0]


# --------------------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTarget:
    """Where to POST and with which headers. `repr` shows neither header values nor the query."""

    url: str
    headers: dict[str, str]
    timeout_s: float = DEFAULT_TIMEOUT_S
    source: str = ""  # which setting chose the URL: tool.server | assistant.server | assistant.serverUrl | number

    @property
    def safe_url(self) -> str:
        """The URL for logs and rows: no query string, fragment or credentials."""
        return redact_url(self.url)

    def sensitive_values(self) -> list[str]:
        """Strings that must never be logged or recorded: header values (except Content-Type) and
        the URL's query string and userinfo."""
        values = [v for k, v in self.headers.items() if k.lower() != "content-type" and v]
        try:
            parts = urlsplit(self.url)
            values += [x for x in (parts.query, parts.fragment, parts.password, parts.username) if x]
        except ValueError:
            pass
        return values

    def __repr__(self) -> str:
        return (f"ServerTarget(url={self.safe_url!r}, headers={sorted(self.headers)!r}, "
                f"timeout_s={self.timeout_s!r}, source={self.source!r})")

    __str__ = __repr__


# --------------------------------------------------------------------------------------------------
# The book
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretEntry:
    secret: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"SecretEntry(secret={'<redacted>' if self.secret else None}, "
                f"headers={sorted(self.headers)!r})")

    __str__ = __repr__


class SecretsBook:
    """Secrets the customer supplied (exports carry none). Immutable once loaded."""

    def __init__(self, default: SecretEntry | None = None, assistants: Mapping[str, SecretEntry] | None = None,
                 tools: Mapping[str, SecretEntry] | None = None) -> None:
        self.default = default
        self.assistants: dict[str, SecretEntry] = dict(assistants or {})
        self.tools: dict[str, SecretEntry] = dict(tools or {})

    def __repr__(self) -> str:
        return (f"SecretsBook(default={'set' if self.default else None}, assistants={sorted(self.assistants)!r}, "
                f"tools={sorted(self.tools)!r})")

    __str__ = __repr__

    @classmethod
    def empty(cls) -> SecretsBook:
        return cls()

    @classmethod
    def load(cls, path: str | None, env: Mapping[str, str]) -> SecretsBook:
        """The book from `path` (or ``SHIM_SECRETS_FILE`` when `path` is None) and ``SHIM_VAPI_SECRET``.

        Neither set: an empty book. Raises SecretsError naming the file and key on a missing file,
        bad JSON or a wrong shape (never quoting values)."""
        if path is None:
            path = (env.get("SHIM_SECRETS_FILE") or "").strip() or None
        book = cls()
        if path is not None:
            where = f"SHIM_SECRETS_FILE {path}"
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise SecretsError(f"{where}: cannot read it ({type(exc).__name__}: {exc.strerror or exc})") from None
            except UnicodeDecodeError:
                raise SecretsError(f"{where}: not UTF-8 text") from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:  # message and position only, never the document
                raise SecretsError(f"{where}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
            book = cls._from_json(data, where)
        env_secret = (env.get("SHIM_VAPI_SECRET") or "").strip()
        if env_secret:
            _check_value(env_secret, "SHIM_VAPI_SECRET")
            if book.default is None:
                book.default = SecretEntry(env_secret, {})
            elif book.default.secret is None:
                book.default = SecretEntry(env_secret, book.default.headers)
        return book

    @classmethod
    def _from_json(cls, data: Any, where: str) -> SecretsBook:
        if not isinstance(data, dict):
            raise SecretsError(f"{where}: the top level must be a JSON object with default / assistants / tools")
        unknown = sorted(set(data) - {"default", "assistants", "tools"})
        if unknown:
            raise SecretsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               "expected default, assistants, tools")
        default = _entry(data["default"], f"{where}: default") if data.get("default") is not None else None
        sections: dict[str, dict[str, SecretEntry]] = {}
        for section in ("assistants", "tools"):
            raw = data.get(section)
            if raw is None:
                sections[section] = {}
                continue
            if not isinstance(raw, dict):
                raise SecretsError(f"{where}: {section} must be an object of id -> entry, got {type(raw).__name__}")
            out: dict[str, SecretEntry] = {}
            for key, value in raw.items():
                if not key.strip():
                    raise SecretsError(f"{where}: {section} has an empty key")
                out[key] = _entry(value, f"{where}: {section}.{key}")
            sections[section] = out
        return cls(default, sections["assistants"], sections["tools"])

    # ---------------------------------------------------------------- look-ups

    def chain(self, *, tool_id: str | None, tool_name: str | None, assistant_id: str | None) -> list[SecretEntry]:
        """Entries that apply, most specific first: tool id, function name, assistant id, default."""
        out: list[SecretEntry] = []
        for section, key in ((self.tools, tool_id), (self.tools, tool_name), (self.assistants, assistant_id)):
            if key and key in section and section[key] not in out:
                out.append(section[key])
        if self.default is not None:
            out.append(self.default)
        return out


def _check_value(value: str, where: str) -> None:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise SecretsError(f"{where}: must not contain line breaks or NUL")


def _entry(value: Any, where: str) -> SecretEntry:
    if isinstance(value, str):
        value = {"secret": value}
    if not isinstance(value, dict):
        raise SecretsError(f"{where}: must be an object {{\"secret\": ..., \"headers\": {{...}}}} or a string, "
                           f"got {type(value).__name__}")
    unknown = sorted(set(value) - {"secret", "headers"})
    if unknown:
        raise SecretsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected secret, headers")
    secret = value.get("secret")
    if secret is not None:
        if not isinstance(secret, str) or not secret.strip():
            raise SecretsError(f"{where}.secret: must be a non-empty string, got {type(secret).__name__}")
        _check_value(secret, f"{where}.secret")
    headers_raw = value.get("headers")
    headers: dict[str, str] = {}
    if headers_raw is not None:
        if not isinstance(headers_raw, dict):
            raise SecretsError(f"{where}.headers: must be an object of header name -> string, "
                               f"got {type(headers_raw).__name__}")
        for name, hv in headers_raw.items():
            if not _HEADER_NAME.match(name):
                raise SecretsError(f"{where}.headers: {name!r} is not a valid header name")
            if not isinstance(hv, str):
                raise SecretsError(f"{where}.headers.{name}: must be a string, got {type(hv).__name__}")
            _check_value(hv, f"{where}.headers.{name}")
            headers[name] = hv
    if secret is None and not headers:
        raise SecretsError(f"{where}: has neither secret nor headers")
    return SecretEntry(secret, headers)


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def _url(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        if value.lower().startswith(("http://", "https://")):
            return value
    return None


def _timeout(server: Mapping[str, Any] | None) -> float:
    raw = server.get("timeoutSeconds") if server else None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != raw:
        return DEFAULT_TIMEOUT_S
    return float(min(max(raw, _TIMEOUT_RANGE[0]), _TIMEOUT_RANGE[1]))


def _set(headers: dict[str, str], name: str, value: str) -> None:
    """Set a header, replacing any existing one whose name differs only in case."""
    for existing in [k for k in headers if k.lower() == name.lower()]:
        del headers[existing]
    headers[name] = value


def _nonempty_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def resolve_server(*, tool: Mapping[str, Any] | None, assistant: Mapping[str, Any], assistant_id: str | None,
                   number_server_url: str | None, secrets: SecretsBook) -> ServerTarget | None:
    """The target of a webhook, or None when nothing is configured (Vapi then sends nothing).

    `tool`: the Vapi tool (saved or inline) for ``tool-calls``; None for server messages. For
    ``assistant-request`` pass ``assistant={}`` (it goes to the number's server only)."""
    tool = tool or {}
    assistant = assistant or {}
    tool_server = tool.get("server") if isinstance(tool.get("server"), Mapping) else None
    asst_server = assistant.get("server") if isinstance(assistant.get("server"), Mapping) else None

    server: Mapping[str, Any] | None = None
    inline_secret: str | None = None
    if tool_server and _url(tool_server.get("url")):
        url, source, server = _url(tool_server.get("url")), "tool.server", tool_server
        inline_secret = _nonempty_str(tool_server.get("secret"))
    elif asst_server and _url(asst_server.get("url")):
        url, source, server = _url(asst_server.get("url")), "assistant.server", asst_server
        inline_secret = _nonempty_str(asst_server.get("secret")) or _nonempty_str(assistant.get("serverUrlSecret"))
    elif _url(assistant.get("serverUrl")):
        url, source = _url(assistant.get("serverUrl")), "assistant.serverUrl"
        inline_secret = _nonempty_str(assistant.get("serverUrlSecret"))
    elif _url(number_server_url):
        url, source = _url(number_server_url), "number"
    else:
        return None
    assert url is not None

    function = tool.get("function") if isinstance(tool.get("function"), Mapping) else {}
    chain = secrets.chain(
        tool_id=_nonempty_str(tool.get("id")) if tool else None,
        tool_name=_nonempty_str(function.get("name")) if tool else None,
        assistant_id=assistant_id or _nonempty_str(assistant.get("id")),
    )
    secret = inline_secret
    if secret is None:
        secret = next((e.secret for e in chain if e.secret), None)

    headers: dict[str, str] = {"Content-Type": "application/json"}
    if secret:
        _set(headers, SECRET_HEADER, secret)
    for entry in reversed(chain):  # least specific first, so the most specific wins
        for name, value in entry.headers.items():
            _set(headers, name, value)
    verbatim = server.get("headers") if server else None
    if isinstance(verbatim, Mapping):
        for name, value in verbatim.items():
            if value is None or not isinstance(name, str) or not _HEADER_NAME.match(name):
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            if "\r" in text or "\n" in text:
                continue
            _set(headers, name, text)
    return ServerTarget(url=url, headers=headers, timeout_s=_timeout(server), source=source)
