"""Twilio Media Streams, sans-I/O: text frames in -> typed events, outgoing frames as strings.

Protocol: https://www.twilio.com/docs/voice/media-streams/websocket-messages. Payloads stay base64 strings end to end: the shim never decodes
μ-law it only relays, it just counts bytes (8 bytes = 1 ms) from the base64 length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import orjson

MULAW_BYTES_PER_MS = 8
# A caller media payload is accepted only as canonical base64 of whole bytes: μ-law is one byte
# per sample, so any whole number of bytes is a whole number of samples. Twilio sends 20 ms
# (160-byte, 216-character) frames but does not promise the size, and the Realtime input buffer
# takes any byte count, so the shim does not insist on 160. The alphabet check is what keeps a
# crafted payload from breaking out of the JSON string it is pasted into (`"`, `\`, control
# characters are not base64): `+` and `/` become `A` with a C translate table, then ASCII
# bytes.isalnum() (25% cheaper than a precompiled regex fullmatch, measured in the README).
_PLUS_SLASH = bytes.maketrans(b"+/", b"AA")
# At most 1 s of audio in one frame (Twilio sends 20 ms); anything larger is not Twilio.
MAX_MEDIA_PAYLOAD_CHARS = 8000 * 4 // 3 + 4
# The largest frame (or reassembled message) the media listeners accept from Twilio: its frames
# are a few hundred bytes (a `start` with custom parameters a few KB); bigger ends the stream.
MAX_FRAME_BYTES = 64 * 1024
MAX_TIMESTAMP_DIGITS = 15  # ~31,000 years in ms; also keeps int() far from its digit limit


class ProtocolError(ValueError):
    """A frame that does not follow the protocol; the message names the field, the value and
    what was expected."""


def valid_payload(payload: str) -> bool:
    """True for non-empty canonical base64 of whole bytes, at most MAX_MEDIA_PAYLOAD_CHARS long."""
    n = len(payload)
    if not (0 < n <= MAX_MEDIA_PAYLOAD_CHARS and n % 4 == 0):
        return False
    data = payload.encode().translate(_PLUS_SLASH)  # non-ASCII becomes multi-byte, never alnum
    stripped = data.rstrip(b"=")
    return n - len(stripped) <= 2 and stripped.isalnum()


# The hot path (50 frames a second per call): Twilio's media frame exactly as Twilio writes it
# (https://www.twilio.com/docs/voice/media-streams/websocket-messages#media-message: these keys in
# this order, no whitespace) is matched as bytes in one C call instead of being parsed into dicts.
# Every other spelling of the same frame (key order, spaces, escapes, numbers) and every other
# event goes through `parse`, which stays the definition: the fast path accepts a subset of what
# `parse` accepts and gives the same result (tests/test_twilio_fast.py checks both by property).
# The payload group is valid_payload's alphabet (letters, digits, `+`, `/`, at most two `=` at
# the end): checked while the frame is matched, so an accepted frame is plain ASCII JSON; what
# is left to the caller is the length (parse_media_fast, Call.relay_caller_frame).
match_media_frame = re.compile(
    rb'\{"event":"media","sequenceNumber":"[0-9]{1,20}","media":\{"track":"[a-z]{1,16}","chunk":"[0-9]{1,20}",'
    rb'"timestamp":"([0-9]{1,%d})","payload":"([A-Za-z0-9+/]{1,%d}={0,2})"\},"streamSid":"[A-Za-z0-9]{1,64}"\}'
    % (MAX_TIMESTAMP_DIGITS, MAX_MEDIA_PAYLOAD_CHARS)
).fullmatch


def parse_media_fast(data: bytes) -> tuple[str, int] | None:
    """(payload, timestamp ms) of a media frame in Twilio's own shape, else None: then `parse`
    decides (a frame this returns None for may still be valid, or be rejected there)."""
    match = match_media_frame(data)
    if match is not None:
        ts, payload = match.group(1, 2)
        n = len(payload)
        if not n & 3 and n <= MAX_MEDIA_PAYLOAD_CHARS:  # valid_payload's length rule
            return payload.decode(), int(ts)
    return None


# The other frame of every chunk: the echo of the mark the shim sent after it (the shim names its
# marks with a counter: digits). Same rule as the media fast path: a subset of `parse`.
_MARK_FRAME = re.compile(
    rb'\{"event":"mark","sequenceNumber":"[0-9]{1,20}","streamSid":"[A-Za-z0-9]{1,64}","mark":\{"name":"([0-9]{1,20})"\}\}'
).fullmatch


def parse_mark_fast(data: bytes) -> str | None:
    """The name of a mark echo in Twilio's own shape with a name of digits, else None (`parse` decides)."""
    match = _MARK_FRAME(data)
    return None if match is None else match.group(1).decode()


