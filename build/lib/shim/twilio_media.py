"""Twilio Media Streams, sans-I/O: text frames in -> typed events, outgoing frames as strings.

Reference: twilio.md §3. Payloads stay base64 strings end to end: the shim never decodes
μ-law it only relays, it just counts bytes (8 bytes = 1 ms) from the base64 length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

MULAW_BYTES_PER_MS = 8


class ProtocolError(ValueError):
    """A frame that does not follow the protocol; the message names the field, the value and
    what was expected."""


def b64_decoded_len(b64: str) -> int:
    """Byte length of base64 data without decoding it."""
    n = len(b64)
    if n == 0:
        return 0
    pad = 2 if b64.endswith("==") else 1 if b64.endswith("=") else 0
    return n * 3 // 4 - pad


@dataclass(slots=True)
class Connected:
    protocol: str


@dataclass(slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Media:
    payload: str  # base64 μ-law, passed through untouched
    timestamp_ms: int


@dataclass(slots=True)
class Mark:
    name: str


@dataclass(slots=True)
class Dtmf:
    digit: str


@dataclass(slots=True)
class Stop:
    pass


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop


def _field(obj: dict, name: str, where: str, kind: type = str):
    value = obj.get(name)
    if not isinstance(value, kind):
        expected = {str: "a string", dict: "an object"}.get(kind, kind.__name__)
        raise ProtocolError(f"{where}.{name}={value!r}: expected {expected}")
    return value


def parse(text: str | bytes) -> TwilioEvent | None:
    """Parse one frame from Twilio. Returns None for event types this version ignores
    (forward compatibility); raises ProtocolError for malformed frames."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not JSON ({exc}): {str(text)[:80]!r}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame={str(text)[:80]!r}: expected a JSON object")
    event = msg.get("event")
    if event == "media":
        # The hot path (50 frames a second per call): plain lookups first, the checks that
        # name the bad field only when something is off.
        media = msg.get("media")
        if type(media) is dict:
            payload, ts = media.get("payload"), media.get("timestamp")
            if type(payload) is str and type(ts) is str and ts.isdigit():
                return Media(payload, int(ts))
        media = _field(msg, "media", "media", dict)
        payload = _field(media, "payload", "media.media")
        try:
            ts = int(media.get("timestamp") or 0)
        except (TypeError, ValueError):
            raise ProtocolError(
                f"media.media.timestamp={media.get('timestamp')!r}: expected an integer string"
            ) from None
        return Media(payload, ts)
    if event == "mark":
        return Mark(_field(_field(msg, "mark", "mark", dict), "name", "mark.mark"))
    if event == "start":
        start = _field(msg, "start", "start", dict)
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"start.start.customParameters={params!r}: expected an object")
        stream_sid = _field(start, "streamSid", "start.start")
        if not stream_sid.isalnum():  # it is echoed into outgoing frames unescaped
            raise ProtocolError(f"start.start.streamSid={stream_sid!r}: expected letters and digits")
        return Start(
            stream_sid=stream_sid,
            call_sid=_field(start, "callSid", "start.start"),
            account_sid=str(start.get("accountSid") or ""),
            custom_parameters={str(k): str(v) for k, v in params.items()},
        )
    if event == "dtmf":
        return Dtmf(_field(_field(msg, "dtmf", "dtmf", dict), "digit", "dtmf.dtmf"))
    if event == "stop":
        return Stop()
    if event == "connected":
        return Connected(str(msg.get("protocol") or ""))
    if not isinstance(event, str):
        raise ProtocolError(f"event={event!r}: expected a string")
    return None


# Outgoing frames are built by string concatenation: base64 and Twilio SIDs need no JSON
# escaping, and this is the hottest path of the service (one media + one mark per chunk).


def media_frame(stream_sid: str, payload_b64: str) -> str:
    return '{"event":"media","streamSid":"' + stream_sid + '","media":{"payload":"' + payload_b64 + '"}}'


def mark_frame(stream_sid: str, name: str) -> str:
    return '{"event":"mark","streamSid":"' + stream_sid + '","mark":{"name":"' + name + '"}}'


def clear_frame(stream_sid: str) -> str:
    return '{"event":"clear","streamSid":"' + stream_sid + '"}'
