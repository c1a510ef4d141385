"""Moving Twilio numbers from Vapi to the shim: the pure parts (no I/O).

E.164 validation, a number's voice settings as Twilio names them, what `shim numbers migrate`
changes and what `rollback` restores, where a voice URL points, and the sticky per-caller split.
The Twilio client is `shim/twilio_numbers.py`; the commands are `shim/numbers_cli.py`; the
server's in-memory routing table is `shim/routes.py`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
# The Voice URL (POST) Vapi writes on a Twilio number it imports (POST /phone-number with
# provider "twilio"; "Vapi will configure both the voice and messaging URLs", smsEnabled in
# https://docs.vapi.ai/api-reference/phone-numbers/create).
VAPI_INBOUND_URL = "https://api.vapi.ai/twilio/inbound_call"
VAPI_HOST = "api.vapi.ai"
# A split hands Vapi's callers over with <Redirect> as the only verb, while the call is still
# ringing: Vapi's inbound_call refuses calls in any other state ("CallStatus must be one of the
# following values: ringing", https://support.vapi.ai/t/27519801/tranfering-in-progress-twilio-call-to-vapi).


class NumberInputError(ValueError):
    """A usage / validation error (exit 2): the message names the value and what was expected."""


def check_e164(number: str) -> str:
    if not isinstance(number, str) or not E164_RE.match(number):
        raise NumberInputError(f"number {number!r}: expected E.164 (+ then 7 to 15 digits), e.g. +15551234567")
    return number


def check_percent(raw: Any) -> int:
    try:
        value = int(str(raw), 10)
    except ValueError:
        value = -1
    if not 0 <= value <= 100 or str(raw).strip() != str(value):
        raise NumberInputError(f"--percent {raw!r}: expected a whole number from 0 to 100")
    return value


@dataclass(frozen=True)
class VoiceSettings:
    """The six voice settings of a Twilio IncomingPhoneNumber that migrate records and changes.
    Values are kept exactly as Twilio returned them (None and "" both mean unset)."""

    voice_url: str | None = None
    voice_method: str | None = None
    voice_fallback_url: str | None = None
    voice_fallback_method: str | None = None
    status_callback: str | None = None
    status_callback_method: str | None = None

    # snake_case attribute -> Twilio's form / JSON name
    TWILIO_NAMES = {
        "voice_url": "VoiceUrl",
        "voice_method": "VoiceMethod",
        "voice_fallback_url": "VoiceFallbackUrl",
        "voice_fallback_method": "VoiceFallbackMethod",
        "status_callback": "StatusCallback",
        "status_callback_method": "StatusCallbackMethod",
    }

    @classmethod
    def from_instance(cls, instance: Any) -> VoiceSettings:
        """From a twilio-python IncomingPhoneNumberInstance (or anything with those attributes)."""
        return cls(**{f.name: getattr(instance, f.name, None) for f in fields(cls)})

    def to_json(self) -> dict[str, str | None]:
        return {self.TWILIO_NAMES[f.name]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VoiceSettings:
        unknown = set(data) - set(cls.TWILIO_NAMES.values())
        if unknown:
            raise ValueError(f"recorded voice settings: unknown keys {sorted(unknown)}")
        by_name = {v: k for k, v in cls.TWILIO_NAMES.items()}
        return cls(**{by_name[k]: v for k, v in data.items()})

    def update_params(self) -> dict[str, str]:
        """Keyword arguments for twilio-python's IncomingPhoneNumberContext.update(): every URL,
        unset ones as "" (Twilio clears a URL given as empty; None would not be sent at all),
        and every method that has a value (an empty method is left as Twilio has it)."""
        params = {}
        for f in fields(self):
            value = getattr(self, f.name) or ""
            if value or not f.name.endswith("method"):
                params[f.name] = value
        return params

    def differences(self, other: VoiceSettings) -> dict[str, tuple[str | None, str | None]]:
        """Twilio name -> (self, other) for each field that differs (None and "" are equal;
        HTTP methods compare case-insensitively, as Twilio treats them)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            na, nb = (a or ""), (b or "")
            if f.name.endswith("method"):
                na, nb = na.upper(), nb.upper()
            if na != nb:
                out[self.TWILIO_NAMES[f.name]] = (a, b)
        return out