def _timestamp(value: object) -> int:
    """Twilio's media.timestamp: ms since the stream started, as a string of ASCII digits."""
    if value is None or value == "":
        return 0
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= MAX_TIMESTAMP_DIGITS:
        return int(value)
    if type(value) is int and 0 <= value < 10**MAX_TIMESTAMP_DIGITS:
        return value
    raise ProtocolError(f"media.media.timestamp={str(value)[:40]!r}: expected a string of ASCII digits (ms)")


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
    custom_parameters: dict[str, str] = field(default_factory=dict)  # without the token
    token: str = ""  # the per-call stream token (customParameters.token): checked, never stored


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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(obj: dict, name: str, where: str, kind: type = str):
    value = obj.get(name)
    if not isinstance(value, kind):
        expected = {str: "a string", dict: "an object"}.get(kind, kind.__name__)
        raise ProtocolError(f"{where}.{name}={_short(value)}: expected {expected}")
    return value


def parse(text: str | bytes) -> TwilioEvent | None:
    """Parse one frame from Twilio. Returns None for event types this version ignores
    (forward compatibility); raises ProtocolError for malformed frames."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not JSON ({str(exc)[:80]}): {_short(text)}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame={_short(text)}: expected a JSON object")
    event = msg.get("event")
    if event == "media":
        # The hot path (50 frames a second per call): plain lookups first, the checks that
        # name the bad field only when something is off.
        media = msg.get("media")
        if type(media) is dict:
            payload, ts = media.get("payload"), media.get("timestamp")
            if type(payload) is str and type(ts) is str and ts.isdigit() and ts.isascii() and len(ts) <= MAX_TIMESTAMP_DIGITS:
                # valid_payload, inlined (one Python call fewer per frame); same rule
                n = len(payload)
                if 0 < n <= MAX_MEDIA_PAYLOAD_CHARS and not n & 3:
                    body = payload.encode().translate(_PLUS_SLASH).rstrip(b"=")
                    if n - len(body) <= 2 and body.isalnum():
                        return Media(payload, int(ts))
        media = _field(msg, "media", "media", dict)
        payload = _field(media, "payload", "media.media")
        if not valid_payload(payload):
            raise ProtocolError(
                f"media.media.payload={payload[:40]!r} ({len(payload)} characters): expected base64 of "
                f"1 to {MAX_MEDIA_PAYLOAD_CHARS * 3 // 4} bytes of μ-law (length a multiple of 4, "
                "alphabet A-Z a-z 0-9 + / and = padding)"
            )
        return Media(payload, _timestamp(media.get("timestamp")))
    if event == "mark":
        return Mark(_field(_field(msg, "mark", "mark", dict), "name", "mark.mark"))
    if event == "start":
        start = _field(msg, "start", "start", dict)
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"start.start.customParameters={_short(params)}: expected an object")
        stream_sid = _field(start, "streamSid", "start.start")
        if not (stream_sid.isascii() and stream_sid.isalnum()):  # echoed into outgoing frames unescaped
            raise ProtocolError(f"start.start.streamSid={_short(stream_sid)}: expected ASCII letters and digits")
        custom = {str(k): str(v) for k, v in params.items()}
        token = custom.pop("token", "")
        return Start(
            stream_sid=stream_sid,
            call_sid=_field(start, "callSid", "start.start"),
            account_sid=str(start.get("accountSid") or ""),
            custom_parameters=custom,
            token=token,
        )
    if event == "dtmf":
        return Dtmf(_field(_field(msg, "dtmf", "dtmf", dict), "digit", "dtmf.dtmf"))
    if event == "stop":
        return Stop()
    if event == "connected":
        return Connected(str(msg.get("protocol") or ""))
    if not isinstance(event, str):
        raise ProtocolError(f"event={_short(event)}: expected a string")
    return None


# Outgoing frames are built by string concatenation: base64 and Twilio SIDs need no JSON
# escaping, and this is the hottest path of the service (one media + one mark per chunk).


def media_frame(stream_sid: str, payload_b64: str) -> str:
    return '{"event":"media","streamSid":"' + stream_sid + '","media":{"payload":"' + payload_b64 + '"}}'


def mark_frame(stream_sid: str, name: str) -> str:
    return '{"event":"mark","streamSid":"' + stream_sid + '","mark":{"name":"' + name + '"}}'


def clear_frame(stream_sid: str) -> str:
    return '{"event":"clear","streamSid":"' + stream_sid + '"}'
