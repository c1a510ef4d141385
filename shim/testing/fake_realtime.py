"""A local stand-in for the OpenAI Realtime API (GA protocol) over WebSocket.

Faithful is checked, not assumed: every client event is validated against the GA client-event
union of the official SDK (with unknown keys reported, since the SDK models accept extras), plus the
rules the real server enforces beyond the SDK types. Every event this server sends is validated
against the GA server-event union too. Failures land in `FakeRealtime.validation_errors`; invalid
client events are also answered with an `error` event, as the real API does.

Behaviour follows https://platform.openai.com/docs/api-reference/realtime-server-events: session.created on connect,
session.update merging, an energy VAD on the input buffer (speech_started/stopped/committed, user
items, optional input transcription), audio responses paced faster than real time, response.cancel,
barge-in cancellation, conversation.item.truncate checks, and fault injection.

Assistant speech is synthesized deterministically from the reply text (a voiced buzz with formants
and a syllable envelope), in whatever output format the session has: mu-law 8 kHz for audio/pcmu,
which is what the shim must configure. A shim that forgets gets PCM 24 kHz, like the real API.

Response text rule: if `response.create` carries `response.instructions` that contain a trigger word
("say", "says", "exactly", "verbatim", "word for word") followed later by text in double quotes
(straight "..." or curly “...”), the LAST quoted string is spoken; otherwise the next
`Script.replies` entry. This is how the shim asks for a word-for-word greeting.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import math
import re
import secrets
import time
import warnings
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np
import orjson
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from shim.testing._sync import Changes

with warnings.catch_warnings():  # deprecated in 3.11-3.12; audioop-lts provides it on 3.13+
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["CLIENT", "SERVER", "FakeRealtime", "FakeSession", "Script", "find_extras", "synthesize_speech"]

# The SDK's PropertyInfo(discriminator=...) is invisible to pydantic; add a real one (fast, and
# errors name the offending member instead of all 46).
CLIENT: TypeAdapter[Any] = TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])
SERVER: TypeAdapter[Any] = TypeAdapter(Annotated[RealtimeServerEvent, Field(discriminator="type")])

# Keys the real server sends that the SDK's session-request model does not declare.
_SERVER_EXTRAS_ALLOWED = frozenset({"session.id", "session.object", "session.expires_at"})

_DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. Act like a human, "
    "but remember that you aren't a human and that you can't do human things in the real world."
)
_FRAME_MS = 20
_COMMIT_MIN_MS = 100
_SEMANTIC_VAD_SILENCE_MS = 500
_SPEECH_START_FRAMES = 2


def find_extras(m: BaseModel, path: str = "") -> list[str]:
    """SDK models use extra='allow', so unknown (e.g. beta-era) keys validate silently. List them."""
    out = [f"{path}.{k}".lstrip(".") for k in (m.model_extra or {})]
    for name in type(m).model_fields:
        v = getattr(m, name)
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(x, BaseModel):
                out += find_extras(x, f"{path}.{name}" + (f"[{i}]" if isinstance(v, list) else ""))
    return out


def calls(*functions: tuple[str, dict[str, Any]], say: str = "") -> dict[str, Any]:
    """A scripted reply that calls functions: `Script(replies=[calls(("lookup", {"id": 1}))])`,
    optionally saying something first (`say=`)."""
    return {"say": say, "calls": [{"name": name, "arguments": args} for name, args in functions]}


@dataclass
class Script:
    """What the stand-in model "says" and how it behaves; one Script serves every session."""

    replies: list[str] = field(default_factory=list)
    """Text of successive VAD-triggered / plain response.create replies (last one reused, else "Okay.")."""
    user_transcripts: list[str] = field(default_factory=list)
    """Input transcription of successive committed user turns; exhausted -> "(inaudible)"."""
    audio_ms_per_char: float = 55.0
    delta_ms: int = 100
    generation_speed: float = 8.0
    """Deltas are emitted this many times faster than real time (0 = as fast as possible)."""
    vad_threshold_rms: float = 500.0
    """16-bit RMS above which a 20 ms frame is voiced (scaled by turn_detection.threshold / 0.5)."""
    require_api_key: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Unused: script function calls as `replies` entries made with `calls(...)`."""
    drop_after_responses: int | None = None
    """Close the socket with 1011 right after this many responses completed (model socket loss)."""
    stall_after_responses: int | None = None
    """The response after this many completed ones sends two chunks, then nothing: the socket stays
    open and answers pings (a model that went silent mid-answer)."""
    faulty_sessions: int | None = None
    """Only the first this many sessions drop or stall as above (None: every session), so a
    reconnected session behaves."""
    session_max_s: float | None = None
    """The session's time limit (the API's is 60 minutes): announced in session.expires_at, and
    the socket is closed with 1001 when it is reached, as the API does."""
    refuse_connections: frozenset[int] = frozenset()
    """Connection attempts (1-based, counted over the server's life) answered with HTTP 503."""
    network_delay_ms: float = 0.0
    """One network round trip, injected (0 = loopback): the opening handshake costs
    `handshake_round_trips` of them, and every event travels half of one each way, in order and
    pipelined (a reply to a client event arrives one round trip after it was sent). `sent` lists
    an event when it leaves the server, half a round trip before the client has it."""
    handshake_round_trips: int = 3
    """TCP connect, TLS 1.3, HTTP upgrade (wss:// to the real API)."""


# --------------------------------------------------------------------------------------------
# Audio