def redact_url(url: str | None) -> str | None:
    """The URL with the password of its user info as ***: Twilio takes HTTP Basic credentials in
    webhook URLs (https://user:password@host/..., https://www.twilio.com/docs/usage/security#http-authentication),
    and they are shown on terminals and kept in the audit trail only this way."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def redact_urls(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """A settings / state dict with every string value passed through redact_url."""
    if data is None:
        return None
    return {k: redact_url(v) if isinstance(v, str) else v for k, v in data.items()}


def shim_voice_url(public_url: str) -> str:
    return public_url.rstrip("/") + "/twilio/voice"


def points_to(voice_url: str | None, public_url: str) -> str:
    """'shim' (this deployment's PUBLIC_URL), 'vapi' (api.vapi.ai) or 'other'."""
    url = (voice_url or "").strip()
    base = public_url.rstrip("/")
    if url and (url == base or url.startswith(base + "/")):
        return "shim"
    if urlsplit(url).hostname == VAPI_HOST:
        return "vapi"
    return "other"


def shim_settings(previous: VoiceSettings, public_url: str) -> VoiceSettings:
    """What migrate sets: the shim answers (POST), call statuses come to the shim, and Twilio
    itself falls back to the previous voice URL (Vapi) when the shim fails to answer."""
    base = public_url.rstrip("/")
    return VoiceSettings(
        voice_url=base + "/twilio/voice",
        voice_method="POST",
        voice_fallback_url=previous.voice_url or "",
        voice_fallback_method=(previous.voice_method or "POST").upper() if previous.voice_url else "POST",
        status_callback=base + "/twilio/status",
        status_callback_method="POST",
    )


@dataclass(frozen=True)
class MigratePlan:
    previous: VoiceSettings  # what is (or stays) recorded, and what rollback restores
    target: VoiceSettings  # what Twilio will hold afterwards
    twilio_changes: dict[str, tuple[str | None, str | None]]  # Twilio name -> (now, after)
    assistant_before: str | None
    assistant_after: str
    notes: tuple[str, ...] = ()

    @property
    def changes_anything(self) -> bool:
        return bool(self.twilio_changes) or self.assistant_before != self.assistant_after


def plan_migrate(
    *, current: VoiceSettings, recorded: VoiceSettings | None, assistant_before: str | None,
    assistant_after: str, public_url: str, voice_application_sid: str | None = None, trunk_sid: str | None = None,
    number: str = "",
) -> MigratePlan:
    """What `shim numbers migrate` does to a number whose Twilio settings are `current`, given
    what Postgres recorded at an earlier migrate (None when never migrated). Raises
    NumberInputError when the number cannot be migrated safely."""
    if voice_application_sid or trunk_sid:
        what = f"TwiML App {voice_application_sid}" if voice_application_sid else f"SIP trunk {trunk_sid}"
        raise NumberInputError(
            f"{number}: its calls go to {what}, and Twilio ignores the Voice URL while one is set; "
            "detach it in the Twilio Console (Phone Numbers > the number > Voice configuration), then migrate"
        )
    notes: list[str] = []
    if points_to(current.voice_url, public_url) == "shim":
        if recorded is None:
            raise NumberInputError(
                f"{number}: its Voice URL already points at this deployment ({current.voice_url}) but no previous "
                "settings were recorded, so there would be nothing to fall back or roll back to; set the Voice URL "
                f"back to where it was (for Vapi: {VAPI_INBOUND_URL}, POST), then migrate"
            )
        previous = recorded
    else:
        previous = current
        if recorded is not None and recorded.differences(current):
            notes.append("the number no longer pointed at the shim: its current settings are recorded anew")
    if previous.status_callback and points_to(previous.status_callback, public_url) == "other":
        notes.append(
            f"its StatusCallback {redact_url(previous.status_callback)} stops getting this number's call status "
            "events while it is on the shim (they come to the shim; rollback restores it)"
        )
    target = shim_settings(previous, public_url)
    return MigratePlan(
        previous=previous,
        target=target,
        twilio_changes=current.differences(target),
        assistant_before=assistant_before,
        assistant_after=assistant_after,
        notes=tuple(notes),
    )


# --- the split --------------------------------------------------------------------------------


def split_bucket(number: str, caller: str) -> int:
    """0..99, stable for a (number, caller) pair: the same person calling the same number
    always lands in the same bucket, on every instance and across restarts."""
    digest = hashlib.sha256(f"{number}\x00{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def answers_on_shim(number: str, caller: str, percent: int) -> bool:
    """Buckets below `percent` go to the shim, so raising the percentage only ever moves
    callers from Vapi to the shim (a caller on the shim at 10% is still on it at 30%)."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return split_bucket(number, caller) < percent


@dataclass(frozen=True)
class Route:
    """One row of the in-memory routing table the voice webhook reads."""

    number: str
    assistant_id: str | None = None
    server_url: str | None = None
    split_percent: int = 100
    redirect_url: str | None = None  # the recorded previous Voice URL (Vapi)
    redirect_method: str = "POST"
    fallback_destination: dict[str, Any] | None = None  # Vapi's phoneNumber.fallbackDestination

    def on_shim(self, caller: str) -> bool:
        if not self.redirect_url:  # nowhere else to send the caller
            return True
        return answers_on_shim(self.number, caller, self.split_percent)

    def as_number(self) -> dict[str, Any]:
        return {"assistant_id": self.assistant_id, "server_url": self.server_url,
                "fallback_destination": self.fallback_destination}

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number, "assistant_id": self.assistant_id, "server_url": self.server_url,
            "split_percent": self.split_percent, "redirect_url": self.redirect_url,
            "redirect_method": self.redirect_method, "fallback_destination": self.fallback_destination,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        return cls(
            number=str(data["number"]), assistant_id=data.get("assistant_id"), server_url=data.get("server_url"),
            split_percent=int(data.get("split_percent", 100)), redirect_url=data.get("redirect_url"),
            redirect_method=str(data.get("redirect_method") or "POST"),
            fallback_destination=_destination(data.get("fallback_destination")),
        )

    @classmethod
    def from_row(cls, row: Any) -> Route:
        """From a numbers row (number, assistant_id, server_url, split_percent, previous_settings)."""
        previous = row["previous_settings"] or {}
        if isinstance(previous, (str, bytes)):
            import orjson

            previous = orjson.loads(previous)
        # jsonb has no schema: a value edited by hand that is not Twilio's shape leaves the
        # route with nowhere to redirect to (the shim keeps the callers) instead of failing.
        if not isinstance(previous, dict):
            previous = {}
        url, method = previous.get("VoiceUrl"), previous.get("VoiceMethod")
        return cls(
            number=row["number"], assistant_id=row["assistant_id"], server_url=row["server_url"],
            split_percent=int(row["split_percent"] if row["split_percent"] is not None else 100),
            redirect_url=url if isinstance(url, str) and url else None,
            redirect_method=method.upper() if isinstance(method, str) and method else "POST",
            fallback_destination=_destination(row["fallback_destination"] if "fallback_destination" in row.keys() else None),
        )


def _destination(value: Any) -> dict[str, Any] | None:
    """A stored fallbackDestination, if it is one (jsonb has no schema: a hand-edited value that
    names no number or SIP URI means no fallback, not a failure)."""
    if isinstance(value, (str, bytes)):
        import orjson

        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    if isinstance(value, dict) and (isinstance(value.get("number"), str) or isinstance(value.get("sipUri"), str)):
        return value
    return None


def fallback_number(raw: str) -> dict[str, Any] | None:
    """`--fallback-number`: an E.164 number as Vapi's destination shape; "none" clears it."""
    if raw.lower() == "none":
        return None
    return {"type": "number", "number": check_e164(raw)}


# --- presentation -----------------------------------------------------------------------------


def aligned_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in [*widths[:-1], len(headers[-1])]))  # the last column runs free
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def describe_changes(changes: dict[str, tuple[str | None, str | None]], settings: VoiceSettings) -> list[str]:
    """One line per voice setting: 'Name  before -> after' or 'Name  value (unchanged)'."""
    lines = []
    width = max(len(n) for n in VoiceSettings.TWILIO_NAMES.values())
    for name, value in settings.to_json().items():
        if name in changes:
            before, after = changes[name]
            lines.append(f"  {name:<{width}}  {_shown(before)} -> {_shown(after)}")
        else:
            lines.append(f"  {name:<{width}}  {_shown(value)} (unchanged)")
    return lines


def _shown(value: str | None) -> str:
    return redact_url(value) if value else "(empty)"
