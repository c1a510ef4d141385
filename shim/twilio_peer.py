"""Twilio's side of a call: the signed voice webhook and a Media Streams peer (bidirectional
<Connect><Stream>). `shim parity run` plays scenarios through it against a deployment; the tests
and the demo use it as their simulated Twilio (shim.testing.twilio_caller re-exports it).

It behaves like Twilio as described in https://www.twilio.com/docs/voice/media-streams/websocket-messages:

* signs the WebSocket upgrade (X-Twilio-Signature over the <Stream url>, no params);
* sends only JSON text frames: `connected` (no streamSid), `start`, 20 ms `media` frames with
  string sequenceNumber/chunk/timestamp, `dtmf`, `mark` echoes and `stop`;
* plays what the shim sends in real time: outbound `media` goes into a playback buffer that
  drains at 8 bytes/ms; a `mark` is echoed when the audio queued before it has played (at once if
  nothing is buffered); `clear` drops the buffer and echoes every pending mark immediately;
* records anything real Twilio would flag (31950 binary frame, 31951 invalid message) in
  `protocol_errors` and ignores that message, as Twilio does with an invalid message.

Clock: the stream clock starts when `start` is sent. `media.timestamp` counts the caller audio
sent; when the test was idle between realtime sends, it jumps to the wall clock (Twilio would have
sent silence meanwhile; the simulator only sends what the test asks for).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import secrets
import warnings
import wave
from collections import deque
from os import PathLike
from typing import Any, Awaitable, Callable

import httpx
import numpy as np
import orjson
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

with warnings.catch_warnings():  # deprecated in 3.11-3.12; audioop-lts provides it on 3.13+
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["Changes", "TwilioCaller", "incoming_call_params", "keep_line_open", "post_twilio_webhook", "sign"]


class Changes:
    """Wakes waiters whenever observed state changes; each waiter re-checks its own predicate."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._event.wait()
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what()}") from None

BYTES_PER_MS = 8  # mu-law 8 kHz: one byte per sample
FRAME_BYTES = 160  # Twilio's inbound cadence: 20 ms frames
FRAME_MS = FRAME_BYTES // BYTES_PER_MS
SILENCE = 0xFF  # mu-law encoding of 0
_LATE_S = 0.1  # a realtime send this late restarts the pacing schedule (the test was idle)

# Exact field sets Twilio accepts from the server (the messages a server may send to Twilio); anything else is 31951.
_OUTBOUND_FIELDS: dict[str, tuple[frozenset[str], str | None, frozenset[str]]] = {
    "media": (frozenset({"event", "streamSid", "media"}), "media", frozenset({"payload"})),
    "mark": (frozenset({"event", "streamSid", "mark"}), "mark", frozenset({"name"})),
    "clear": (frozenset({"event", "streamSid"}), None, frozenset()),
}


