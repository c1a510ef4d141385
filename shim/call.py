"""One phone call as a sans-I/O state machine: Twilio frames and typed model events in, frames,
model commands and database rows out. No sockets, no awaits, no clocks, randomness or ids of
its own (they are injected), so every behaviour here is tested without a network.

The model sits behind one seam (`shim.model_events.ModelBackend`, today `shim.openai_realtime`):
the call gives it commands (append audio, create/cancel a response, truncate...) and the backend
queues its wire frames in `backend.out`; `on_model_text` hands a frame to the backend, which
calls back `on_model_audio` (the hot path) or `on_model_event` with a typed event.

After feeding an input, the I/O shell drains `twilio_out` and the backend's frames (strings to
send), `tool_requests` (webhooks to run, answered through `on_tool_outcome`) and `server_out`
(Vapi server messages to deliver); it resolves the assistant once `start` is set (`on_setup`),
opens the model socket, and closes everything once `end` is set.

A frame in -> a frame out is one synchronous call: caller audio becomes one
`input_audio_buffer.append`, model audio becomes one Twilio `media` + one `mark`. Rows go to the
injected RecordSink, whose `upsert`/`insert` only enqueue.
"""

from __future__ import annotations

import base64
import random
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Callable, Protocol

import orjson

try:  # the stdlib module below 3.13, the audioop-lts package from 3.13 on
    import audioop
except ImportError:  # pragma: no cover
    import audioop_lts as audioop  # type: ignore[no-redef]

from . import model_events as me
from . import tool_kinds
from .call_effects import (  # noqa: F401  (End and ToolRequest are part of this module's interface)
    CallEnded,
    ConnectModel,
    DeliverServerMessage,
    Effect,
    End,
    LoadBackground,
    ResolveAssistant,
    StartRecording,
    ToolRequest,
)
from . import twilio_media as tw
from .assistant import AssistantError, AssistantNotFound
from shim_tools import envelope
from shim_tools.dtmf import DtmfError, KeypadBuffer, dtmf_ulaw, keypad_text, validate_keys
from shim_tools.results import NO_RESULT, ToolOutcome, async_outcome, tool_message

from .openai_realtime import OpenAIRealtime, counter_ids
from .end_policy import EndPolicy, HangUp, SayGoodbye
from .model_link import ATTEMPT_TIMEOUT_S, RECOVERY_LINE_AFTER_S, GiveUp, ModelLink
from .tool_batch import (  # noqa: F401  (transfer_action: part of this module's interface)
    BACKSTOP_S,
    DEFAULT_TIMEOUT_S,
    ToolBatch,
    first_message,
    server_timeout,
    transfer_action,
    transfer_message,
)
from .playback import AssistantItem, Playback, heard_text  # noqa: F401  (AssistantItem, heard_text: part of this module's interface)
from .response_scheduler import ResponseScheduler
from .tool_schema import ToolBinding
from .translate import CallSetup

# Caller audio that arrives before the model session is configured waits here (20 ms frames).
MAX_EARLY_FRAMES = 500  # 10 s
APOLOGY = "Sorry, we are having technical difficulties. Please call again later."
FALLBACK_SAY = "Sorry, we are having technical difficulties. Please hold while I transfer your call."
# Caller audio louder than this (16-bit RMS, about -36 dBFS) counts as voice for the barge-in
# gate; PSTN echo of the assistant and room noise usually sit well below it.
VOICE_RMS = 500
# A turn the gate judged to be noise: the reply the server creates for it is cancelled if it
# starts within this window.
NOISE_REPLY_WINDOW_S = 3.0
SETUP_DEADLINE_S = 15.0  # from the stream's start to a configured model session
HANG_AFTER_S = 5.0  # no reply this long after the caller stopped: Vapi's `hang` server message
# A response in progress with no model event for this long: the socket is open but the model is
# gone (Realtime streams deltas every few hundred ms); treated as a loss of the model.
MODEL_STALL_S = 10.0
SAY_EXACTLY = 'Say exactly the following words, word for word, and nothing else: "{text}"'
# After a new model session picked up the conversation (the old one was lost mid-call):
RESUME_CUT_OFF = ("The phone line dropped for a moment while you were speaking; the conversation above "
                  "ends where the caller stopped hearing you. {apology}Continue naturally from there.")
RESUME_AFTER_ROLLOVER = "Continue naturally from where the conversation above ends."
PAUSE_S = 1.0  # a rollover waits for this long without the caller's voice starting or stopping
VOICED_HELD_MS = 200  # the caller said something while the model was away
# The caller's recent frames, so that a turn cut by a lost model session can be sent again: up to
# what the held audio can take while a turn is in flight, else only the last 1.5 s (the onset
# of the next turn, with the server's prefix padding, lies in it). Memory per call stays small.
RECENT_AUDIO_FRAMES = MAX_EARLY_FRAMES
RECENT_IDLE_FRAMES = 75
RESUME_AFTER_GAP = ("The phone line dropped for a few seconds. Briefly tell the caller the line broke up "
                    "and ask them to go on; do not repeat yourself.")


class RecordSink(Protocol):
    def upsert(self, table: str, row: dict[str, Any], *, keep_existing: tuple[str, ...] = ()) -> None: ...
    def insert(self, table: str, row: dict[str, Any]) -> None: ...


class Metrics(Protocol):
    def barge_in(self) -> None: ...
    def model_error(self) -> None: ...
    def turn_latency(self, seconds: float) -> None: ...
    def model_session(self, outcome: str) -> None: ...


class NoMetrics:
    def barge_in(self) -> None: ...
    def model_error(self) -> None: ...
    def turn_latency(self, seconds: float) -> None: ...
    def model_session(self, outcome: str) -> None: ...


class AudioMixer(Protocol):
    def mix_b64(self, voice_b64: str) -> str: ...


class Phase(Enum):
    AWAITING_START = "awaiting_start"
    RESOLVING = "resolving"  # `start` received; the shell is loading the assistant
    CONFIGURING = "configuring"  # model socket opening, session.update not yet acknowledged
    LIVE = "live"
    RESUMING = "resuming"  # a new model session is being opened (lost socket, rollover); caller audio waits
    ENDED = "ended"


_LIVE = Phase.LIVE  # for the per-frame checks (Enum attribute lookups are slow in Python 3.11)


@dataclass(slots=True)
class UserTurn:
    seq: int
    item_id: str
    started: float = 0.0


@dataclass(slots=True)
class BargeInGate:
    """Open between the caller starting to speak over the assistant and the decision: the
    assistant is cut off only after `need_ms` of voiced caller audio (stopSpeakingPlan)."""

    item_id: str
    need_ms: float
    voiced_ms: float = 0.0


def voiced_ms(frames: list[tuple[str, int]]) -> float:
    """How much of held caller audio is voice (the barge-in gate's loudness rule); decodes, so
    only for the audio held during a reconnect, never per live frame."""
    total = 0.0
    for payload, _ in frames:
        try:
            pcm = audioop.ulaw2lin(base64.b64decode(payload), 2)
        except (ValueError, TypeError):
            continue
        if audioop.rms(pcm, 2) >= VOICE_RMS:
            total += len(pcm) / 16
    return total