@dataclass(frozen=True)
class _Codec:
    """One of the GA audio formats, as bytes <-> 16-bit linear PCM at `rate`."""

    type: str
    rate: int
    width: int  # bytes per sample on the wire

    @property
    def bytes_per_ms(self) -> float:
        return self.rate * self.width / 1000

    def to_linear(self, data: bytes) -> bytes:
        if self.type == "audio/pcmu":
            return audioop.ulaw2lin(data, 2)
        if self.type == "audio/pcma":
            return audioop.alaw2lin(data, 2)
        return data

    def from_linear(self, pcm: bytes) -> bytes:
        if self.type == "audio/pcmu":
            return audioop.lin2ulaw(pcm, 2)
        if self.type == "audio/pcma":
            return audioop.lin2alaw(pcm, 2)
        return pcm


def _codec(fmt: dict[str, Any] | None) -> _Codec:
    kind = (fmt or {}).get("type") or "audio/pcm"
    if kind in ("audio/pcmu", "audio/pcma"):
        return _Codec(kind, 8000, 1)
    return _Codec("audio/pcm", 24000, 2)


@functools.lru_cache(maxsize=128)
def synthesize_speech(text: str, ms_per_char: float = 55.0, rate: int = 8000) -> bytes:
    """Deterministic speech-like 16-bit PCM for `text`: len(text) * ms_per_char long.

    A glottal buzz (~110-140 Hz, gently gliding) shaped by two formant resonances that move per
    syllable, with ~4 syllables per second and peaks at -16 dBFS. It is meant to look like speech to
    an energy VAD and to sound vaguely voice-like in a WAV, nothing more.
    """
    n = round(len(text) * ms_per_char * rate / 1000)
    if n <= 0:
        return b""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    t = np.arange(n) / rate
    f0 = 125 + 12 * np.sin(2 * np.pi * 0.6 * t + rng.uniform(0, 2 * np.pi)) - 10 * t / max(t[-1], 1e-9)
    phase = 2 * np.pi * np.cumsum(f0) / rate

    # Syllables of 180-320 ms: a raised-sine envelope over ~85 % of each, with its own vowel.
    env = np.zeros(n)
    f1 = np.empty(n)
    f2 = np.empty(n)
    start = 0
    while start < n:
        length = int(rate * rng.uniform(0.18, 0.32))
        stop = min(n, start + length)
        voiced = max(1, int((stop - start) * 0.85))
        x = np.linspace(0, 1, voiced, endpoint=False)
        env[start : start + voiced] = np.sin(np.pi * x) ** 1.5 * rng.uniform(0.6, 1.0)
        f1[start:stop] = rng.uniform(350, 800)
        f2[start:stop] = rng.uniform(1000, 2300)
        start = stop
    kernel = np.ones(max(1, rate // 100)) / max(1, rate // 100)  # 10 ms: glide between vowels
    f1 = np.convolve(f1, kernel, mode="same")
    f2 = np.convolve(f2, kernel, mode="same")

    signal = np.zeros(n)
    for k in range(1, int(3400 / 110) + 1):
        freq = k * f0
        gain = (np.exp(-(((freq - f1) / 120) ** 2)) + 0.6 * np.exp(-(((freq - f2) / 200) ** 2)) + 0.02) / k**0.5
        gain[freq >= min(3400, rate / 2 - 100)] = 0.0  # stay inside the telephone band
        signal += gain * np.sin(k * phase)
    signal += 0.05 * rng.standard_normal(n)  # a little breath noise
    signal *= env
    peak = np.abs(signal).max()
    if peak > 0:
        signal *= 10 ** (-16 / 20) * 32767 / peak
    return signal.astype("<i2").tobytes()


# --------------------------------------------------------------------------------------------
# Small helpers


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(11)[:21]}"


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """session.update semantics: only present keys change, null clears, lists replace.

    A nested object whose "type" changes (audio format, turn detection) replaces the old one
    instead of merging, so {"type": "audio/pcmu"} does not inherit "rate" from audio/pcm.
    """
    out = dict(base)
    for key, value in patch.items():
        current = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(current, dict)
            and value.get("type", current.get("type")) == current.get("type")
        ):
            out[key] = _merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill_session_defaults(session: dict[str, Any]) -> None:
    """The server echoes effective values, so fill what a partial turn_detection leaves unset."""
    audio_in = (session.get("audio") or {}).get("input") or {}
    td = audio_in.get("turn_detection")
    if isinstance(td, dict):
        if td.get("type") == "server_vad":
            defaults: dict[str, Any] = {
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 500,
                "idle_timeout_ms": None,
            }
        else:
            defaults = {"eagerness": "auto"}
        for key, value in {**defaults, "create_response": True, "interrupt_response": True}.items():
            td.setdefault(key, value)


_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_TRIGGER = re.compile(r"\b(say|says|exactly|verbatim|word for word)\b", re.IGNORECASE)


def _quoted_text(instructions: str | None) -> str | None:
    """The last double-quoted string after a trigger word ("say", "exactly", ...), if any."""
    if not instructions:
        return None
    trigger = _TRIGGER.search(instructions)
    if trigger is None:
        return None
    quotes = [m.group(1) or m.group(2) for m in _QUOTED.finditer(instructions, trigger.end())]
    quotes = [q.strip() for q in quotes if q.strip()]
    return quotes[-1] if quotes else None


