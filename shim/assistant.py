"""Exported Vapi assistants on disk, and Vapi's Liquid templates. The translation itself is
in shim/translate.py."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from contextvars import ContextVar
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from liquid import Environment

ASSISTANT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class AssistantError(ValueError):
    """An assistant file is missing or invalid. The message names the JSON path, the bad value
    and what was expected."""

    def __init__(self, path: str, value: Any, expected: str):
        self.path, self.value, self.expected = path, value, expected
        shown = repr(value)
        super().__init__(f"{path}: got {shown[:120]}, expected {expected}")


class AssistantNotFound(AssistantError):
    pass


def load_assistant(assistants_dir: Path, assistant_id: str) -> dict[str, Any]:
    if not ASSISTANT_ID_RE.match(assistant_id or ""):
        raise AssistantNotFound("assistant", assistant_id, "an assistant id (letters, digits, . _ -)")
    path = Path(assistants_dir) / f"{assistant_id}.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AssistantNotFound("assistant", assistant_id, f"a file {path}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise AssistantError(str(path), raw[:60], f"JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AssistantError(str(path), data, "a JSON object (an exported Vapi assistant)")
    return data


# --- templates (LiquidJS-compatible, as Vapi renders them) ---------------------------------


def vapi_date(value: Any, fmt: str = "%b %d, %Y, %I:%M %p", tz: str | None = None) -> str:
    """Liquid `date` filter with Vapi's extra timezone argument (python-liquid's stock filter
    rejects the third argument)."""
    if value in ("now", "today", None):
        dt = _render_now.get() or datetime.now(timezone.utc)
    elif isinstance(value, (int, float)):
        dt = datetime.fromtimestamp(value / (1000 if value > 1e11 else 1), timezone.utc)
    elif isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if tz:
        try:
            dt = dt.astimezone(ZoneInfo(tz))
        except (ZoneInfoNotFoundError, ValueError):
            pass  # Vapi leaves the time in UTC for an unknown zone; so do we
    return dt.strftime(fmt)


# The call's "now", so a template renders the same whenever it is rendered during one call.
_render_now: ContextVar[datetime | None] = ContextVar("render_now", default=None)
_liquid = Environment()
_liquid.filters["date"] = vapi_date


@dataclass(frozen=True)
class CallContext:
    call_sid: str
    from_number: str = ""
    to_number: str = ""
    variables: dict[str, str] = field(default_factory=dict)  # stream custom parameters etc.
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def template_variables(self, assistant: dict[str, Any]) -> dict[str, Any]:
        now = self.now.astimezone(timezone.utc)
        overrides = (assistant.get("assistantOverrides") or {}).get("variableValues") or {}
        values: dict[str, Any] = {
            "now": now.strftime("%b %-d, %Y %-I:%M %p"),
            "date": now.strftime("%b %-d, %Y"),
            "time": now.strftime("%-I:%M %p"),
            "month": now.strftime("%B"),
            "day": now.strftime("%-d"),
            "year": now.strftime("%Y"),
            "currentDateTime": now.isoformat(),
            "customer": {"number": self.from_number},
            "phoneNumber": {"number": self.to_number},
            "call": {"id": self.call_sid, "type": "inboundPhoneCall"},
            "assistant": {"id": assistant.get("id", ""), "name": assistant.get("name", "")},
            "transport": {"callSid": self.call_sid, "provider": "twilio", "conversationType": "voice"},
        }
        if isinstance(overrides, dict):
            values.update(overrides)
        values.update(self.variables)
        return values


@functools.lru_cache(maxsize=128)
def _parsed(template: str):
    """A template parsed once (~half of what rendering costs), reused for every call of that
    assistant: a parsed Liquid template renders any number of times with other variables."""
    return _liquid.from_string(template)


def render(template: str, variables: dict[str, Any], path: str, now: datetime | None = None) -> str:
    if "{" not in template:  # no Liquid tag or output in it: it renders as itself
        return template
    token = _render_now.set(now)
    try:
        return _parsed(template).render(**variables)
    except Exception as exc:  # a template error must name where it is
        raise AssistantError(path, template[:80], f"a valid Liquid template ({exc})") from None
    finally:
        _render_now.reset(token)


def load_saved_tools(assistants_dir: Path, tool_ids: Any) -> dict[str, dict[str, Any]]:
    """Saved tools named by model.toolIds, from <assistants_dir>/tools/<id>.json (where
    `shim assistants pull` writes them). Missing ones are left out: the translator reports them."""
    found: dict[str, dict[str, Any]] = {}
    for tool_id in tool_ids if isinstance(tool_ids, list) else []:
        if not isinstance(tool_id, str) or not ASSISTANT_ID_RE.match(tool_id):
            continue
        path = Path(assistants_dir) / "tools" / f"{tool_id}.json"
        try:
            data = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        if isinstance(data, dict):
            found[tool_id] = data
    return found