class Call:
    def __init__(
        self,
        records: RecordSink,
        *,
        log: Any,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        backend: me.ModelBackend | None = None,
        new_id: Callable[[], str] | None = None,
        rng: random.Random | None = None,
        admit_start: Callable[[tw.Start], str | None] | None = None,
    ):
        self.records = records
        self._new_id = new_id or counter_ids()
        # which filler sentence is said: seed it in tests; None = the process-wide generator (no
        # per-call state)
        self._rng = rng
        # The model, behind the one seam (shim.model_events.ModelBackend): commands in, wire
        # frames queued in backend.out for the shell, events back through on_model_*.
        self.backend: me.ModelBackend = backend or OpenAIRealtime(self._new_id)
        self._unhandled_seen: set[str] = set()
        self.log = log
        self.metrics = metrics or NoMetrics()
        self.clock = clock
        self._wall0 = wall()
        self._mono0 = clock()

        self.phase = Phase.AWAITING_START
        self.twilio_out: list[str] = []
        self.end: End | None = None
        self.start: tw.Start | None = None  # set on `start`: the shell then resolves the assistant
        self.info: envelope.CallInfo | None = None  # who/what the call is, for Vapi's envelopes
        self.effects: list[Effect] = []  # work for the shell, in order (shim.call_effects)
        self.recording_url: str | None = None
        self._artifact: dict[tuple, envelope.Message] = {}
        self._hang_sent_for: float | None = None
        self._ignored_turns: set[str] = set()
        self.keypad: KeypadBuffer | None = None

        self.setup: CallSetup | None = None
        self.call_sid = ""
        self.stream_sid = ""
        self.account_sid = ""
        self.frames_in = 0
        self.frames_out = 0
        # The shell's admission check of a `start` (stream token, live duplicate): why it is
        # refused, or None; run before on_start writes or replaces anything.
        self.admit_start = admit_start
        self.model_events = 0  # counted per event; tick() notices when it stops moving
        self._model_progress = (0, self._mono0)  # (model_events, clock()) when it last moved
        self.frames_rejected = 0  # Twilio frames dropped as malformed (bad JSON, invalid base64...)

        self._early_audio: deque[tuple[str, int]] = deque(maxlen=MAX_EARLY_FRAMES)
        self._seq = 0
        self._playback = Playback()  # what was sent to Twilio, what the caller heard (marks)
        self._user_turns: dict[str, UserTurn] = {}
        self._cancelled: set[str] = set()
        self._early_transcript: dict[str, list[str]] = {}
        self._greeting_response_id: str | None = None
        # The model's input-audio timeline (ms of caller audio appended) -> Twilio's stream clock
        # (media.timestamp): offsets change only where Twilio's clock jumped past a gap.
        self._input_ms = 0.0
        self._session_input_ms = 0.0  # _input_ms when the current model session began (its time 0)
        self._offset_ms: float | None = None
        self._breaks_at: list[float] = []
        self._breaks_offset: list[float] = []
        self._stream_t0 = self._mono0  # clock() at Twilio's stream time 0 (the `start` frame)
        self._turn_end: float | None = None  # caller end of speech awaiting the next first byte
        self._ending = EndPolicy(self._mono0)  # goodbyes after playback, max duration, silence
        self._gate: BargeInGate | None = None
        self._noise_reply_until = 0.0
        self._noise_items: list[str] = []
        self._function_calls: list[me.FunctionCall] = []  # finished in the current response
        # one model response at a time; ours wait in order (shim.response_scheduler)
        self._responses = ResponseScheduler(self.backend.create_response, clock)
        self._batch: ToolBatch | None = None
        self._tool_calls: dict[str, tuple[int, float, str]] = {}  # call_id -> (seq, started, name)
        self._tool_args: dict[str, dict[str, Any]] = {}
        self._last_delay_message = -1e9
        self._tool_seq = 0
        self._mixer: AudioMixer | None = None  # background sound, once the shell has loaded it
        self._link = ModelLink(rng)  # when to open a new model session (lost socket, time limit)
        self._dropped_response: str | None = None  # generating when the model session was lost
        self._reply_on_resume = False  # the caller's last turn is transcribed but was never answered
        self._caller_speaking = False
        self._last_speech_event = self._mono0
        self._turn_onset_ms = 0.0  # where the caller's current turn began on the call's input timeline
        # the caller's recent audio, with where it sits on the input timeline (a turn in flight when
        # the model session is lost is sent again to the new one)
        self._recent_audio: deque[tuple[float, bytes, int]] = deque(maxlen=RECENT_IDLE_FRAMES)
        self._turn_resent = False  # a turn cut by a lost session was sent again and is not answered yet
        # the backend's append frame around the caller's base64 (relay_caller_frame), if it has one
        self._append_head, self._append_tail = self.backend.append_wire or (None, b"")
        self._fallback: dict[str, Any] | None = None
        self._end_when_set_up: tuple[GiveUp, str] | None = None

    # --- helpers -----------------------------------------------------------------------

    def _wall_at(self, mono: float) -> datetime:
        return self._wall0 + timedelta(seconds=mono - self._mono0)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _epoch_ms(self, mono: float) -> int:
        return int(self._wall_at(mono).timestamp() * 1000)

    def _artifact_add(self, key: tuple, role: str, text: str, started: float, **extra: Any) -> None:
        """Vapi's artifact.messages (webhooks, end-of-call report), kept as the call goes."""
        if self.setup is not None and self.setup.policy.hipaa and role in ("user", "bot"):
            text = ""
        self._artifact[key] = envelope.Message(
            role=role, text=text, time_ms=self._epoch_ms(started),
            seconds_from_start=round(max(0.0, started - self._stream_t0), 3), **extra,
        )

    def artifact_messages(self) -> list[envelope.Message]:
        return sorted(self._artifact.values(), key=lambda m: m.time_ms)

    def _server_message(self, kind: str, build: Callable[[envelope.CallInfo, int], dict[str, Any]]) -> None:
        """Queue a Vapi server message for the shell to deliver, if the assistant subscribed."""
        if self.info is None or self.setup is None or kind not in self.setup.policy.server_messages:
            return
        self.effects.append(DeliverServerMessage(kind, build(self.info, self._epoch_ms(self.clock()))))

    def record_event(self, kind: str, **detail: Any) -> None:
        self.records.insert(
            "call_events",
            {"call_sid": self.call_sid, "at": self._wall_at(self.clock()), "kind": kind, "detail": detail or None},
        )

    def _finish(self, reason: str, next_action: dict[str, Any] | None = None) -> None:
        if self.end is not None:
            return
        now = self.clock()
        action = next_action or {"verb": "hangup"}
        self.end = End(reason, action, self._wall_at(now))
        self.phase = Phase.ENDED
        self._early_audio.clear()
        self.effects.append(CallEnded(self.end))
        if not self.call_sid:
            return
        failed = action.get("say") in (APOLOGY, FALLBACK_SAY)  # a failure, not a goodbye: the turn in progress was cut off
        for item in self._playback.items.values():
            if failed and not item.dropped and (not item.done or item.played_bytes < item.sent_bytes):
                item.interrupted = True
            self._record_item(item, final=True)
        self._server_message("status-update", lambda info, now_ms: envelope.status_update_message(
            info, "ended", self.artifact_messages(), now_ms, ended_reason=reason, ended_at=self._wall_at(now)))
        self.records.upsert(
            "calls",
            {
                "call_sid": self.call_sid,
                "status": "ended",
                "ended_at": self._wall_at(now),
                "ended_reason": reason,
                "next_action": action,
            },
            # The first reason wins: a status callback or a late socket close must not
            # overwrite why the call really ended.
            keep_existing=("ended_at", "ended_reason", "next_action"),
        )
        if self.frames_rejected:
            self.record_event("twilio_frames_rejected", count=self.frames_rejected)
        self.log.info("call_ended", ended_reason=reason, frames_in=self.frames_in, frames_out=self.frames_out,
                      frames_rejected=self.frames_rejected)

    # --- Twilio side ---------------------------------------------------------------------

    def on_twilio_text(self, text: str | bytes) -> None:
        if type(text) is bytes:
            media = tw.parse_media_fast(text)  # the hot path: a media frame as Twilio writes it
            if media is not None:
                if self.phase is _LIVE and self._gate is None:  # on_caller_audio's usual case, a call fewer
                    self.frames_in += 1
                    self._append_audio(media[0], media[1])
                else:
                    self.on_caller_audio(media[0], media[1])
                return
            mark = tw.parse_mark_fast(text)  # the other frame of every chunk
            if mark is not None:
                self.on_mark(mark)
                return
        try:
            event = tw.parse(text)
        except tw.ProtocolError as exc:
            # Bad input loses nothing already accepted: dropped and counted, the call goes on;
            # logged once per call (a flood of bad frames must not become a flood of lines).
            self.frames_rejected += 1
            if self.frames_rejected == 1:
                self.log.warning("twilio_frame_rejected", error=str(exc), note="further rejections are only counted")
            return
        if event is None:
            return
        if type(event) is tw.Media:  # the hot path first
            self.on_caller_audio(event.payload, event.timestamp_ms)
        elif type(event) is tw.Mark:
            self.on_mark(event.name)
        elif type(event) is tw.Start:
            self.on_start(event)
        elif type(event) is tw.Stop:
            self._finish("customer-ended-call")
        elif type(event) is tw.Dtmf:
            self.on_keypress(event.digit)

    def on_start(self, start: tw.Start) -> None:
        if self.phase is not Phase.AWAITING_START:
            self.frames_rejected += 1  # counted with the other rejected frames: a flood logs once
            if self.frames_rejected == 1:
                self.log.warning("duplicate_start_ignored")
            return
        refusal = self.admit_start(start) if self.admit_start is not None else None
        if refusal is not None:  # before anything is written: a forged start must not touch a live call
            self.log.warning("stream_start_refused", call_sid=start.call_sid, reason=refusal)
            self._finish("stream-start-refused")  # call_sid is not set: nothing is written
            return
        self.call_sid, self.stream_sid, self.account_sid = start.call_sid, start.stream_sid, start.account_sid
        self._stream_t0 = self.clock()
        self.log = self.log.bind(call_sid=start.call_sid)
        params = start.custom_parameters
        self.records.upsert(
            "calls",
            {
                "call_sid": start.call_sid,
                "stream_sid": start.stream_sid,
                "account_sid": start.account_sid or None,
                "from_number": params.get("from") or None,
                "to_number": params.get("to") or None,
                "stack": "shim",
                "status": "in-progress",
                "started_at": self._wall_at(self._mono0),
                # The per-call stream token authenticates this stream only: never stored.
                "custom_parameters": {k: v for k, v in params.items() if k != "token"},
            },
        )
        self.start = start
        self.phase = Phase.RESOLVING  # caller audio waits while the shell loads the assistant
        # The model socket opens while the assistant is resolved (the URL does not depend on
        # it): `session.update` goes out as soon as both are done, not one after the other. The
        # connect is asked first: its handshake is on the wire before the resolution, which may
        # run on the event loop, takes its turn.
        self.effects.append(ConnectModel())
        self.effects.append(ResolveAssistant(start))

    def on_setup(self, setup: CallSetup, fallback_destination: dict[str, Any] | None = None) -> None:
        """The assistant is loaded and translated: open the model connection. The number's
        fallback destination (Vapi's fallbackDestination), if any, is where the caller goes when
        the model cannot be reached again."""
        if self.phase is not Phase.RESOLVING:
            return
        self.setup = setup
        self._fallback = fallback_destination
        if self._end_when_set_up is not None:  # the model could not be reached while this loaded
            self.phase = Phase.CONFIGURING
            self._reconnect_or_give_up(*self._end_when_set_up)
            return
        assert self.start is not None
        params = self.start.custom_parameters
        self.info = envelope.CallInfo(
            call_sid=self.call_sid, account_sid=self.account_sid, assistant_id=setup.assistant_id,
            assistant=setup.assistant, from_number=params.get("from", ""), to_number=params.get("to", ""),
            started_at=self._wall_at(self._mono0), variable_values=setup.policy.variable_values,
        )
        self.keypad = KeypadBuffer(setup.policy.keypad_plan)
        self.backend.configure(setup.session)  # sent once the model's session exists
        self.records.upsert(
            "calls",
            {"call_sid": self.call_sid, "assistant_id": setup.assistant_id, "assistant_name": setup.assistant_name or None,
             "model": setup.model, "voice": setup.voice, "metadata": setup.metadata or None},
        )
        self.phase = Phase.CONFIGURING
        self.log.info("call_started", assistant_id=setup.assistant_id)
        # Side work never holds up the call: the recording starts and the background sound
        # loads while the model socket opens.
        if setup.policy.recording:
            self.effects.append(StartRecording(self.account_sid, self.call_sid))
        if setup.policy.background_sound != "off":
            self.effects.append(LoadBackground(setup.policy.background_sound))

    def on_background_ready(self, mixer: AudioMixer) -> None:
        """The background sound is loaded: from now on it is mixed under the assistant's voice."""
        self._mixer = mixer

    def on_setup_failed(self, error: AssistantError) -> None:
        self.log.error("assistant_unusable", error=str(error))
        self.record_event("assistant_unusable", error=str(error))
        reason = "assistant-not-found" if isinstance(error, AssistantNotFound) else "assistant-not-valid"
        self._finish(reason, {"verb": "hangup", "say": APOLOGY})

    def on_caller_audio(self, payload: str, timestamp_ms: int) -> None:
        self.frames_in += 1
        phase = self.phase
        if phase is _LIVE:  # a module constant: an Enum member lookup costs ~0.2 µs a frame
            self._append_audio(payload, timestamp_ms)
            if self._gate is not None:
                self._gate_frame(payload)
        elif phase is Phase.RESUMING or phase is Phase.CONFIGURING or phase is Phase.RESOLVING:
            self._early_audio.append((payload, timestamp_ms))  # bounded: the oldest goes first

    def relay_caller_frame(self, data: bytes) -> bytes | None:
        """The hot path, 50 times a second per call: a Twilio media frame in Twilio's own shape,
        while the call is live and no barge-in gate listens, becomes the backend's append frame,
        returned for the shell to send as it is (no str, dict or event made for it). None: the
        frame goes through on_twilio_text (another frame or spelling, another phase, the gate)."""
        head = self._append_head
        if self.phase is not _LIVE or self._gate is not None or head is None or self.backend.out:
            return None  # (queued frames first: the shell sends those in order, via pump)
        match = tw.match_media_frame(data)
        if match is None:
            return None
        ts, payload = match.group(1, 2)
        if len(payload) & 3 or len(payload) > tw.MAX_MEDIA_PAYLOAD_CHARS:
            return None  # on_twilio_text rejects and counts it
        self.frames_in += 1
        self._note_input(payload, int(ts))
        return head + payload + self._append_tail

    def _append_audio(self, payload: str, timestamp_ms: int) -> None:
        self._note_input(payload.encode(), timestamp_ms)
        self.backend.append_audio(payload)

    def _size_ring(self) -> None:
        """The recent ring holds up to a whole turn while one is in flight (the caller speaking, or
        waiting for the reply), else the last 1.5 s (the next turn's onset, with the server's
        prefix padding, lies in it): set when that changes, so a frame only appends."""
        in_flight = self._caller_speaking or self._turn_end is not None or self._turn_resent
        size = RECENT_AUDIO_FRAMES if in_flight else RECENT_IDLE_FRAMES
        if self._recent_audio.maxlen != size:
            self._recent_audio = deque(self._recent_audio, maxlen=size)  # shrinking keeps the newest

    def _note_input(self, payload: bytes, timestamp_ms: int) -> None:
        """The caller's frame on the call's input timeline (where Twilio's clock jumped, for
        _input_time) and in the recent ring (a turn cut by a lost model session is sent again)."""
        input_ms = self._input_ms
        offset = timestamp_ms - input_ms
        if self._offset_ms is None or abs(offset - self._offset_ms) > 40:
            self._offset_ms = offset
            if len(self._breaks_at) < 10_000:
                self._breaks_at.append(input_ms)
                self._breaks_offset.append(offset)
        self._recent_audio.append((input_ms, payload, timestamp_ms))  # bounded: see _size_ring
        # tw.b64_decoded_len, inlined (the payload is canonical base64: `=` only at the end)
        self._input_ms = input_ms + (len(payload) * 3 // 4 - payload.count(b"=", -2)) / tw.MULAW_BYTES_PER_MS

    def on_mark(self, name: str) -> None:
        finished = self._playback.on_mark(name)
        if finished is not None:
            self._retire(finished)
        if self._ending.pending is not None and not self._playback.awaiting_marks:
            self._maybe_hang_up()

    def on_keypress(self, digit: str) -> None:
        """Caller keypresses reach the model as Vapi presents them ("User's Keypad Entry: 123")
        when keypadInputPlan is enabled; Vapi drops them otherwise, and so does the shim."""
        self.record_event("dtmf", digit=digit)
        if self.keypad is None or (self.phase is not Phase.LIVE and self.phase is not Phase.RESUMING):
            return
        entry = self.keypad.press(digit, self.clock())
        if entry:
            self._keypad_entry(entry)

    def _keypad_entry(self, digits: str) -> None:
        text = keypad_text(digits)
        self.backend.add_message("user", text)
        self._artifact_add(("k", self.clock()), "user", text, self.clock())
        self._request_response()

    def on_recording_started(self, url: str) -> None:
        self.recording_url = url
        self.records.upsert("calls", {"call_sid": self.call_sid, "recording_url": url})
        self.record_event("recording_started", url=url)

    def on_twilio_closed(self) -> None:
        self._finish("phone-call-provider-closed-websocket")

    # --- model side ----------------------------------------------------------------------

    def on_model_connected(self) -> None:
        self.log.info("model_connected")

    def on_model_connect_failed(self, status: int | None, detail: str) -> None:
        if self.end is not None:
            return
        self.metrics.model_error()
        self.record_event("model_connect_failed", status=status, detail=detail[:300])
        self.log.error("model_connect_failed", status=status, detail=detail[:300])
        reason = {
            401: "pipeline-error-openai-401-unauthorized",
            403: "pipeline-error-openai-403-model-access-denied",
            429: "pipeline-error-openai-429-rate-limit-reached",
        }.get(status or 0, "pipeline-error-openai-llm-failed")
        now = self.clock()
        if self._link.outage:  # a reconnect attempt failed: another, or the apology
            decision = self._link.connect_failed(now, status, f"HTTP {status}" if status else detail[:120])
        else:  # the call's first connection: retried the same way (the caller waits for the greeting)
            decision = self._link.lost(now, f"HTTP {status}" if status else detail[:120],
                                       recoverable=status not in (401, 403))
        self._reconnect_or_give_up(decision, reason)

    def on_model_closed(self, code: int | None, reason: str) -> None:
        if self.end is not None:
            return
        self.metrics.model_error()
        self.record_event("model_socket_closed", code=code, reason=reason[:300])
        self.log.error("model_socket_closed", code=code, reason=reason[:300])
        self._model_lost(f"close {code}" if code is not None else "connection lost",
                         recoverable=ModelLink.recoverable_close(code))

    def _model_lost(self, cause: str, *, recoverable: bool = True) -> None:
        """The model session is gone mid-call: open a new one and carry the conversation over
        (the backend re-sends it), keeping the Twilio stream up; or, beyond the bounded window
        and attempts, the spoken apology and an orderly end."""
        if self.phase not in (Phase.LIVE, Phase.RESUMING, Phase.CONFIGURING, Phase.RESOLVING):
            self._finish("pipeline-error-openai-llm-failed", {"verb": "hangup", "say": APOLOGY})
            return
        decision = self._link.lost(self.clock(), cause, recoverable=recoverable)
        if type(decision) is not GiveUp:
            if self.phase is Phase.LIVE:
                self._suspend()
            else:  # lost again before the new session was ready, or before the first one was
                self.backend.disconnected()
        self._reconnect_or_give_up(decision)

    def _reconnect_or_give_up(self, decision: Any, reason: str = "pipeline-error-openai-llm-failed") -> None:
        if type(decision) is GiveUp and self.phase is Phase.RESOLVING:
            # The number's fallback destination comes with the set-up: end once it is known.
            self._end_when_set_up = (decision, reason)
            return
        if type(decision) is GiveUp:
            if self._link.outage:
                self.metrics.model_session("abandoned")
                self.record_event("model_reconnect_abandoned", why=decision.why)
                self.log.error("model_reconnect_abandoned", why=decision.why)
            if self._fallback is not None:  # the number's fallback destination: a person, not a hang-up
                action = dict(transfer_action(self._fallback, self._template_variables()), say=FALLBACK_SAY)
                self.records.upsert("calls", {"call_sid": self.call_sid, "transfer": action})
                self._finish(reason, action)
            else:
                self._finish(reason, {"verb": "hangup", "say": APOLOGY})
            return
        self.record_event("model_reconnecting", attempt=decision.attempt, delay_ms=int(decision.delay_s * 1000),
                          cause=self._link.cause)
        self.log.warning("model_reconnecting", attempt=decision.attempt, delay_ms=int(decision.delay_s * 1000),
                         cause=self._link.cause)
        self.effects.append(ConnectModel(decision.delay_s, ATTEMPT_TIMEOUT_S))

    def _suspend(self) -> None:
        """No model session: what was in flight is dropped, requests and caller audio wait."""
        self.phase = Phase.RESUMING
        dropped = self._responses.lost()
        self._dropped_response = dropped
        if dropped is not None:
            self._cancelled.add(dropped)  # its audio already at Twilio plays on; nothing more comes
            for item in list(self._playback.items.values()):
                if item.response_id == dropped and not item.dropped and not item.done:
                    item.interrupted = True  # cut off by the model failure, not finished
                    self._record_item(item)
            for item in self._playback.response_done(dropped):
                self._retire(item)
        self._function_calls = []  # a dropped response's calls are never run (and never were)
        self._gate = None
        # The caller's turn in flight (speaking, or waiting for a reply whose words the model had
        # not transcribed yet) lived in the lost session's input buffer: it is sent again, first.
        in_flight = self._caller_speaking or self._turn_end is not None
        self._reply_on_resume = False
        if in_flight and self._user_turns:
            turn = [(payload.decode(), ts) for at_ms, payload, ts in self._recent_audio if at_ms >= self._turn_onset_ms - 300]
            self._turn_resent = True  # the ring keeps it whole until answered: the next session may be lost too
            # the turn, then what came during the gap; if more than can be held, the newest
            self._early_audio = deque([*turn, *self._early_audio][-MAX_EARLY_FRAMES:], maxlen=MAX_EARLY_FRAMES)
            self._turn_end = None  # the new session's voice detection places the turn again
        elif self._turn_end is not None and dropped is None:
            self._reply_on_resume = True  # its words are in the conversation: ask for the reply
        for item_id in self._user_turns:
            self.backend.delete_item(item_id)  # their words will not come from the lost session
        self._user_turns.clear()
        self._ignored_turns.clear()
        self._noise_items, self._noise_reply_until = [], 0.0
        self._caller_speaking = False
        self._size_ring()
        self.backend.disconnected()

    def _resumed(self, gap_s: float) -> None:
        """A new session holds the conversation: requests and the caller's audio go on."""
        self.phase = Phase.LIVE
        rollover = self._link.cause == "rollover"
        self.metrics.model_session("rolled_over" if rollover else "reconnected")
        self.record_event("model_session_rolled_over" if rollover else "model_reconnected", gap_ms=int(gap_s * 1000))
        self.log.info("model_session_rolled_over" if rollover else "model_reconnected", gap_ms=int(gap_s * 1000))
        dropped, self._dropped_response = self._dropped_response, None
        self._ending.postpone(gap_s)
        # The held caller audio goes first (the new session's input timeline starts at 0 here).
        self._session_input_ms = self._input_ms
        held = list(self._early_audio)
        self._early_audio.clear()
        for payload, timestamp_ms in held:
            self._append_audio(payload, timestamp_ms)
        # What to say now. The caller's own words come first: if they spoke during the gap, the
        # model answers them (its voice detection finds the turn in the held audio), nothing else.
        note = None
        if voiced_ms(held) >= VOICED_HELD_MS or self._ending.pending is not None:
            pass
        elif dropped is not None:
            apology = "First say briefly that the line broke up. " if gap_s >= RECOVERY_LINE_AFTER_S and not rollover else ""
            note = RESUME_AFTER_ROLLOVER if rollover else RESUME_CUT_OFF.format(apology=apology)
        elif self._reply_on_resume:
            self._responses.request_first(self._new_id(), None, "reply")
        elif gap_s >= RECOVERY_LINE_AFTER_S and not rollover:
            note = RESUME_AFTER_GAP
        if note is not None:
            # for this session only: a later replay must not carry it
            self.backend.add_message("system", note, remember=False)
            self._responses.request_first(self._new_id(), None, "resume")
        self._reply_on_resume = False
        self._responses.resume()

    def _at_pause(self) -> bool:
        """Nobody is speaking and nothing is pending: a new session can take over unnoticed."""
        return (not self._caller_speaking and self._turn_end is None and not self._user_turns
                and self.clock() - self._last_speech_event >= PAUSE_S and self._responses.idle
                and not self._playback.awaiting_marks and self._batch is None and self._ending.pending is None)

    def abort(self, reason: str) -> None:
        """End the call for a reason of the shim's own (shutdown, an internal error): the
        caller hears an apology from Twilio and is hung up, never left in silence."""
        self.record_event("aborted", reason=reason)
        self._finish(reason, {"verb": "hangup", "say": APOLOGY})

    def on_model_text(self, text: str | bytes) -> None:
        """One frame from the model socket: the backend decodes it and calls back
        on_model_audio (the hot path) or on_model_event (everything else). A malformed frame is
        rejected by the backend's typed parse (on_model_event_rejected): logged, the call goes on."""
        self.model_events += 1  # the stall watchdog (tick) notices when this stops moving
        self.backend.feed(text, self)

    def on_model_event_rejected(self, error: me.ModelProtocolError) -> None:
        # Bad input loses nothing already accepted: log it, keep the call.
        self.log.warning("model_event_rejected", error=str(error)[:300])

    def on_model_event(self, event: me.ModelEvent) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(self, event)
        elif type(event) is me.Unhandled and event.kind not in self._unhandled_seen and len(self._unhandled_seen) < 64:
            self._unhandled_seen.add(event.kind)
            self.log.debug("model_event_unhandled", kind=event.kind)  # once per kind and call

    def _on_session_rejected(self, event: me.SessionRejected) -> None:
        if self.phase is not Phase.CONFIGURING and self.phase is not Phase.RESUMING:
            return
        # e.g. relaying μ-law into a PCM session would play static to the caller: end cleanly.
        self.record_event("session_format_mismatch", formats=event.formats)
        self.log.error("session_format_mismatch", formats=event.formats, detail=event.detail)
        self._finish("pipeline-error-openai-400-bad-request-validation-failed", {"verb": "hangup", "say": APOLOGY})

    def _on_session_ready(self, event: me.SessionReady) -> None:
        now = self.clock()
        lifetime = None if event.expires_at is None else event.expires_at - self._wall_at(now).timestamp()
        if self.phase is Phase.RESUMING:
            gap = self._link.session_ready(now, lifetime)
            self._resumed(gap or 0.0)
            return
        if self.phase is not Phase.CONFIGURING:
            return
        self._link.session_ready(now, lifetime)
        self.phase = Phase.LIVE
        self._ending.live(self.clock(), max_duration_s=self.setup.policy.max_duration_s,
                          silence_timeout_s=self.setup.policy.silence_timeout_s)
        self._server_message("status-update", lambda info, now_ms: envelope.status_update_message(
            info, "in-progress", self.artifact_messages(), now_ms))
        assert self.setup is not None
        greeting = self.setup.greeting
        for role, text in self.setup.policy.few_shot:
            self.backend.add_message(role, text)
        if greeting.mode == "assistant-speaks-first":
            self._request_response("Greet the caller. " + SAY_EXACTLY.format(text=greeting.text), "greeting")
        elif greeting.mode == "assistant-speaks-first-with-model-generated-message":
            self._request_response(None, "greeting")
        for payload, timestamp_ms in self._early_audio:
            self._append_audio(payload, timestamp_ms)
        self._early_audio.clear()

    def _input_time(self, audio_ms: Any) -> float:
        """clock() of a point on the model's input-audio timeline (speech_started/stopped)."""
        if not isinstance(audio_ms, (int, float)) or not self._breaks_at:
            return self.clock()
        audio_ms += self._session_input_ms  # a new session's input timeline starts at 0
        i = max(bisect_right(self._breaks_at, audio_ms) - 1, 0)
        return self._stream_t0 + (audio_ms + self._breaks_offset[i]) / 1000

    def _on_speech_started(self, event: me.SpeechStarted) -> None:
        now = self.clock()
        self._ending.activity(now)
        self._caller_speaking = True
        self._size_ring()
        self._last_speech_event = now
        self._turn_onset_ms = self._session_input_ms + (event.audio_start_ms or 0)
        item_id = event.item_id or f"user_{self._seq + 1}"
        # audio_start_ms includes the prefix padding the server keeps before detected speech
        assert self.setup is not None
        onset_ms = (event.audio_start_ms or 0) + self.setup.policy.prefix_padding_ms
        started = min(now, self._input_time(onset_ms))
        turn = UserTurn(self._next_seq(), item_id, started)
        self._user_turns[item_id] = turn
        self.records.upsert(
            "utterances",
            {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "item_id": item_id, "started_at": self._wall_at(started)},
        )
        playing = self._playback.playing()
        generating = self._responses.generating
        if not playing and not generating:
            return  # nothing to interrupt: an ordinary turn
        if not self.setup.greeting.interruptible:
            in_greeting = any(item.greeting for item in playing) or (
                generating and self._responses.active_id == self._greeting_response_id
            )
            if in_greeting:
                return  # Vapi: firstMessageInterruptionsEnabled=false, the greeting is not cut off
        need_ms = self.setup.policy.barge_in_voice_ms
        if need_ms <= 0:
            self._barge_in()
        else:
            self._gate = BargeInGate(item_id, need_ms)

    def _gate_frame(self, payload: str) -> None:
        """Count voiced caller audio while the gate is open (the only place the shim looks at
        caller samples: decoding costs a few microseconds a frame, and only during the gate)."""
        gate = self._gate
        assert gate is not None
        if not self._playback.playing() and not self._responses.generating:
            self._gate = None  # the assistant finished on its own: nothing left to cut off
            return
        try:
            pcm = audioop.ulaw2lin(base64.b64decode(payload), 2)
        except (ValueError, TypeError):
            return
        if audioop.rms(pcm, 2) >= VOICE_RMS:
            gate.voiced_ms += len(pcm) / 16  # 2 bytes a sample, 8 samples a ms
            if gate.voiced_ms >= gate.need_ms:
                self._gate = None
                self._barge_in()

    def _barge_in(self) -> None:
        """The caller is talking over the assistant: stop it, and tell the model exactly how
        much of it the caller heard (Twilio's mark echoes, never more than was sent)."""
        playing = self._playback.playing()
        generating = self._responses.generating
        if not playing and not generating:
            return
        self.metrics.barge_in()
        self._ending.caller_talked_over()  # an unheard end-call phrase does not hang up on the caller
        if generating:
            self.backend.cancel_response(self._responses.active_id)
        if playing:
            self.twilio_out.append(tw.clear_frame(self.stream_sid))
            self._playback.clear(self.clock())  # pending marks' echoes now mean "discarded"
        if generating:
            self._cancelled.add(self._responses.active_id)
        for item, heard_ms in self._playback.cut(self._responses.active_id):
            if heard_ms > 0:
                self.backend.truncate_item(item.item_id, heard_ms)
            else:
                # Nothing of it reached the caller: truncating at 0 is rejected by the API, and
                # the model must not believe it said these words.
                self.backend.delete_item(item.item_id)
            self._record_item(item)
        self.record_event("barge_in", response_id=self._responses.active_id)
        self.log.info("barge_in", response_id=self._responses.active_id)

    def _on_speech_stopped(self, event: me.SpeechStopped) -> None:
        now = self.clock()
        self._ending.activity(now)
        self._caller_speaking = False
        self._last_speech_event = now
        assert self.setup is not None
        # audio_end_ms includes the silence window that confirmed the end of the turn.
        ended = self._input_time(event.audio_end_ms) - self.setup.policy.silence_duration_ms / 1000
        self._turn_end = min(now, ended)
        self._size_ring()
        item_id = event.item_id
        turn = self._user_turns.get(item_id)
        if turn is not None:
            self.records.upsert(
                "utterances",
                {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "ended_at": self._wall_at(self._turn_end)},
            )
        if self._gate is not None and self._gate.item_id == item_id:
            # Too little voice to cut the assistant off (a cough, noise, echo, an "mm-hm"): the
            # assistant goes on, and the reply the server creates for this turn is dropped.
            self._gate = None
            self._turn_end = None
            self._size_ring()
            self._noise_reply_until = now + NOISE_REPLY_WINDOW_S
            self._noise_items.append(item_id)
            self._ignored_turns.add(item_id)
            self.record_event("interruption_ignored", item_id=item_id)
        elif (active := self._responses.active_id) is not None and active not in self._cancelled and self._ending.pending is None:
            # A real turn ended under a response nobody cancelled (e.g. a tool answer that started
            # mid-turn): with interrupt_response off the server's own reply to it fails (openai SDK,
            # turn_detection.create_response), so it is asked for once that response is done.
            self._request_response()

    def _on_user_transcript(self, event: me.UserTranscript) -> None:
        item_id = event.item_id
        turn = self._user_turns.get(item_id)
        if turn is None:  # no speech_started seen (e.g. a manual commit): place it now
            turn = self._user_turns[item_id] = UserTurn(self._next_seq(), item_id, self.clock())
            self.records.upsert(
                "utterances",
                {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "item_id": item_id,
                 "started_at": self._wall_at(self.clock())},
            )
        text = event.text
        self.records.upsert(
            "utterances",
            {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "text": self._keep_text(text)},
        )
        self._user_turns.pop(item_id, None)
        if item_id in self._ignored_turns:
            self._ignored_turns.discard(item_id)
            return  # not a turn: a cough or an "mm-hm" under the assistant
        self._artifact_add(("u", turn.seq), "user", text, turn.started)
        self._server_message("transcript", lambda info, now_ms: envelope.transcript_message(info, "user", text, now_ms))

    def _request_response(self, instructions: str | None = None, purpose: str = "reply") -> None:
        """Ask the model for a response. Only one response may be active at a time: while one
        is, or one we asked for has not started yet, requests wait here, in order. Our requests
        carry their event_id in the response metadata, so the response.created that answers
        one is told apart from a response the server started on its own (the caller spoke)."""
        self._responses.request(self._new_id(), instructions, purpose)

    def _on_response_started(self, event: me.ResponseStarted) -> None:
        response_id, ours, purpose = event.response_id, event.request_id, event.purpose
        self._responses.on_started(response_id, ours)
        if self._noise_items:
            noise, self._noise_items = self._noise_items, []
            if ours is None and self.clock() < self._noise_reply_until:
                # the server's own reply to a turn the gate judged to be noise
                self.backend.cancel_response(response_id)
                self._cancelled.add(response_id)
                for item_id in noise:  # keep the noise out of the model's context
                    self.backend.delete_item(item_id)
                return
        if purpose == "greeting":
            self._greeting_response_id = response_id
        if purpose == "goodbye":
            self._ending.goodbye_started()

    def _on_audio_delta(self, event: me.AudioDelta) -> None:
        self.on_model_audio(event.response_id, event.item_id, event.audio_b64)

    def on_model_audio(self, response_id: str, item_id: str, delta: str) -> None:
        """One chunk of the assistant's voice (the hot path): one Twilio media + one mark."""
        if self.phase is not _LIVE:
            return
        playback = self._playback
        item = playback.items.get(item_id)
        now = self.clock()
        if item is None:
            if response_id in self._cancelled:
                return  # a late delta of a response the caller interrupted
            item = self._new_item(item_id, response_id, now)
        if item.dropped:
            return  # deltas still in flight after a barge-in
        pad = 2 if delta.endswith("==") else 1 if delta.endswith("=") else 0  # tw.b64_decoded_len, inlined
        name = playback.sent(item, len(delta) * 3 // 4 - pad, now)
        sid = self.stream_sid
        if self._mixer is not None:  # same length out: marks and truncation math are unchanged
            delta = self._mixer.mix_b64(delta)
        # twilio_media.media_frame + mark_frame, inlined: two calls fewer per delta on the hot path
        out = self.twilio_out
        out.append('{"event":"media","streamSid":"' + sid + '","media":{"payload":"' + delta + '"}}')
        out.append('{"event":"mark","streamSid":"' + sid + '","mark":{"name":"' + name + '"}}')
        self.frames_out += 1

    def _new_item(self, item_id: str, response_id: str, now: float) -> AssistantItem:
        item = AssistantItem(
            item_id=item_id,
            response_id=response_id,
            seq=self._next_seq(),
            greeting=response_id != "" and response_id == self._greeting_response_id,
            started=max(now, self._playback.free_at),
        )
        self._playback.add(item)
        item.transcript.extend(self._early_transcript.pop(item_id, ()))
        row: dict[str, Any] = {
            "call_sid": self.call_sid,
            "seq": item.seq,
            "role": "assistant",
            "item_id": item_id,
            "started_at": self._wall_at(max(now, self._playback.free_at)),
        }
        self._turn_resent = False  # an answer: whatever turn was re-sent is no longer in flight
        if self._turn_end is not None:
            latency = now - self._turn_end
            self._turn_end = None
            row["latency_ms"] = int(round(latency * 1000))
            self.metrics.turn_latency(latency)
        self._size_ring()
        self.records.upsert("utterances", row)
        return item

    def _on_transcript_delta(self, event: me.TranscriptDelta) -> None:
        delta, item_id = event.text, event.item_id
        item = self._playback.items.get(item_id)
        if item is not None:
            item.transcript.append(delta)
        elif len(self._early_transcript) < 16:  # text may arrive before the item's first audio
            self._early_transcript.setdefault(item_id, []).append(delta)

    def _on_transcript_done(self, event: me.TranscriptDone) -> None:
        item = self._playback.items.get(event.item_id)
        if item is None:
            return
        item.final_transcript = event.text
        self._record_item(item)
        assert self.setup is not None
        said = item.final_transcript.lower()
        if not item.dropped and any(phrase in said for phrase in self.setup.policy.end_call_phrases):
            # Vapi: an end-call phrase in the assistant's own words hangs up once it was heard.
            self._end_after_playback("assistant-said-end-call-phrase", cancellable=True)

    def _record_item(self, item: AssistantItem, final: bool = False) -> None:
        full = item.final_transcript if item.final_transcript is not None else "".join(item.transcript)
        row: dict[str, Any] = {
            "call_sid": self.call_sid,
            "seq": item.seq,
            "role": "assistant",
            "audio_ms": item.sent_bytes // tw.MULAW_BYTES_PER_MS,
            "heard_ms": item.played_bytes // tw.MULAW_BYTES_PER_MS,
        }
        if item.played_bytes:  # Twilio plays an item's audio without gaps: the end is start + heard
            row["ended_at"] = self._wall_at(item.started + item.played_bytes / (tw.MULAW_BYTES_PER_MS * 1000))
        if item.interrupted:
            said = heard_text(full, item.played_bytes, item.sent_bytes)
            row.update(interrupted=True, text=self._keep_text(said), full_text=self._keep_text(full))
        else:
            said = full
            if full or final:
                row["text"] = self._keep_text(full)
        self.records.upsert("utterances", row)
        if said and (item.interrupted or item.final_transcript is not None or final):
            first = ("b", item.seq) not in self._artifact
            self._artifact_add(("b", item.seq), "bot", said, item.started)
            if first:
                self._server_message("transcript", lambda info, now_ms: envelope.transcript_message(info, "assistant", said, now_ms))

    def _keep_text(self, text: str) -> str | None:
        """hipaaEnabled: no transcript text is stored (the row, its timing and flags still are)."""
        if self.setup is not None and self.setup.policy.hipaa:
            return None
        return text.replace("\x00", "") if "\x00" in text else text  # Postgres text cannot hold NUL

    def _on_function_call(self, event: me.FunctionCall) -> None:
        self._function_calls.append(event)  # run when the response is done

    def _retire(self, item: AssistantItem) -> None:
        """An item fully generated and fully heard: record it for good and forget it, so a long
        call keeps only what may still be interrupted."""
        if self._playback.forget(item):
            self._record_item(item, final=True)

    def _on_response_done(self, event: me.ResponseDone) -> None:
        response_id = event.response_id
        self._responses.on_done(response_id)
        for item in self._playback.response_done(response_id):
            self._retire(item)
        if event.usage and self.call_sid:  # billed tokens -> calls.cost_usd (0006)
            self.records.upsert("model_usage", {"call_sid": self.call_sid, "response_id": response_id,
                                                "at": self._wall_at(self.clock()), "usage": event.usage})
        status = event.status
        if status == "failed":
            self.metrics.model_error()
            detail = event.error
            self.record_event("response_failed", error=detail)
            self.log.error("response_failed", error=detail)
        calls, self._function_calls = self._function_calls, []
        if status == "completed" and calls and response_id not in self._cancelled:
            self._run_function_calls(calls)
        if self._ending.pending is not None:
            self._maybe_hang_up()
        self._responses.pump()

    # --- tools ---------------------------------------------------------------------------
    #
    # At response.done (only one response may be active), every function call of the response
    # becomes a ToolRequest for the shell (webhooks) or is handled here (endCall, transferCall,
    # dtmf). Every call_id gets a function_call_output; when the last one is in, exactly one
    # response.create follows (or the tool's own spoken message, as Vapi does).

    def _run_function_calls(self, calls: list[me.FunctionCall]) -> None:
        assert self.setup is not None
        bindings = {b.realtime_name: b for b in self.setup.tools}
        # A response may call tools while an earlier batch still waits (the caller spoke, the
        # model called again): one batch, finished once every call_id is answered.
        batch = self._batch if self._batch is not None else ToolBatch()
        start_message = None
        for call in calls:
            name, call_id = call.name, call.call_id
            binding = bindings.get(name)
            try:
                arguments = orjson.loads(call.arguments)
            except orjson.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                arguments = {}
                self._tool_output(call_id, "Error: the arguments were not a JSON object.", "error", name=name)
                continue
            self._tool_seq += 1
            seq = self._tool_seq
            self._tool_calls[call_id] = (seq, self.clock(), name)
            self._tool_args[call_id] = arguments
            self._artifact_add(("t", call_id), "tool_calls", "", self.clock(), tool_calls=[
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}])
            self.records.upsert(
                "tool_calls",
                {"call_sid": self.call_sid, "seq": seq, "call_id": call_id, "name": name, "arguments": arguments,
                 "status": "requested", "requested_at": self._wall_at(self.clock())},
            )
            kind = binding.kind if binding is not None else "unknown"
            if kind == tool_kinds.END_CALL.name:
                self._tool_output(call_id, "Ending the call.", "ok")
                batch.end_reason = "assistant-ended-call"
                batch.end_say = tool_message(binding.vapi_tool, "request-start", arguments, rng=self._rng) or self.setup.policy.end_call_message
            elif kind == tool_kinds.TRANSFER_CALL.name:
                self._transfer(call_id, binding, arguments, batch)
            elif kind == tool_kinds.DTMF.name:
                self._press_keys(call_id, arguments)
            elif kind in tool_kinds.SUPPORTED:  # a request leaves: the customer's server, or apiRequest's URL
                request = ToolRequest(call_id=call_id, binding=binding, arguments=arguments, seq=seq,
                                      fire_and_forget=bool(binding.vapi_tool.get("async")))
                self.effects.append(request)
                if request.fire_and_forget:
                    self._tool_output(call_id, async_outcome(call_id).output, "async")
                else:
                    batch.expect(call_id, self.clock() + server_timeout(binding.vapi_tool) + BACKSTOP_S)
                    start_message = start_message or tool_message(binding.vapi_tool, "request-start", arguments, rng=self._rng)
            else:
                self._tool_output(call_id, f"Error: there is no tool named {name!r}.", "error")
        self._batch = batch
        if start_message:
            self._say(start_message, "tool-message")  # while the webhook runs, without blocking audio
        if batch.complete:
            self._finish_batch()

    def on_tool_outcome(self, outcome: ToolOutcome, url: str | None = None) -> None:
        """A webhook answered (or failed): pass it to the model; continue once all are in."""
        batch = self._batch
        if self.end is not None or batch is None or not batch.answered(outcome.call_id):
            return
        self._tool_output(outcome.call_id, outcome.output, outcome.status, result=outcome.result,
                          error=outcome.error, url=url, http_status=outcome.http_status)
        binding = self._binding_for(outcome.call_id)
        if binding is not None:
            kind = "request-complete" if outcome.status == "ok" else "request-failed"
            # The endpoint's own `message` wins over the tool's configured one (Vapi).
            if isinstance(outcome.message, dict) and outcome.message.get("type") == kind:
                spoken, text = outcome.message, str(outcome.message.get("content") or "")
            else:
                spoken = first_message(binding.vapi_tool, kind)
                text = (tool_message(binding.vapi_tool, kind, self._tool_args.get(outcome.call_id, {}), rng=self._rng) or "") if spoken else ""
            if spoken and text:
                if spoken.get("role") == "system":
                    batch.system_notes.append(text)  # a hint for the model, which then answers
                else:
                    batch.speak_instead = text  # said word for word; the model is not asked
                    if spoken.get("endCallAfterSpokenEnabled"):
                        batch.end_reason = "assistant-ended-call-after-message-spoken"
        if batch.complete:
            self._finish_batch()

    def on_tool_delayed(self, call_id: str, text: str) -> None:
        """request-response-delayed: the webhook is slow, say so (2.5 s apart at most, as Vapi)."""
        batch = self._batch
        now = self.clock()
        if batch is None or call_id not in batch.pending or now - self._last_delay_message < 2.5:
            return
        self._last_delay_message = now
        self._say(text, "tool-message")

    def _finish_batch(self) -> None:
        batch, self._batch = self._batch, None
        assert batch is not None and self.setup is not None
        after = batch.after()
        for note in after.notes:
            self.backend.add_message("system", note)
        if after.end_reason is not None:
            self._end_after_playback(after.end_reason, say_first=after.say, next_action=after.next_action)
        elif after.say:
            self._say(after.say, "tool-message")  # Vapi: this, not the model, answers
        else:
            self._request_response()

    def _tool_output(self, call_id: str, output: str, status: str, *, name: str | None = None,
                     result: str | None = None, error: str | None = None, url: str | None = None,
                     http_status: int | None = None) -> None:
        self.backend.send_tool_result(call_id, output)
        info = self._tool_calls.get(call_id)
        if info is not None:
            seq, started, tool_name = info
            self._artifact_add(("r", call_id), "tool_call_result", "", self.clock(), name=tool_name,
                               result=self._keep_text(output) or "", tool_call_id=call_id)
            self.records.upsert(
                "tool_calls",
                {"call_sid": self.call_sid, "seq": seq, "status": status, "url": url, "http_status": http_status,
                 "result": self._keep_text(result if result is not None else output), "error": error,
                 "latency_ms": int(round((self.clock() - started) * 1000)),
                 "completed_at": self._wall_at(self.clock())},
            )

    def _binding_for(self, call_id: str) -> ToolBinding | None:
        info = self._tool_calls.get(call_id)
        if info is None or self.setup is None:
            return None
        return next((b for b in self.setup.tools if b.realtime_name == info[2]), None)

    def _transfer(self, call_id: str, binding: ToolBinding, arguments: dict[str, Any], batch: ToolBatch) -> None:
        wanted = str(arguments.get("destination") or "")
        destination = binding.destinations.get(wanted) if wanted else None
        if destination is None and len(binding.destinations) == 1 and not wanted:
            destination = next(iter(binding.destinations.values()))
        if destination is None and not binding.destinations:
            # Vapi asks the server where to transfer (transfer-destination-request).
            self.effects.append(ToolRequest(call_id=call_id, binding=binding, arguments=arguments,
                                                  seq=self._tool_calls[call_id][0], kind="transfer-destination-request"))
            batch.expect(call_id, self.clock() + DEFAULT_TIMEOUT_S + BACKSTOP_S)
            return
        if destination is None:
            self._tool_output(call_id, f"Error: {wanted!r} is not one of the transfer destinations.", "error")
            return
        self._tool_output(call_id, "Transferring the call.", "ok")
        batch.transfer = transfer_action(destination, self._template_variables())
        batch.transfer_say = transfer_message(binding.vapi_tool, destination, arguments, self._rng)
        self.records.upsert("calls", {"call_sid": self.call_sid, "transfer": batch.transfer})

    def on_transfer_destination(self, call_id: str, answer: dict[str, Any] | None, error: str | None) -> None:
        """The server's answer to transfer-destination-request: a destination, or an error to say."""
        batch = self._batch
        if self.end is not None or batch is None or not batch.answered(call_id):
            return
        destination = (answer or {}).get("destination")
        spoken_error = (answer or {}).get("error") or error
        if isinstance(destination, dict) and (destination.get("number") or destination.get("sipUri")):
            self._tool_output(call_id, "Transferring the call.", "ok")
            batch.transfer = transfer_action(destination, self._template_variables())
            message = (answer or {}).get("message")
            batch.transfer_say = (message.get("content") if isinstance(message, dict) else None) or destination.get(
                "message", "Transferring the call now")
            self.records.upsert("calls", {"call_sid": self.call_sid, "transfer": batch.transfer})
        else:
            text = str(spoken_error or "No transfer destination is available.")
            self._tool_output(call_id, f"Error: {text}", "error", error=text)
            if (answer or {}).get("error"):
                batch.speak_instead = text  # Vapi speaks the server's error
        if batch.complete:
            self._finish_batch()

    def _press_keys(self, call_id: str, arguments: dict[str, Any]) -> None:
        """Vapi's dtmf tool: Media Streams cannot send out-of-band DTMF, so the tones are played
        in-band, queued at Twilio like speech (the far end's IVR hears them)."""
        try:
            keys = validate_keys(str(arguments.get("keys") or arguments.get("digits") or ""))
            tones = dtmf_ulaw(keys)
        except DtmfError as exc:
            self._tool_output(call_id, f"Error: {exc}", "error", error=str(exc))
            return
        payload = base64.b64encode(tones).decode()
        self.twilio_out.append(tw.media_frame(self.stream_sid, payload))
        name = self._playback.tones_sent(len(tones), self.clock())  # a hang-up waits until they have played
        self.twilio_out.append(tw.mark_frame(self.stream_sid, name))
        self.record_event("dtmf_sent", keys=keys)
        self._tool_output(call_id, f"Pressed {keys}.", "ok")

    def _template_variables(self) -> dict[str, Any]:
        return self.setup.variables if self.setup is not None else {}

    def _say(self, text: str, purpose: str) -> None:
        """Speak a fixed sentence (tool messages), word for word, in turn with other responses."""
        self._request_response(SAY_EXACTLY.format(text=text), purpose)

    def _end_after_playback(self, reason: str, say_first: str = "", next_action: dict[str, Any] | None = None,
                            cancellable: bool = False) -> None:
        """Hang up (or transfer) once everything queued at Twilio has been played (marks),
        optionally after saying `say_first` word for word; bounded so a lost mark cannot keep
        the line open."""
        if self._ending.end_after_playback(reason, self.clock(), self._playback.free_at, say_first=say_first,
                                           next_action=next_action, cancellable=cancellable):
            self._maybe_hang_up()

    def _maybe_hang_up(self) -> None:
        step = self._ending.next_step(self.clock(), generating=self._responses.generating,
                                      awaiting_marks=self._playback.awaiting_marks)
        if type(step) is SayGoodbye:
            self._request_response(SAY_EXACTLY.format(text=step.text), "goodbye")
        elif type(step) is HangUp:
            self._finish(step.reason, step.next_action)

    def _on_error(self, event: me.ModelError) -> None:
        code = event.code
        if self._responses.on_refused(event.request_id, event.busy) and event.busy:
            return  # retried once the active response is done
        self.metrics.model_error()
        self.record_event("model_error", code=code, message=event.message, param=event.param)
        self.log.warning("model_error", code=code, message=event.message)
        if event.fatal:
            # session_expired: the session's time limit (a new one continues the call); a
            # credential error ends it.
            self._model_lost(f"error {code}", recoverable=code == "session_expired")
        elif self.phase is Phase.CONFIGURING:
            # session.update refused (a voice, a tool schema...): the call cannot be configured.
            self._finish("pipeline-error-openai-400-bad-request-validation-failed", {"verb": "hangup", "say": APOLOGY})

    _handlers: dict[type, Callable[[Call, Any], None]] = {
        me.SessionReady: _on_session_ready,
        me.SessionRejected: _on_session_rejected,
        me.SpeechStarted: _on_speech_started,
        me.SpeechStopped: _on_speech_stopped,
        me.UserTranscript: _on_user_transcript,
        me.ResponseStarted: _on_response_started,
        me.AudioDelta: _on_audio_delta,
        me.TranscriptDelta: _on_transcript_delta,
        me.TranscriptDone: _on_transcript_done,
        me.FunctionCall: _on_function_call,
        me.ResponseDone: _on_response_done,
        me.ModelError: _on_error,
    }

    # --- time ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Called about twice a second by the shell: call-level timers."""
        now = self.clock()
        if self.phase in (Phase.RESOLVING, Phase.CONFIGURING) and now - self._mono0 > SETUP_DEADLINE_S:
            # The assistant or the model session never got ready: never leave a caller in silence.
            self.record_event("setup_timed_out", phase=self.phase.value)
            self._finish("pipeline-error-openai-llm-failed", {"verb": "hangup", "say": APOLOGY})
            return
        if self.phase is Phase.RESUMING:
            if self._link.overdue(now):  # a socket opened but no session became ready in time
                self._reconnect_or_give_up(GiveUp(f"{self._link.cause} (no session ready in time)"))
                return
        elif self.phase is not Phase.LIVE or self.setup is None:
            return
        else:
            active = self._responses.active_id
            if self._model_progress[0] != self.model_events or active is None:
                self._model_progress = (self.model_events, now)
            elif now - self._model_progress[1] > MODEL_STALL_S:  # mid-answer, and the model went silent
                self.metrics.model_error()
                self.record_event("model_stalled", response_id=active, silent_s=round(now - self._model_progress[1], 1))
                self.log.error("model_stalled", response_id=active)
                self._model_progress = (self.model_events, now)
                self._model_lost("stalled")  # the shell closes that socket for the new one
                if self.end is not None:
                    return
            if self.phase is Phase.LIVE and self._link.rollover_due(now, self._at_pause()):
                # Before the session's time limit, at a pause: a fresh session, invisible to the caller.
                self.record_event("model_rollover", session_left_s=round((self._link.deadline or now) - now, 1))
                self._link.rolling_over(now)
                self._suspend()
                self.effects.append(ConnectModel(0.0, ATTEMPT_TIMEOUT_S))
        batch = self._batch
        if batch is not None:
            for call_id in batch.overdue(now):  # a webhook task died without answering
                self.on_tool_outcome(ToolOutcome(call_id, "timeout", NO_RESULT, None, "no answer", None, None))
        if self._responses.check_unanswered(now):
            self.record_event("response_create_unanswered")  # neither created nor refused: moved on
        if self._ending.duration_exceeded(now):
            self._finish("exceeded-max-duration")
            return
        if self.keypad is not None:
            entry = self.keypad.due(now)
            if entry:
                self._keypad_entry(entry)
        if self._turn_end is not None and now - self._turn_end > HANG_AFTER_S and self._hang_sent_for != self._turn_end:
            # Vapi's `hang`: the caller finished speaking and nothing has come back for a while.
            self._hang_sent_for = self._turn_end
            self._server_message("hang", lambda info, now_ms: envelope.hang_message(info, now_ms))
        if self.phase is Phase.RESUMING:
            return  # a caller waiting through a reconnect is not silent, and a goodbye waits for the model
        hang_up = self._ending.due(now, assistant_busy=self._playback.awaiting_marks or self._responses.generating)
        if hang_up is not None:
            self._finish(hang_up.reason, hang_up.next_action)

    # --- output --------------------------------------------------------------------------

    def take_twilio_out(self) -> list[str]:
        out, self.twilio_out = self.twilio_out, []
        return out

    def take_effects(self) -> list[Effect]:
        out, self.effects = self.effects, []
        return out

    def take_model_out(self) -> list[str]:
        backend = self.backend
        out, backend.out = backend.out, []
        return out