class _ClientError(Exception):
    """A client event the real server would reject; becomes an `error` event."""

    def __init__(self, code: str | None, message: str, param: str | None = None, *, invalid: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.invalid = invalid  # a protocol violation (recorded in validation_errors), not a state error


def _loc_to_param(loc: tuple[Any, ...], event_type: str) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if i == 0 and p == event_type:
            continue  # the discriminator tag
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and not re.fullmatch(r"[A-Z][A-Za-z0-9]*", p):  # skip union member names
            parts.append(("." if parts else "") + p)
    return "".join(parts)


def _validation_error_to_client_error(exc: ValidationError, raw: dict[str, Any]) -> _ClientError:
    err = exc.errors()[0]
    event_type = str(raw.get("type"))
    if err["type"] == "union_tag_invalid" or "type" not in raw:
        return _ClientError("invalid_value", f"Invalid value: '{raw.get('type')}'. Unknown event type.", "type")
    param = _loc_to_param(err["loc"], event_type)
    if err["type"] == "missing":
        return _ClientError("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    return _ClientError("invalid_value", f"Invalid value for '{param}': {err['msg']}.", param)


def _check_formats(raw: dict[str, Any], prefix: str) -> None:
    """Server rules the SDK types do not enforce for audio formats."""
    for direction in ("input", "output"):
        conf = (raw.get("audio") or {}).get(direction)
        if not isinstance(conf, dict) or "format" not in conf:
            continue
        path = f"{prefix}.audio.{direction}.format"
        fmt = conf["format"]
        if fmt is None:
            raise _ClientError(
                "invalid_type", f"Invalid type for '{path}': expected an object, but got null instead.", path
            )
        if isinstance(fmt, dict) and fmt.get("type") == "audio/pcm" and "rate" not in fmt:
            raise _ClientError(
                "missing_required_parameter", f"Missing required parameter: '{path}.rate'.", f"{path}.rate"
            )


def _validate_client_event(raw: dict[str, Any]) -> BaseModel:
    """Raise _ClientError for anything the real server would reject at parse time."""
    try:
        model: BaseModel = CLIENT.validate_python(raw)
    except ValidationError as exc:
        raise _validation_error_to_client_error(exc, raw) from None
    extras = find_extras(model)
    if extras:
        raise _ClientError("unknown_parameter", f"Unknown parameter: '{extras[0]}'.", extras[0])
    event_type = raw["type"]
    if event_type == "session.update":
        session = raw["session"]
        if session.get("type") != "realtime":
            raise _ClientError(
                "invalid_value",
                f"Invalid value: '{session.get('type')}'. This is a realtime session; "
                "'session.type' must be 'realtime'.",
                "session.type",
            )
        _check_formats(session, "session")
        if set(session.get("output_modalities") or []) == {"text", "audio"}:
            raise _ClientError(
                "invalid_value",
                "Invalid value for 'session.output_modalities': use either ['audio'] or ['text'].",
                "session.output_modalities",
            )
    elif event_type == "response.create" and isinstance(raw.get("response"), dict):
        _check_formats(raw["response"], "response")
    return model


# --------------------------------------------------------------------------------------------
# Sessions


@dataclass
class _Response:
    id: str
    text: str
    modality: Literal["audio", "text"]
    codec: _Codec
    metadata: dict[str, Any] | None
    after_created: list[dict[str, Any]]
    item_id: str = field(default_factory=lambda: _new_id("item"))
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str | None = None
    task: asyncio.Task[None] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)  # scripted function calls


@dataclass
class _Vad:
    """Per-connection energy VAD state (20 ms frames on the input-buffer timeline)."""

    remainder: bytearray = field(default_factory=bytearray)
    voiced_run: int = 0
    candidate_start_ms: float = 0.0
    speaking: bool = False
    silence_ms: float = 0.0
    start_ms: float = 0.0
    item_id: str = ""

    def reset(self) -> None:
        self.remainder.clear()
        self.voiced_run = 0
        self.speaking = False
        self.silence_ms = 0.0


class FakeSession:
    """One accepted Realtime connection: its protocol state and everything it saw and sent."""

    def __init__(self, server: FakeRealtime, ws: ServerConnection, model: str, headers: dict[str, str]):
        self._server = server
        self._ws = ws
        self._script = server.script
        self.model = model
        self.headers = headers
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.audio_in = bytearray()
        self.audio_out: dict[str, bytearray] = {}
        self.truncations: list[dict[str, Any]] = []
        self.function_calls: list[dict[str, Any]] = []  # function_call items this server produced
        self.closed = asyncio.Event()
        self.conversation_id = _new_id("conv")
        self.session: dict[str, Any] = {
            "type": "realtime",
            "object": "realtime.session",
            "id": _new_id("sess"),
            "model": model,
            "output_modalities": ["audio"],
            "instructions": _DEFAULT_INSTRUCTIONS,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": int(time.time() + (server.script.session_max_s or 3600)),
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": {"type": "server_vad"},
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
            },
            "include": None,
        }
        _fill_session_defaults(self.session)
        self._changes = Changes()
        self._items: dict[str, dict[str, Any]] = {}  # conversation items by id, in order
        self._item_ms_per_byte: dict[str, float] = {}  # assistant item -> output timeline scale
        self._active: _Response | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._vad = _Vad()
        self._in_ms = 0.0  # input-buffer timeline: ms of audio appended so far
        self._buffer_ms = 0.0  # uncommitted audio
        self._reply_index = 0
        self._transcript_index = 0
        self._responses_completed = 0
        self.number = len(server.sessions) + 1  # 1-based, in the order sessions were accepted
        faulty = server.script.faulty_sessions
        self.faulty = faulty is None or self.number <= faulty
        self._audio_output_started = False
        self._tokens_in_context = 0
        self._half_rtt_s = self._script.network_delay_ms / 2000
        self._downlink: asyncio.Queue[tuple[float, bytes]] | None = asyncio.Queue() if self._half_rtt_s > 0 else None

    # ---- public API -------------------------------------------------------------------

    def events_of(self, type_: str) -> list[dict[str, Any]]:
        """Received client events of one type, in order."""
        return [e for e in self.received if e.get("type") == type_]

    async def wait_for(self, type_: str, timeout: float = 5, count: int = 1) -> dict[str, Any]:
        """Wait until `count` client events of `type_` were received; return the latest one."""
        await self._changes.wait_until(
            lambda: len(self.events_of(type_)) >= count,
            timeout,
            lambda: f"{count} x {type_!r} (got {len(self.events_of(type_))}; "
            f"received types: {[e.get('type') for e in self.received][-20:]})",
        )
        return self.events_of(type_)[-1]

    async def wait_sent(self, type_: str, timeout: float = 5, count: int = 1) -> dict[str, Any]:
        """Wait until this server has sent `count` events of `type_`; return the latest one."""

        def sent_of() -> list[dict[str, Any]]:
            return [e for e in self.sent if e.get("type") == type_]

        await self._changes.wait_until(lambda: len(sent_of()) >= count, timeout, lambda: f"{count} sent {type_!r}")
        return sent_of()[-1]

    async def send(self, event: dict[str, Any], *, validate: bool = True) -> None:
        """Send a server event (fault injection). It is validated like every other one unless
        `validate=False`, for deliberately malformed events."""
        event = dict(event)
        event.setdefault("event_id", _new_id("event"))
        if validate:
            self._validate_server_event(event)
        data = orjson.dumps(event)
        if self._ws.state is State.OPEN:  # the frame is written synchronously: `sent` is wire order
            self.sent.append(orjson.loads(data))  # a snapshot: items are mutated as responses progress
            self._changes.notify()
        if self._downlink is not None:  # network_delay_ms: on the wire half a round trip from now
            self._downlink.put_nowait((asyncio.get_running_loop().time() + self._half_rtt_s, data))
            return
        await self._ws.send(data, text=True)

    async def close(self, code: int = 1011, reason: str = "") -> None:
        """Drop the connection (fault injection)."""
        await self._ws.close(code, reason)

    def reset(self) -> None:
        """Drop the TCP connection without a close frame (a reset, a network drop: 1006)."""
        self._ws.transport.abort()

    # ---- connection lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.headers.get("openai-beta"):
                # The beta protocol is switched off server-side (GA endpoints refuse beta clients).
                self._server.validation_errors.append("handshake: OpenAI-Beta header (beta protocol)")
                await self._error(
                    "beta_api_shape_disabled", "The beta Realtime API shape is no longer supported.", None, None
                )
                await self._ws.close(4000, "invalid_request_error.beta_api_shape_disabled")
                return
            if self._downlink is not None:
                self._tasks.add(asyncio.create_task(self._deliver()))
            await self.send({"type": "session.created", "session": self.session})
            if self._script.session_max_s is not None:
                self._spawn_expiry(self._script.session_max_s)
            async for message in self._incoming():
                await self._on_message(message)
                await asyncio.sleep(0)  # a burst of client events must not starve a running response
        except ConnectionClosed:
            pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self.closed.set()
            self._changes.notify()

    def _spawn_expiry(self, after_s: float) -> None:
        async def expire() -> None:
            await asyncio.sleep(after_s)
            # What the GA API does at its 60-minute cap (observed): a close 1001 with this reason.
            await self._ws.close(1001, "Your session hit the maximum duration of 60 minutes.")

        task = asyncio.get_running_loop().create_task(expire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _incoming(self):
        """Client messages, each handed over half a round trip after it arrived (network_delay_ms)."""
        if self._downlink is None:
            async for message in self._ws:
                yield message
            return
        loop = asyncio.get_running_loop()
        uplink: asyncio.Queue[tuple[float, str | bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for message in self._ws:
                    uplink.put_nowait((loop.time() + self._half_rtt_s, message))
            except ConnectionClosed:
                pass
            finally:
                uplink.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await uplink.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] - loop.time()))
                yield item[1]
        finally:
            reader.cancel()

    async def _deliver(self) -> None:
        """The downlink of network_delay_ms: server events leave in order, each when it is due."""
        assert self._downlink is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await self._downlink.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._ws.send(data, text=True)
        except ConnectionClosed:
            pass

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._server.validation_errors.append("client <binary frame>: client events must be text frames")
            await self._error("invalid_json", "Binary frames are not supported; send JSON text.", None, None)
            return
        try:
            raw = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            self._server.validation_errors.append(f"client <invalid json>: {exc}")
            await self._error("invalid_json", "We could not parse the JSON body of your request.", None, None)
            return
        if not isinstance(raw, dict):
            self._server.validation_errors.append("client <not an object>: expected a JSON object")
            await self._error("invalid_json", "Expected a JSON object.", None, None)
            return
        self.received.append(raw)
        self._changes.notify()
        event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
        try:
            _validate_client_event(raw)
            handler = getattr(self, "_on_" + str(raw["type"]).replace(".", "_"))
            await handler(raw)
        except _ClientError as err:
            if err.invalid:
                self._server.validation_errors.append(f"client {raw.get('type')}: {err.code}: {err.message}")
            await self._error(err.code, err.message, err.param, event_id)
        except ConnectionClosed:
            raise
        except Exception as exc:  # a bug in the stand-in: record it, answer like a server fault
            self._server.validation_errors.append(f"server <internal>: handling {raw.get('type')}: {exc!r}")
            await self.send(
                {
                    "type": "error",
                    "error": {"type": "server_error", "code": None, "message": "The server had an error",
                              "param": None, "event_id": event_id},
                }
            )

    # ---- emitting -------------------------------------------------------------------

    def _validate_server_event(self, event: dict[str, Any]) -> None:
        try:
            model = SERVER.validate_python(event)
        except ValidationError as exc:
            self._server.validation_errors.append(f"server {event.get('type')}: {exc}")
            return
        extras = [x for x in find_extras(model) if x not in _SERVER_EXTRAS_ALLOWED]
        if extras:
            self._server.validation_errors.append(f"server {event.get('type')}: unknown keys {extras}")

    async def _error(self, code: str | None, message: str, param: str | None, event_id: str | None) -> None:
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
        await self.send({"type": "error", "error": {**error, "event_id": event_id}})

    # ---- session ----------------------------------------------------------------------

    async def _on_session_update(self, raw: dict[str, Any]) -> None:
        patch = raw["session"]
        merged = _merge(self.session, patch)
        _fill_session_defaults(merged)
        old_voice = self.session["audio"]["output"].get("voice")
        new_voice = ((merged.get("audio") or {}).get("output") or {}).get("voice")
        if self._audio_output_started and new_voice != old_voice:
            raise _ClientError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
                invalid=False,
            )
        old_td = self._turn_detection()
        self.session = merged
        if self._turn_detection() != old_td:
            self._vad.reset()
        await self.send({"type": "session.updated", "session": self.session})

    def _audio_conf(self, direction: str) -> dict[str, Any]:
        return (self.session.get("audio") or {}).get(direction) or {}

    def _turn_detection(self) -> dict[str, Any] | None:
        td = self._audio_conf("input").get("turn_detection")
        return td if isinstance(td, dict) else None

    # ---- input audio / VAD ------------------------------------------------------------

    async def _on_input_audio_buffer_append(self, raw: dict[str, Any]) -> None:
        try:
            chunk = base64.b64decode(raw["audio"], validate=True)
        except ValueError:
            raise _ClientError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio.", "audio") from None
        codec = _codec(self._audio_conf("input").get("format"))
        self.audio_in += chunk
        base_ms = self._in_ms
        self._in_ms += len(chunk) / codec.bytes_per_ms
        self._buffer_ms += len(chunk) / codec.bytes_per_ms
        td = self._turn_detection()
        if td is None:
            return
        vad = self._vad
        frame_bytes = int(codec.bytes_per_ms * _FRAME_MS)
        data = bytes(vad.remainder) + chunk
        pos_ms = base_ms - len(vad.remainder) / codec.bytes_per_ms
        threshold = self._script.vad_threshold_rms
        if td.get("type") == "server_vad" and td.get("threshold") is not None:
            threshold *= float(td["threshold"]) / 0.5  # higher threshold needs louder audio
        offset = 0
        while offset + frame_bytes <= len(data):
            frame = data[offset : offset + frame_bytes]
            offset += frame_bytes
            voiced = audioop.rms(codec.to_linear(frame), 2) > threshold
            await self._vad_frame(td, voiced, pos_ms)
            pos_ms += _FRAME_MS
        vad.remainder = bytearray(data[offset:])

    async def _vad_frame(self, td: dict[str, Any], voiced: bool, frame_start_ms: float) -> None:
        vad = self._vad
        if not vad.speaking:
            if not voiced:
                vad.voiced_run = 0
                return
            vad.voiced_run += 1
            if vad.voiced_run == 1:
                vad.candidate_start_ms = frame_start_ms
            if vad.voiced_run < _SPEECH_START_FRAMES:
                return
            vad.speaking = True
            vad.silence_ms = 0.0
            vad.start_ms = vad.candidate_start_ms
            vad.item_id = _new_id("item")
            padding = td.get("prefix_padding_ms")
            padding = 300 if padding is None else int(padding)
            await self.send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": max(0, int(vad.start_ms) - padding),
                    "item_id": vad.item_id,
                }
            )
            if self._active is not None and td.get("interrupt_response", True):
                await self._cancel_active("turn_detected")
            return
        if voiced:
            vad.silence_ms = 0.0
            return
        vad.silence_ms += _FRAME_MS
        if td.get("type") == "server_vad":
            needed = td.get("silence_duration_ms")
            needed = 500 if needed is None else int(needed)
        else:
            needed = _SEMANTIC_VAD_SILENCE_MS
        if vad.silence_ms < needed:
            return
        vad.speaking = False
        vad.voiced_run = 0
        end_ms = frame_start_ms + _FRAME_MS
        await self.send(
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(end_ms), "item_id": vad.item_id}
        )
        self._buffer_ms = max(0.0, self._in_ms - end_ms)
        completed = await self._commit_user_item(vad.item_id, (end_ms - vad.start_ms) / 1000)
        if td.get("create_response", True) and self._active is None:
            await self._start_response(self._next_reply(), after_created=completed)
        else:
            for event in completed:
                await self.send(event)

    async def _commit_user_item(self, item_id: str, seconds: float) -> list[dict[str, Any]]:
        """committed + the user item; returns the transcription.completed event(s) still to send."""
        previous = self._last_item_id()
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._items[item_id] = item
        self._tokens_in_context += int(seconds * 10) + 1
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})
        if not self._audio_conf("input").get("transcription"):
            return []
        transcript = self._next_transcript()
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item_id,
                "content_index": 0,
                "delta": transcript,
            }
        )
        # Sent by the caller of this method: after the first reply delta when a response follows,
        # mimicking the real asynchronous ASR whose transcript trails the start of the reply.
        return [
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": transcript,
                "usage": {"type": "duration", "seconds": round(max(seconds, 0.0), 3)},
            }
        ]

    async def _on_input_audio_buffer_commit(self, raw: dict[str, Any]) -> None:
        if self._buffer_ms < _COMMIT_MIN_MS:
            raise _ClientError(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer too small. Expected at least {_COMMIT_MIN_MS}ms "
                f"of audio, but buffer only has {self._buffer_ms:.2f}ms of audio.",
                None,
                invalid=False,
            )
        seconds = self._buffer_ms / 1000
        item_id = self._vad.item_id if self._vad.speaking else _new_id("item")
        self._vad.reset()
        self._buffer_ms = 0.0
        for event in await self._commit_user_item(item_id, seconds):
            await self.send(event)

    async def _on_input_audio_buffer_clear(self, raw: dict[str, Any]) -> None:
        self._vad.reset()
        self._buffer_ms = 0.0
        await self.send({"type": "input_audio_buffer.cleared"})

    # ---- conversation items -----------------------------------------------------------

    def _last_item_id(self) -> str | None:
        return next(reversed(self._items), None)

    def _find_item(self, item_id: str) -> dict[str, Any]:
        item = self._items.get(item_id)
        if item is None:
            raise _ClientError(
                "invalid_value", f"Conversation item with id '{item_id}' not found.", "item_id", invalid=False
            )
        return item

    async def _on_conversation_item_create(self, raw: dict[str, Any]) -> None:
        item = copy.deepcopy(raw["item"])
        item.setdefault("id", _new_id("item"))
        item.setdefault("object", "realtime.item")
        item.setdefault("status", "completed")
        if item["id"] in self._items:
            raise _ClientError(
                "invalid_value", f"Item with id '{item['id']}' already exists.", "item.id", invalid=False
            )
        if item.get("type") == "function_call_output" and not any(
            i.get("type") == "function_call" and i.get("call_id") == item.get("call_id") for i in self._items.values()
        ):
            # The API checks that the call being answered exists in this session's conversation
            # (https://github.com/livekit/agents/issues/3344: code invalid_tool_call_id).
            raise _ClientError("invalid_tool_call_id", f"Tool call ID '{item.get('call_id')}' not found in conversation.",
                               None, invalid=False)
        previous = raw.get("previous_item_id")
        if previous not in (None, "root"):
            self._find_item(previous)
        previous = self._last_item_id() if previous is None else (None if previous == "root" else previous)
        self._items[item["id"]] = item
        self._tokens_in_context += 20
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    async def _on_conversation_item_delete(self, raw: dict[str, Any]) -> None:
        self._find_item(raw["item_id"])
        del self._items[raw["item_id"]]
        await self.send({"type": "conversation.item.deleted", "item_id": raw["item_id"]})

    async def _on_conversation_item_retrieve(self, raw: dict[str, Any]) -> None:
        await self.send({"type": "conversation.item.retrieved", "item": self._find_item(raw["item_id"])})

    async def _on_conversation_item_truncate(self, raw: dict[str, Any]) -> None:
        self.truncations.append(raw)
        item_id, end_ms = raw["item_id"], raw["audio_end_ms"]
        item = self._find_item(item_id)
        if item.get("role") != "assistant" or item_id not in self.audio_out:
            raise _ClientError(
                "invalid_value", f"Item '{item_id}' is not an assistant message with audio.", "item_id", invalid=False
            )
        if raw["content_index"] != 0:
            raise _ClientError("invalid_value", "Invalid 'content_index': only 0 is supported.", "content_index")
        if end_ms < 0:
            raise _ClientError(
                "integer_below_min_value",
                "Invalid 'audio_end_ms': integer below minimum value. "
                f"Expected a value >= 0, but got {end_ms} instead.",
                "audio_end_ms",
            )
        duration_ms = int(len(self.audio_out[item_id]) * self._item_ms_per_byte[item_id])
        if end_ms > duration_ms:
            # The real server uses a null code here (observed on the GA API); "invalid_value" is the closest.
            raise _ClientError(
                "invalid_value",
                f"Audio content of {duration_ms}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
                invalid=False,
            )
        for part in item.get("content", []):
            part["transcript"] = None  # "deletes the server-side text transcript" (the conversation.item.truncate reference)
        await self.send(
            {"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0, "audio_end_ms": end_ms}
        )

    async def _on_output_audio_buffer_clear(self, raw: dict[str, Any]) -> None:
        raise _ClientError(
            "invalid_value", "output_audio_buffer.clear is only supported for WebRTC and SIP connections.", "type"
        )

    # ---- responses --------------------------------------------------------------------

    def _next_reply(self) -> str | dict[str, Any]:
        replies = self._script.replies
        if not replies:
            return "Okay."
        text = replies[min(self._reply_index, len(replies) - 1)]
        self._reply_index += 1
        return text

    def _next_transcript(self) -> str:
        transcripts = self._script.user_transcripts
        if self._transcript_index >= len(transcripts):
            return "(inaudible)"
        self._transcript_index += 1
        return transcripts[self._transcript_index - 1]

    async def _on_response_create(self, raw: dict[str, Any]) -> None:
        if self._active is not None:
            raise _ClientError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self._active.id}. "
                "Wait until the response is finished before creating a new one.",
                None,
                invalid=False,
            )
        params = raw.get("response") or {}
        text = _quoted_text(params.get("instructions")) or self._next_reply()
        await self._start_response(text, params=params)

    async def _on_response_cancel(self, raw: dict[str, Any]) -> None:
        active = self._active
        wanted = raw.get("response_id")
        if active is None or (wanted is not None and wanted != active.id):
            raise _ClientError(
                "response_cancel_not_active", "Cancellation failed: no active response found.", None, invalid=False
            )
        await self._cancel_active("client_cancelled")

    async def _cancel_active(self, reason: str) -> None:
        """Stop the active response and wait until its closing events were sent (deterministic order)."""
        response = self._active
        if response is None or response.task is None:
            return
        response.cancel_reason = reason
        response.cancel.set()
        await asyncio.wait({response.task})

    async def _start_response(
        self,
        text: str,
        *,
        params: dict[str, Any] | None = None,
        after_created: list[dict[str, Any]] | None = None,
    ) -> None:
        params = params or {}
        modalities = params.get("output_modalities") or self.session.get("output_modalities") or ["audio"]
        fmt = ((params.get("audio") or {}).get("output") or {}).get("format")
        fmt = fmt or self._audio_conf("output").get("format")
        calls: list[dict[str, Any]] = []
        if isinstance(text, dict):  # a scripted function-calling reply: {"say": "...", "calls": [...]}
            calls = list(text.get("calls") or [])
            text = str(text.get("say") or "")
        response = _Response(
            id=_new_id("resp"),
            text=text,
            calls=calls,
            modality="text" if modalities == ["text"] else "audio",
            codec=_codec(fmt),
            metadata=params.get("metadata"),
            after_created=after_created or [],
        )
        self._active = response
        response.task = asyncio.create_task(self._run_response(response))
        self._tasks.add(response.task)
        response.task.add_done_callback(self._tasks.discard)

    def _response_object(self, r: _Response, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": r.id,
            "object": "realtime.response",
            "status": status,
            "status_details": None,
            "output": output,
            "conversation_id": self.conversation_id,
            "output_modalities": [r.modality],
            "max_output_tokens": self.session.get("max_output_tokens", "inf"),
            "audio": {
                "output": {
                    "format": self._audio_conf("output").get("format"),
                    "voice": self._audio_conf("output").get("voice"),
                }
            },
            "usage": None,
            "metadata": r.metadata,
        }
        return obj

    async def _run_response(self, r: _Response) -> None:
        try:
            await self._generate(r)
        except ConnectionClosed:
            return
        except Exception as exc:  # a bug in the stand-in: make the test fail loudly
            self._server.validation_errors.append(f"server <internal>: response {r.id}: {exc!r}")
            raise
        finally:
            if self._active is r:
                self._active = None
        if (
            self._script.drop_after_responses is not None
            and self._responses_completed >= self._script.drop_after_responses
            and self.faulty
        ):
            await self._ws.close(1011, "Internal server error")  # model socket loss

    async def _function_calls(self, r: _Response, output: list[dict[str, Any]]) -> None:
        """A scripted reply may call functions: each becomes a function_call item, streamed the
        way the API does (added, arguments delta/done, item done)."""
        for call in r.calls:
            if r.cancel.is_set():
                return
            index = len(output)
            args = orjson.dumps(call.get("arguments") or {}).decode()
            item: dict[str, Any] = {
                "id": _new_id("item"), "object": "realtime.item", "type": "function_call", "status": "in_progress",
                "call_id": _new_id("call"), "name": call["name"], "arguments": "",
            }
            previous = self._last_item_id()
            self._items[item["id"]] = item
            ids = {"response_id": r.id, "item_id": item["id"], "output_index": index, "call_id": item["call_id"]}
            await self.send({"type": "response.output_item.added", "response_id": r.id, "output_index": index, "item": dict(item)})
            await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": dict(item)})
            await self.send({"type": "response.function_call_arguments.delta", **ids, "delta": args})
            await self.send({"type": "response.function_call_arguments.done", **ids, "name": call["name"], "arguments": args})
            item.update(status="completed", arguments=args)
            await self.send({"type": "response.output_item.done", "response_id": r.id, "output_index": index, "item": dict(item)})
            await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": dict(item)})
            self.function_calls.append(dict(item))
            output.append(item)

    async def _flush_after_created(self, r: _Response) -> None:
        while r.after_created:
            await self.send(r.after_created.pop(0))

    async def _generate(self, r: _Response) -> None:
        ids = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.created", "response": self._response_object(r, "in_progress", [])})
        await self.send(
            {
                "type": "rate_limits.updated",
                "rate_limits": [
                    {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
                    {"name": "tokens", "limit": 40000, "remaining": 35000, "reset_seconds": 7.5},
                ],
            }
        )
        output: list[dict[str, Any]] = []
        said, cancelled, audio_mode = "", False, r.modality == "audio"
        if r.text:
            previous = self._last_item_id()
            item: dict[str, Any] = {
                "id": r.item_id,
                "object": "realtime.item",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._items[r.item_id] = item
            await self.send({"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item})
            await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
            audio_mode = r.modality == "audio"
            part_type = "audio" if audio_mode else "text"
            empty_part = {"type": "audio", "transcript": ""} if audio_mode else {"type": "text", "text": ""}
            await self.send({"type": "response.content_part.added", **ids, "part": empty_part})

            # Audio and text are cut into delta_ms slices; the transcript advances with the audio.
            pcm = synthesize_speech(r.text, self._script.audio_ms_per_char, r.codec.rate)
            audio = r.codec.from_linear(pcm) if audio_mode else b""
            total_ms = len(r.text) * self._script.audio_ms_per_char
            n_chunks = max(1, math.ceil(total_ms / self._script.delta_ms))
            chunk_bytes = int(r.codec.bytes_per_ms * self._script.delta_ms)
            if audio_mode:
                self.audio_out[r.item_id] = bytearray()
                self._item_ms_per_byte[r.item_id] = 1 / r.codec.bytes_per_ms
            speed = self._script.generation_speed
            interval = self._script.delta_ms / 1000 / speed if speed else 0.0
            loop = asyncio.get_running_loop()
            started = loop.time()
            said = ""
            for i in range(n_chunks):
                if r.cancel.is_set():
                    break
                stall = self._script.stall_after_responses
                if stall is not None and i == 2 and self._responses_completed >= stall and self.faulty:
                    await r.cancel.wait()  # silent until the response is cancelled or the socket closes
                    break
                piece = r.text[round(i * len(r.text) / n_chunks) : round((i + 1) * len(r.text) / n_chunks)]
                if audio_mode:
                    if piece:
                        await self.send({"type": "response.output_audio_transcript.delta", **ids, "delta": piece})
                    said += piece
                    data = audio[i * chunk_bytes : (i + 1) * chunk_bytes]
                    if data:
                        self.audio_out[r.item_id] += data
                        self._audio_output_started = True
                        await self.send(
                            {"type": "response.output_audio.delta", **ids, "delta": base64.b64encode(data).decode()}
                        )
                else:
                    if piece:
                        await self.send({"type": "response.output_text.delta", **ids, "delta": piece})
                    said += piece
                await self._flush_after_created(r)  # the caller's transcript lands amid the reply
                # Pace on the loop clock (no drift); wake early on cancellation.
                delay = started + (i + 1) * interval - loop.time() if interval else 0.0
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await r.cancel.wait()
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(0)  # let the reader interleave (cancel, barge-in)

            await self._flush_after_created(r)
            cancelled = r.cancel.is_set()
            if not cancelled:
                said = r.text
            if audio_mode:
                await self.send({"type": "response.output_audio.done", **ids})
                await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": said})
                done_part: dict[str, Any] = {"type": part_type, "transcript": said}
                content = [{"type": "output_audio", "transcript": said}]
            else:
                await self.send({"type": "response.output_text.done", **ids, "text": said})
                done_part = {"type": part_type, "text": said}
                content = [{"type": "output_text", "text": said}]
            await self.send({"type": "response.content_part.done", **ids, "part": done_part})
            item.update(status="incomplete" if cancelled else "completed", content=content)
            await self.send({"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": item})
            await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})
            output.append(item)
        await self._function_calls(r, output)

        cancelled = cancelled or r.cancel.is_set()
        audio_ms = len(self.audio_out.get(r.item_id, b"")) / r.codec.bytes_per_ms if audio_mode else 0.0
        text_tokens = math.ceil(len(said) / 4)
        audio_tokens = math.ceil(audio_ms / 50)
        input_tokens = 120 + self._tokens_in_context
        # As the real API: the prompt cache serves the earlier context in 64-token blocks once a
        # prompt reaches 1024 tokens (cached tokens are a subset of the input tokens).
        cached = (input_tokens - 120) // 64 * 64 if input_tokens >= 1024 else 0
        cached_text = min(120, cached)
        self._tokens_in_context += text_tokens + audio_tokens
        final = self._response_object(r, "cancelled" if cancelled else "completed", output)
        if cancelled:
            final["status_details"] = {"type": "cancelled", "reason": r.cancel_reason}
        final["usage"] = {
            "total_tokens": input_tokens + text_tokens + audio_tokens,
            "input_tokens": input_tokens,
            "output_tokens": text_tokens + audio_tokens,
            "input_token_details": {
                "text_tokens": 120,
                "audio_tokens": input_tokens - 120,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached - cached_text, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
        }
        # Free the slot before response.done leaves, so a response.create sent on receipt is accepted.
        self._active = None
        if not cancelled:
            self._responses_completed += 1
        await self.send({"type": "response.done", "response": final})


# --------------------------------------------------------------------------------------------
# Server


class FakeRealtime:
    """The stand-in server: `async with FakeRealtime(Script(...)) as fake: connect to fake.url`."""

    def __init__(self, script: Script | None = None):
        self.script = script or Script()
        self.url = ""
        self.sessions: list[FakeSession] = []
        self.connections_attempted = 0
        self.validation_errors: list[str] = []
        self._server: Server | None = None
        self._changes = Changes()

    async def start(self) -> str:
        """Listen on 127.0.0.1 (ephemeral port); returns "ws://127.0.0.1:PORT/v1/realtime"."""
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            compression=None,  # cheaper, and clients must not depend on it
            max_size=16 * 1024 * 1024,  # the API accepts appends up to 15 MiB
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeRealtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for_session(self, n: int = 1, timeout: float = 5) -> FakeSession:
        """The n-th accepted session (1-based), waiting for it to connect."""
        await self._changes.wait_until(
            lambda: len(self.sessions) >= n, timeout, lambda: f"session #{n} (have {len(self.sessions)})"
        )
        return self.sessions[n - 1]

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.connections_attempted += 1
        if self.script.network_delay_ms:  # the client's TCP/TLS/upgrade round trips
            await asyncio.sleep(self.script.handshake_round_trips * self.script.network_delay_ms / 1000)
        if urlsplit(request.path).path.rstrip("/") != "/v1/realtime":
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.connections_attempted in self.script.refuse_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        key = self.script.require_api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            body = {
                "error": {
                    "message": "Incorrect API key provided.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
            response = connection.respond(HTTPStatus.UNAUTHORIZED, orjson.dumps(body).decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        model = (query.get("model") or ["gpt-realtime"])[0]
        headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        session = FakeSession(self, ws, model, headers)
        self.sessions.append(session)
        self._changes.notify()
        await session.run()