def sign(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """The X-Twilio-Signature Twilio would send for `url` (+ form `params`)."""
    return RequestValidator(auth_token).compute_signature(url, params or {})


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class TwilioCaller:
    """One inbound call's media stream, seen from Twilio's side."""

    def __init__(
        self,
        media_url: str,
        auth_token: str,
        *,
        custom_parameters: dict[str, str],
        call_sid: str | None = None,
        stream_sid: str | None = None,
        account_sid: str | None = None,
        signature: str | None = None,
        signed_url: str | None = None,
    ):
        self.media_url = media_url
        self.auth_token = auth_token
        self.custom_parameters = dict(custom_parameters)
        self.call_sid = call_sid or _sid("CA")
        self.stream_sid = stream_sid or _sid("MZ")
        self.account_sid = account_sid or _sid("AC")
        self.signed_url = signed_url or media_url
        self.signature = signature if signature is not None else sign(auth_token, self.signed_url)

        # What the simulator observed.
        self.received: list[dict[str, Any]] = []
        self.received_audio = bytearray()
        self.audio_arrivals: list[tuple[float, int]] = []  # (loop time, bytes) of each media frame received
        self.played_audio = bytearray()
        self.sent_audio = bytearray()  # caller audio sent (padded to whole frames)
        self.marks_sent_back: list[str] = []
        self.clears = 0
        self.protocol_errors: list[str] = []
        self.close_code: int | None = None
        self.close_reason: str = ""

        self._ws: ClientConnection | None = None
        self._changes = Changes()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self._chunk = 0
        self._t0 = 0.0  # loop time when `start` was sent: the stream clock's origin
        self._cursor_ms = 0  # timestamp of the next caller frame
        self._next_send: float | None = None  # loop time the next realtime frame is due
        self._caller_segments: list[tuple[int, bytes]] = []  # (stream ms, audio)
        self._played_segments: list[tuple[float, bytes]] = []  # (stream seconds, audio)
        # Playback buffer: ("audio", bytes) and ("mark", name) in arrival order.
        self._queue: deque[tuple[str, Any]] = deque()
        self._play_clock: float | None = None  # loop time at which the head audio started playing
        self._generation = 0  # bumped when the buffer is dropped, so an interrupted playback step is discarded
        self._wake = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the stream and send `connected` + `start`. Raises websockets.InvalidStatus if the
        server refuses the upgrade (e.g. 403 on a bad signature)."""
        self._ws = await connect(
            self.media_url,
            additional_headers={"X-Twilio-Signature": self.signature},
            user_agent_header="Twilio.TmeWs/1.0",
            compression=None,
            proxy=None,
            max_size=None,
        )
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self._t0 = asyncio.get_running_loop().time()
        await self._send_numbered(
            {
                "event": "start",
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self.custom_parameters,
                },
            }
        )
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._playback_loop())]

    async def __aenter__(self) -> TwilioCaller:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """The caller hangs up: send `stop`, then close the socket."""
        if self._ws is not None and self._ws.state is State.OPEN:
            try:
                stop = {"accountSid": self.account_sid, "callSid": self.call_sid}
                await self._send_numbered({"event": "stop", "stop": stop})
            except ConnectionClosed:
                pass
        await self.close()

    async def close(self) -> None:
        """Close the socket without sending `stop` (the stream just ends) and stop the background tasks."""
        if self._ws is not None:
            await self._ws.close()
            await self._finish()

    async def wait_closed(self, timeout: float = 5) -> None:
        """Wait until the server closed the stream."""
        await self._changes.wait_until(self._closed.is_set, timeout, lambda: "the server to close the stream")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # ---- sending caller media ---------------------------------------------------------

    async def send_audio(self, ulaw: bytes, *, realtime: bool = True) -> None:
        """Send mu-law audio as 20 ms media frames (the last one padded with silence).

        realtime: paced at 20 ms per frame on the loop's monotonic clock, continuing the schedule of
        the previous call (no drift); otherwise as fast as possible (timestamps still advance).
        """
        loop = asyncio.get_running_loop()
        if realtime:
            now = loop.time()
            if self._next_send is None or now - self._next_send > _LATE_S:
                self._next_send = now
                wall_ms = int((now - self._t0) * 1000) // FRAME_MS * FRAME_MS
                self._cursor_ms = max(self._cursor_ms, wall_ms)
        for offset in range(0, len(ulaw), FRAME_BYTES):
            frame = ulaw[offset : offset + FRAME_BYTES]
            frame += bytes([SILENCE]) * (FRAME_BYTES - len(frame))
            if realtime:
                assert self._next_send is not None
                delay = self._next_send - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._next_send += FRAME_MS / 1000
            self._chunk += 1
            await self._send_numbered(
                {
                    "event": "media",
                    "media": {
                        "track": "inbound",
                        "chunk": str(self._chunk),
                        "timestamp": str(self._cursor_ms),
                        "payload": base64.b64encode(frame).decode(),
                    },
                }
            )
            self._caller_segments.append((self._cursor_ms, frame))
            self.sent_audio += frame
            self._cursor_ms += FRAME_MS

    async def send_silence(self, ms: int, *, realtime: bool = True) -> None:
        """Send `ms` of mu-law silence (0xFF), rounded up to whole 20 ms frames."""
        frames = -(-ms // FRAME_MS)
        await self.send_audio(bytes([SILENCE]) * (frames * FRAME_BYTES), realtime=realtime)

    async def send_dtmf(self, digit: str) -> None:
        await self._send_numbered({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}})

    # ---- waiting ------------------------------------------------------------------------

    async def wait_for_audio(self, min_bytes: int, timeout: float = 5) -> None:
        """Wait until the shim has sent at least `min_bytes` of audio."""
        await self._changes.wait_until(
            lambda: len(self.received_audio) >= min_bytes,
            timeout,
            lambda: f"{min_bytes} bytes of outbound audio (have {len(self.received_audio)})",
        )

    async def wait_until_played(self, timeout: float = 10) -> None:
        """Wait until the playback buffer is empty and no mark is pending (a closed stream plays
        nothing more: audio still buffered when it closed is dropped, see played_audio)."""
        await self._changes.wait_until(
            lambda: not self._queue,
            timeout,
            lambda: f"playback to finish ({sum(len(d) for k, d in self._queue if k == 'audio')} bytes queued)",
        )

    async def wait_for_event(self, event: str, timeout: float = 5, count: int = 1) -> dict[str, Any]:
        """Wait until `count` messages with this `event` came from the server; return the latest."""

        def of() -> list[dict[str, Any]]:
            return [m for m in self.received if m.get("event") == event]

        await self._changes.wait_until(lambda: len(of()) >= count, timeout, lambda: f"{count} x {event!r}")
        return of()[-1]

    # ---- recordings ---------------------------------------------------------------------

    def timeline(self) -> tuple[bytes, bytes]:
        """(caller, assistant) mu-law tracks aligned on the stream clock, equal length: the caller
        track is what was sent, the assistant track what was played when it was played."""
        caller = [(ms * BYTES_PER_MS, data) for ms, data in self._caller_segments]
        played = [(round(s * 8000), data) for s, data in self._played_segments]
        length = max((pos + len(data) for pos, data in caller + played), default=0)
        tracks = []
        for segments in (caller, played):
            track = bytearray([SILENCE]) * length
            for pos, data in segments:
                track[pos : pos + len(data)] = data
            tracks.append(bytes(track))
        return tracks[0], tracks[1]

    def write_wav(self, path: str | PathLike[str]) -> None:
        """A stereo 16-bit 8 kHz WAV of timeline(): left the caller, right the assistant."""
        caller, assistant = self.timeline()
        left = np.frombuffer(audioop.ulaw2lin(caller, 2), "<i2")
        right = np.frombuffer(audioop.ulaw2lin(assistant, 2), "<i2")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(np.column_stack([left, right]).astype("<i2").tobytes())

    # ---- internals: sending -------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        if self._ws is None:
            raise RuntimeError("TwilioCaller.connect() first")
        await self._ws.send(orjson.dumps(message), text=True)

    async def _send_numbered(self, message: dict[str, Any]) -> None:
        """Everything after `connected` carries a string sequenceNumber and the streamSid."""
        self._seq += 1
        numbered = {"event": message["event"], "sequenceNumber": str(self._seq), **message}
        await self._send({**numbered, "streamSid": self.stream_sid})

    async def _echo_mark(self, name: str) -> None:
        self.marks_sent_back.append(name)
        self._changes.notify()
        try:
            await self._send_numbered({"event": "mark", "mark": {"name": name}})
        except ConnectionClosed:
            pass

    # ---- internals: receiving -----------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self._ws.close_code
            self.close_reason = self._ws.close_reason or ""
            self._drop_playback()  # the stream is gone: whatever was still buffered is never heard
            self._closed.set()
            self._changes.notify()

    def _flag(self, error: str) -> None:
        self.protocol_errors.append(error)
        self._changes.notify()

    def _check(self, msg: dict[str, Any]) -> str | None:
        """Why Twilio would reject this outbound message (31951), or None."""
        event = msg.get("event")
        if event not in _OUTBOUND_FIELDS:
            return f"31951 unknown event {event!r}"
        fields, inner, inner_fields = _OUTBOUND_FIELDS[event]
        if set(msg) != fields:
            return f"31951 {event}: fields {sorted(msg)}, expected {sorted(fields)}"
        if msg["streamSid"] != self.stream_sid:
            return f"31951 {event}: wrong streamSid {msg['streamSid']!r}"
        if inner is None:
            return None
        body = msg[inner]
        if not isinstance(body, dict) or set(body) != inner_fields:
            return f"31951 {event}: {inner} must be an object with exactly {sorted(inner_fields)}, got {body!r}"
        if event == "media":
            payload = body["payload"]
            try:
                if not isinstance(payload, str):
                    raise ValueError
                base64.b64decode(payload, validate=True)
            except (ValueError, binascii.Error):
                return "31951 media: payload is not valid base64"
        elif not isinstance(body["name"], str):
            return f"31951 mark: name must be a string, got {body['name']!r}"
        return None

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._flag("31950 binary frame (Twilio accepts JSON text frames only)")
            return
        try:
            msg = orjson.loads(message)
        except orjson.JSONDecodeError:
            self._flag(f"31951 not JSON: {message[:80]!r}")
            return
        if not isinstance(msg, dict):
            self._flag(f"31951 not a JSON object: {message[:80]!r}")
            return
        self.received.append(msg)
        self._changes.notify()
        problem = self._check(msg)
        if problem is not None:
            self._flag(problem)
            return  # Twilio drops an invalid message
        event = msg["event"]
        if event == "media":
            audio = base64.b64decode(msg["media"]["payload"])
            self.received_audio += audio
            if audio:
                self.audio_arrivals.append((asyncio.get_running_loop().time(), len(audio)))
            if audio:
                self._queue.append(("audio", audio))
                self._wake.set()
        elif event == "mark":
            name = msg["mark"]["name"]
            if self._queue:
                self._queue.append(("mark", name))
                self._wake.set()
            else:
                await self._echo_mark(name)  # "or if there is no audio buffered"
        else:
            await self._on_clear()
        self._changes.notify()

    async def _on_clear(self) -> None:
        self.clears += 1
        for name in self._drop_playback():
            await self._echo_mark(name)

    def _drop_playback(self) -> list[str]:
        """Empty the buffer now (keeping the part of the head audio already heard); returns the
        names of the marks that were pending."""
        now = asyncio.get_running_loop().time()
        if self._queue and self._queue[0][0] == "audio" and self._play_clock is not None:
            head = self._queue[0][1]
            heard = min(len(head), max(0, int((now - self._play_clock) * 8000)))
            self._record_played(head[:heard], self._play_clock)
        pending = [name for kind, name in self._queue if kind == "mark"]
        self._queue.clear()
        self._play_clock = None
        self._generation += 1
        self._wake.set()
        self._changes.notify()
        return pending

    # ---- internals: playback -------------------------------------------------------------

    def _record_played(self, audio: bytes, started: float) -> None:
        if audio:
            self.played_audio += audio
            self._played_segments.append((started - self._t0, audio))
            self._changes.notify()

    async def _playback_loop(self) -> None:
        """Drain the buffer at 8 bytes/ms on the loop clock; echo marks as their audio completes."""
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0][0] == "mark":
                await self._echo_mark(self._queue.popleft()[1])
            self._wake.clear()  # cleared before looking, so a later append is never missed
            if not self._queue:
                self._play_clock = None
                self._changes.notify()
                await self._wake.wait()
                continue
            if self._queue[0][0] == "mark":
                continue
            audio = self._queue[0][1]
            if self._play_clock is None:
                self._play_clock = loop.time()
            end = self._play_clock + len(audio) / 8000
            generation = self._generation
            try:
                async with asyncio.timeout_at(end):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if generation != self._generation or loop.time() < end:
                continue  # cleared (already accounted) or woken by new data: re-evaluate
            self._queue.popleft()
            self._record_played(audio, self._play_clock)
            self._play_clock = end  # chain on the schedule, not on when we woke up

    async def _finish(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._ws is not None:
            self.close_code = self._ws.close_code
            self.close_reason = self._ws.close_reason or ""
        self._closed.set()
        self._changes.notify()


async def post_twilio_webhook(
    client: httpx.AsyncClient,
    url: str,
    params: dict[str, str],
    auth_token: str,
    *,
    signed_url: str | None = None,
) -> httpx.Response:
    """POST form `params` to `url` signed like Twilio does (signature over signed_url or url)."""
    headers = {
        "X-Twilio-Signature": sign(auth_token, signed_url or url, params),
        "User-Agent": "TwilioProxy/1.1",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    return await client.post(url, data=params, headers=headers)


def incoming_call_params(call_sid: str, from_: str, to: str, account_sid: str) -> dict[str, str]:
    """The form fields of Twilio's voice webhook for a ringing inbound call (blank ones included,
    since they are part of the signature)."""
    geo = {"City": "", "Country": "US", "State": "", "Zip": ""}
    params = {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to,
        "Caller": from_,
        "Direction": "inbound",
        "From": from_,
        "To": to,
    }
    for role in ("Called", "Caller", "From", "To"):
        params.update({role + key: value for key, value in geo.items()})
    return params


async def keep_line_open(caller: TwilioCaller, condition: Awaitable[Any]) -> None:
    """Twilio sends a 20 ms frame all call long, whatever the caller does: send silence until
    `condition` completes. The shim may hang up meanwhile; the closed line is then fine."""
    line = asyncio.create_task(caller.send_silence(60_000))
    try:
        await condition
    finally:
        line.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await line
