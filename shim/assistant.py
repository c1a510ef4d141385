"""Exported Vapi assistant -> what one call needs (Realtime session, greeting, call policy). Pure.

This is the bridge's slice of the translation: system prompt (Liquid-rendered), firstMessage and
its mode, voice, startSpeakingPlan.waitSeconds, maxDurationSeconds and silenceTimeoutSeconds.
The field-by-field translator with findings grows here (see the README's field table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from liquid import Environment

REALTIME_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
DEFAULT_VOICE = "marin"

# Vapi voice -> Realtime voice. Vapi's voices are other vendors' TTS voices, so no mapping is
# exact: this keeps the speaker's apparent gender, and otherwise falls back to DEFAULT_VOICE.
# OpenAI TTS voices that are not Realtime voices (fable, onyx, nova) make noise over g711.
VOICE_MAP: dict[str, str] = {
    # openai TTS voices outside the Realtime set
    "nova": "shimmer", "fable": "ballad", "onyx": "ash",
    # frequent 11labs / azure / vapi / cartesia names
    "sarah": "marin", "rachel": "marin", "bella": "coral", "elli": "shimmer", "domi": "coral",
    "jennifer": "marin", "paige": "marin", "hana": "coral", "lily": "shimmer", "kylie": "coral",
    "savannah": "marin", "neha": "marin", "emma": "coral", "jenny": "marin", "aria": "marin",
    "adam": "cedar", "josh": "ash", "arnold": "ash", "sam": "echo", "antoni": "verse",
    "elliot": "cedar", "rohan": "cedar", "cole": "ash", "harry": "cedar", "spencer": "verse",
    "guy": "cedar", "davis": "ash", "andrew": "cedar", "brian": "echo",
}

# Vapi's defaults for absent fields (reference vapi.md §2.1, §2.7).
VAPI_DEFAULT_WAIT_SECONDS = 0.4
VAPI_DEFAULT_MAX_DURATION_S = 600.0
VAPI_DEFAULT_SILENCE_TIMEOUT_S = 30.0
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
        dt = datetime.now(timezone.utc)
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


def render(template: str, variables: dict[str, Any], path: str) -> str:
    try:
        return _liquid.from_string(template).render(**variables)
    except Exception as exc:  # a template error must name where it is
        raise AssistantError(path, template[:80], f"a valid Liquid template ({exc})") from None


# --- the call setup ----------------------------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    mode: str  # assistant-speaks-first | assistant-speaks-first-with-model-generated-message | assistant-waits-for-user
    text: str = ""
    interruptible: bool = False


@dataclass(frozen=True)
class CallPolicy:
    max_duration_s: float = VAPI_DEFAULT_MAX_DURATION_S
    silence_timeout_s: float = VAPI_DEFAULT_SILENCE_TIMEOUT_S
    silence_duration_ms: int = 400
    prefix_padding_ms: int = 300


@dataclass(frozen=True)
class CallSetup:
    assistant_id: str
    assistant_name: str
    session: dict[str, Any]  # exactly what goes into session.update's `session`
    greeting: Greeting
    policy: CallPolicy
    voice: str
    model: str


def _get(obj: Any, path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """Read a dotted path; a present value of the wrong type is an error naming the path."""
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            return default
        cur = cur[part]
    if not isinstance(cur, kind) or (isinstance(cur, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AssistantError(path, cur, names)
    return cur


def map_voice(voice: dict[str, Any] | None) -> str:
    if not voice:
        return DEFAULT_VOICE
    voice_id = str(voice.get("voiceId") or "").strip().lower()
    if voice_id in REALTIME_VOICES:
        return voice_id
    return VOICE_MAP.get(voice_id, DEFAULT_VOICE)


def system_prompt(assistant: dict[str, Any]) -> str:
    messages = _get(assistant, "model.messages", list, [])
    parts = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise AssistantError(f"model.messages[{i}]", msg, "an object with role and content")
        if msg.get("role") == "system":
            content = msg.get("content")
            if not isinstance(content, str):
                raise AssistantError(f"model.messages[{i}].content", content, "a string")
            parts.append(content)
    legacy = assistant.get("model", {}).get("systemPrompt") if isinstance(assistant.get("model"), dict) else None
    if not parts and isinstance(legacy, str):
        parts.append(legacy)
    return "\n\n".join(parts)


def build_call_setup(
    assistant_id: str,
    assistant: dict[str, Any],
    ctx: CallContext,
    *,
    model: str,
    transcription_model: str = "gpt-4o-mini-transcribe",
) -> CallSetup:
    variables = ctx.template_variables(assistant)
    instructions = render(system_prompt(assistant), variables, "model.messages[system].content")
    voice = map_voice(_get(assistant, "voice", dict))

    mode = _get(assistant, "firstMessageMode", str, "assistant-speaks-first")
    modes = ("assistant-speaks-first", "assistant-speaks-first-with-model-generated-message", "assistant-waits-for-user")
    if mode not in modes:
        raise AssistantError("firstMessageMode", mode, " | ".join(modes))
    first_message = render(_get(assistant, "firstMessage", str, ""), variables, "firstMessage")
    if mode == "assistant-speaks-first" and not first_message.strip():
        mode = "assistant-waits-for-user"  # Vapi: no firstMessage => the assistant waits
    greeting = Greeting(
        mode=mode,
        text=first_message,
        interruptible=_get(assistant, "firstMessageInterruptionsEnabled", bool, False),
    )

    wait_s = _get(assistant, "startSpeakingPlan.waitSeconds", (int, float), VAPI_DEFAULT_WAIT_SECONDS)
    if not 0 <= wait_s <= 5:
        raise AssistantError("startSpeakingPlan.waitSeconds", wait_s, "a number from 0 to 5")
    silence_ms = int(round(wait_s * 1000))
    policy = CallPolicy(
        max_duration_s=float(_get(assistant, "maxDurationSeconds", (int, float), VAPI_DEFAULT_MAX_DURATION_S)),
        silence_timeout_s=float(_get(assistant, "silenceTimeoutSeconds", (int, float), VAPI_DEFAULT_SILENCE_TIMEOUT_S)),
        silence_duration_ms=silence_ms,
    )

    transcription: dict[str, Any] = {"model": transcription_model}
    language = _get(assistant, "transcriber.language", str)
    if language and re.fullmatch(r"[a-z]{2}", language.split("-")[0].lower()):
        transcription["language"] = language.split("-")[0].lower()

    session: dict[str, Any] = {
        "type": "realtime",
        "model": model,
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": {"type": "audio/pcmu"},
                "transcription": transcription,
                # The shim, not the server, decides barge-in: it alone knows what Twilio has
                # played (mark echoes), so interrupt_response is off and the bridge cancels.
                "turn_detection": {
                    "type": "server_vad",
                    "prefix_padding_ms": policy.prefix_padding_ms,
                    "silence_duration_ms": silence_ms,
                    "create_response": True,
                    "interrupt_response": False,
                },
            },
            "output": {"format": {"type": "audio/pcmu"}, "voice": voice},
        },
    }
    return CallSetup(
        assistant_id=assistant_id,
        assistant_name=str(assistant.get("name") or ""),
        session=session,
        greeting=greeting,
        policy=policy,
        voice=voice,
        model=model,
    )
