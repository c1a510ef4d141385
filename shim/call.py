"""One phone call as a sans-I/O state machine: Twilio frames and Realtime events in, frames,
events and database rows out. No sockets, no awaits, no clocks of its own (they are injected),
so every behaviour here is tested without a network.

After feeding an input, the I/O shell drains `twilio_out` and `model_out` (strings to send),
`tool_requests` (webhooks to run, answered through `on_tool_outcome`) and `server_out` (Vapi
server messages to deliver); it resolves the assistant once `start` is set (`on_setup`), opens
the model socket, and closes everything once `end` is set.

A frame in -> a frame out is one synchronous call: caller audio becomes one
`input_audio_buffer.append`, model audio becomes one Twilio `media` + one `mark`. Rows go to the
injected RecordSink, whose `upsert`/`insert` only enqueue.
"""

from __future__ import annotations

import base64
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Callable, Protocol

import orjson

try:  # the stdlib module below 3.13, the audioop-lts package from 3.13 on
    import audioop
except ImportError:  # pragma: no cover
    import audioop_lts as audioop  # type: ignore[no-redef]

from . import realtime_events as rt
from . import twilio_media as tw
from .assistant import AssistantError, AssistantNotFound, render
from tools import envelope
from tools.dtmf import DtmfError, KeypadBuffer, dtmf_ulaw, keypad_text, validate_keys
from tools.results import NO_RESULT, ToolOutcome, async_outcome, tool_message

from .tool_schema import ToolBinding
from .translate import CallSetup

# Caller audio that arrives before the model session is configured waits here (20 ms frames).
MAX_EARLY_FRAMES = 500  # 10 s
APOLOGY = "Sorry, we are having technical difficulties. Please call again later."
# Caller audio louder than this (16-bit RMS, about -36 dBFS) counts as voice for the barge-in
# gate; PSTN echo of the assistant and room noise usually sit well below it.
VOICE_RMS = 500
# A goodbye is waited for at most its remaining audio plus this, then the call hangs up anyway.
HANGUP_GRACE_S = 5.0
# A turn the gate judged to be noise: the reply the server creates for it is cancelled if it
# starts within this window.
NOISE_REPLY_WINDOW_S = 3.0
SETUP_DEADLINE_S = 15.0  # from the stream's start to a configured model session
HANG_AFTER_S = 5.0
# A response in progress with no model event for this long: the socket is open but the model is
# gone (Realtime streams deltas every few hundred ms); treated as a loss of the model.
MODEL_STALL_S = 10.0  # no reply this long after the caller stopped: Vapi's `hang` server message
SAY_EXACTLY = 'Say exactly the following words, word for word, and nothing else: "{text}"'


class RecordSink(Protocol):
    def upsert(self, table: str, row: dict[str, Any], *, keep_existing: tuple[str, ...] = ()) -> None: ...
    def insert(self, table: str, row: dict[str, Any]) -> None: ...


class Metrics(Protocol):
    def barge_in(self) -> None: ...
    def model_error(self) -> None: ...
    def turn_latency(self, seconds: float) -> None: ...


class NoMetrics:
    def barge_in(self) -> None: ...
    def model_error(self) -> None: ...
    def turn_latency(self, seconds: float) -> None: ...


class AudioMixer(Protocol):
    def mix_b64(self, voice_b64: str) -> str: ...


class Phase(Enum):
    AWAITING_START = "awaiting_start"
    RESOLVING = "resolving"  # `start` received; the shell is loading the assistant
    CONFIGURING = "configuring"  # model socket opening, session.update not yet acknowledged
    LIVE = "live"
    ENDED = "ended"


@dataclass(frozen=True)
class End:
    reason: str  # Vapi endedReason vocabulary
    next_action: dict[str, Any]  # what /twilio/stream-ended answers


@dataclass(slots=True)
class AssistantItem:
    """One assistant message item's audio on its way to the caller."""

    item_id: str
    response_id: str
    seq: int
    greeting: bool
    started: float = 0.0  # clock() when the caller starts hearing it (estimated)
    sent_bytes: int = 0
    played_bytes: int = 0  # confirmed by Twilio mark echoes
    transcript: list[str] = field(default_factory=list)
    final_transcript: str | None = None
    interrupted: bool = False
    dropped: bool = False  # interrupted: further deltas are not forwarded
    done: bool = False  # its response finished: no more audio will come


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


@dataclass(slots=True)
class PendingEnd:
    """Hang up once everything queued at Twilio has been heard (bounded wait)."""

    reason: str
    deadline: float
    say_first: str = ""  # spoken (word for word) before hanging up
    awaiting_goodbye: bool = False  # its response.create is sent, the response not yet created
    next_action: dict[str, Any] | None = None  # e.g. a transfer's <Dial>
    # An end-call phrase only ends the call once heard: talking over it cancels the hang-up.
    # endCall, transfers and tool endings stand even if the caller talks over the goodbye.
    cancellable: bool = False


@dataclass(slots=True)
class ToolRequest:
    """Work for the shell: a webhook to call for one function call (the core decides, the shell
    does the I/O and feeds the answer back through on_tool_outcome / on_transfer_destination)."""

    call_id: str
    binding: ToolBinding
    arguments: dict[str, Any]
    seq: int
    fire_and_forget: bool = False  # async tools: the model was answered already
    kind: str = "tool-calls"  # or "transfer-destination-request"


@dataclass(slots=True)
class ToolBatch:
    """The function calls of one response, until the last answer is in."""

    pending: set[str] = field(default_factory=set)
    speak_instead: str | None = None  # a request-complete/failed message answers instead of the model
    system_notes: list[str] = field(default_factory=list)
    end_reason: str | None = None
    end_say: str = ""
    transfer: dict[str, Any] | None = None
    transfer_say: str = ""
    deadline: float = 0.0  # by then every webhook has answered or timed out: a backstop


def heard_text(text: str, heard_bytes: int, total_bytes: int) -> str:
    """Best estimate of the words the caller heard: the share of the text proportional to the
    audio played, cut back to a word boundary (a half-heard word is not counted)."""
    if total_bytes <= 0 or heard_bytes <= 0 or not text:
        return ""
    if heard_bytes >= total_bytes:
        return text
    cut = int(len(text) * heard_bytes / total_bytes)
    if cut < len(text) and not text[cut].isspace():
        space = text.rfind(" ", 0, cut)
        cut = space if space >= 0 else 0
    return text[:cut].rstrip()


class Call:
    def __init__(
        self,
        records: RecordSink,
        *,
        log: Any,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ):
        self.records = records
        self.log = log
        self.metrics = metrics or NoMetrics()
        self.clock = clock
        self._wall0 = wall()
        self._mono0 = clock()

        self.phase = Phase.AWAITING_START
        self.twilio_out: list[str] = []
        self.model_out: list[str] = []
        self.end: End | None = None
        self.start: tw.Start | None = None  # set on `start`: the shell then resolves the assistant
        self.info: envelope.CallInfo | None = None  # who/what the call is, for Vapi's envelopes
        self.server_out: list[tuple[str, dict[str, Any]]] = []  # server messages to deliver
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
        self.admit_start: Callable[[tw.Start], str | None] | None = None  # set by the shell (stream token)
        self.model_events = 0  # counted per event; tick() notices when it stops moving
        self._model_progress = (0, self._mono0)  # (model_events, clock()) when it last moved
        self.frames_rejected = 0  # Twilio frames dropped as malformed (bad JSON, invalid base64...)

        self._early_audio: deque[tuple[str, int]] = deque(maxlen=MAX_EARLY_FRAMES)
        self._seq = 0
        self._items: dict[str, AssistantItem] = {}
        self._marks: dict[str, tuple[AssistantItem, int]] = {}
        self._mark_counter = 0
        self._user_turns: dict[str, UserTurn] = {}
        self._response_id: str | None = None
        self._cancelled: set[str] = set()
        self._early_transcript: dict[str, list[str]] = {}
        self._greeting_response_id: str | None = None
        # The model's input-audio timeline (ms of caller audio appended) -> Twilio's stream clock
        # (media.timestamp): offsets change only where Twilio's clock jumped past a gap.
        self._input_ms = 0.0
        self._offset_ms: float | None = None
        self._breaks_at: list[float] = []
        self._breaks_offset: list[float] = []
        self._stream_t0 = self._mono0  # clock() at Twilio's stream time 0 (the `start` frame)
        self._turn_end: float | None = None  # caller end of speech awaiting the next first byte
        self._playback_free_at = 0.0  # clock() at which Twilio's buffer should be empty
        self._last_activity = self._mono0
        self._live_at: float | None = None
        self._gate: BargeInGate | None = None
        self._noise_reply_until = 0.0
        self._noise_items: list[str] = []
        self._pending_end: PendingEnd | None = None
        self._function_calls: list[dict[str, Any]] = []  # finished in the current response
        self._response_queue: deque[tuple[str, str]] = deque()  # (event_id, response.create) waiting
        # (event_id, response.create) sent but not yet started or refused, and when it was sent
        self._in_flight: tuple[str, str] | None = None
        self._in_flight_since = 0.0
        self.tool_requests: list[ToolRequest] = []  # webhooks for the shell to run
        self._batch: ToolBatch | None = None
        self._tool_calls: dict[str, tuple[int, float, str]] = {}  # call_id -> (seq, started, name)
        self._tool_args: dict[str, dict[str, Any]] = {}
        self._last_delay_message = -1e9
        self._tool_seq = 0
        self.mixer: AudioMixer | None = None  # background sound, set by the shell when ready

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
        self.server_out.append((kind, build(self.info, self._epoch_ms(self.clock()))))

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
        self.end = End(reason, action)
        self.phase = Phase.ENDED
        self._early_audio.clear()
        if not self.call_sid:
            return
        failed = action.get("say") == APOLOGY  # a failure, not a goodbye: the turn in progress was cut off
        for item in self._items.values():
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

    def on_setup(self, setup: CallSetup) -> None:
        """The assistant is loaded and translated: open the model connection."""
        if self.phase is not Phase.RESOLVING:
            return
        self.setup = setup
        assert self.start is not None
        params = self.start.custom_parameters
        self.info = envelope.CallInfo(
            call_sid=self.call_sid, account_sid=self.account_sid, assistant_id=setup.assistant_id,
            assistant=setup.assistant, from_number=params.get("from", ""), to_number=params.get("to", ""),
            started_at=self._wall_at(self._mono0), variable_values=setup.policy.variable_values,
        )
        self.keypad = KeypadBuffer(setup.policy.keypad_plan)
        self.records.upsert(
            "calls",
            {"call_sid": self.call_sid, "assistant_id": setup.assistant_id, "assistant_name": setup.assistant_name or None,
             "model": setup.model, "voice": setup.voice, "metadata": setup.metadata or None},
        )
        self.phase = Phase.CONFIGURING
        self.log.info("call_started", assistant_id=setup.assistant_id)

    def on_setup_failed(self, error: AssistantError) -> None:
        self.log.error("assistant_unusable", error=str(error))
        self.record_event("assistant_unusable", error=str(error))
        reason = "assistant-not-found" if isinstance(error, AssistantNotFound) else "assistant-not-valid"
        self._finish(reason, {"verb": "hangup", "say": APOLOGY})

    def on_caller_audio(self, payload: str, timestamp_ms: int) -> None:
        self.frames_in += 1
        if self.phase is Phase.LIVE:
            self._append_audio(payload, timestamp_ms)
            if self._gate is not None:
                self._gate_frame(payload)
        elif self.phase is Phase.CONFIGURING or self.phase is Phase.RESOLVING:
            self._early_audio.append((payload, timestamp_ms))

    def _append_audio(self, payload: str, timestamp_ms: int) -> None:
        offset = timestamp_ms - self._input_ms
        if self._offset_ms is None or abs(offset - self._offset_ms) > 40:
            self._offset_ms = offset
            if len(self._breaks_at) < 10_000:
                self._breaks_at.append(self._input_ms)
                self._breaks_offset.append(offset)
        self._input_ms += tw.b64_decoded_len(payload) / tw.MULAW_BYTES_PER_MS
        self.model_out.append(rt.append_audio(payload))

    def on_mark(self, name: str) -> None:
        entry = self._marks.pop(name, None)
        if entry is None:
            return  # echoed after a clear: that audio was discarded, not played
        item, cumulative = entry
        if cumulative > item.played_bytes:
            item.played_bytes = cumulative
            if item.done and item.played_bytes >= item.sent_bytes:
                self._retire(item)
        if self._pending_end is not None and not self._marks:
            self._maybe_hang_up()

    def on_keypress(self, digit: str) -> None:
        """Caller keypresses reach the model as Vapi presents them ("User's Keypad Entry: 123")
        when keypadInputPlan is enabled; Vapi drops them otherwise, and so does the shim."""
        self.record_event("dtmf", digit=digit)
        if self.keypad is None or self.phase is not Phase.LIVE:
            return
        entry = self.keypad.press(digit, self.clock())
        if entry:
            self._keypad_entry(entry)

    def _keypad_entry(self, digits: str) -> None:
        text = keypad_text(digits)
        self.model_out.append(rt.item_create_message("user", text))
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
        self.metrics.model_error()
        self.record_event("model_connect_failed", status=status, detail=detail[:300])
        self.log.error("model_connect_failed", status=status, detail=detail[:300])
        reason = {
            401: "pipeline-error-openai-401-unauthorized",
            403: "pipeline-error-openai-403-model-access-denied",
            429: "pipeline-error-openai-429-rate-limit-reached",
        }.get(status or 0, "pipeline-error-openai-llm-failed")
        self._finish(reason, {"verb": "hangup", "say": APOLOGY})

    def on_model_closed(self, code: int | None, reason: str) -> None:
        if self.end is not None:
            return
        self.metrics.model_error()
        self.record_event("model_socket_closed", code=code, reason=reason[:300])
        self.log.error("model_socket_closed", code=code, reason=reason[:300])
        self._finish("pipeline-error-openai-llm-failed", {"verb": "hangup", "say": APOLOGY})

    def abort(self, reason: str) -> None:
        """End the call for a reason of the shim's own (shutdown, an internal error): the
        caller hears an apology from Twilio and is hung up, never left in silence."""
        self.record_event("aborted", reason=reason)
        self._finish(reason, {"verb": "hangup", "say": APOLOGY})

    def on_model_text(self, text: str | bytes) -> None:
        self.model_events += 1
        try:
            event = orjson.loads(text)
            kind = event["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.log.warning("model_event_rejected", frame=str(text)[:120])
            return
        try:
            handler = self._handlers.get(kind)
            if handler is not None:
                handler(self, event)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            # A known event in an unexpected shape: the model side is not trusted either; logged, survived.
            self.log.warning("model_event_malformed", type=str(kind)[:60], error=repr(exc)[:200])

    def _on_session_created(self, event: dict) -> None:
        assert self.setup is not None
        self.model_out.append(rt.session_update(self.setup.session))

    def _on_session_updated(self, event: dict) -> None:
        if self.phase is not Phase.CONFIGURING:
            return
        audio = (event.get("session") or {}).get("audio") or {}
        formats = [((audio.get(side) or {}).get("format") or {}).get("type") for side in ("input", "output")]
        if formats != ["audio/pcmu", "audio/pcmu"]:
            # Relaying μ-law into a PCM session would play static to the caller: end cleanly.
            self.record_event("session_format_mismatch", formats=formats)
            self.log.error("session_format_mismatch", formats=formats)
            self._finish("pipeline-error-openai-400-bad-request-validation-failed", {"verb": "hangup", "say": APOLOGY})
            return
        self.phase = Phase.LIVE
        self._live_at = self.clock()
        self._server_message("status-update", lambda info, now_ms: envelope.status_update_message(
            info, "in-progress", self.artifact_messages(), now_ms))
        assert self.setup is not None
        greeting = self.setup.greeting
        for role, text in self.setup.policy.few_shot:
            self.model_out.append(rt.item_create_message(role, text))
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
        i = max(bisect_right(self._breaks_at, audio_ms) - 1, 0)
        return self._stream_t0 + (audio_ms + self._breaks_offset[i]) / 1000

    def _on_speech_started(self, event: dict) -> None:
        now = self.clock()
        self._last_activity = now
        item_id = str(event.get("item_id") or f"user_{self._seq + 1}")
        # audio_start_ms includes the prefix padding the server keeps before detected speech
        assert self.setup is not None
        onset_ms = (event.get("audio_start_ms") or 0) + self.setup.policy.prefix_padding_ms
        started = min(now, self._input_time(onset_ms))
        turn = UserTurn(self._next_seq(), item_id, started)
        self._user_turns[item_id] = turn
        self.records.upsert(
            "utterances",
            {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "item_id": item_id, "started_at": self._wall_at(started)},
        )
        playing = self._playing_items()
        generating = self._response_id is not None
        if not playing and not generating:
            return  # nothing to interrupt: an ordinary turn
        if not self.setup.greeting.interruptible:
            in_greeting = any(item.greeting for item in playing) or (
                generating and self._response_id == self._greeting_response_id
            )
            if in_greeting:
                return  # Vapi: firstMessageInterruptionsEnabled=false, the greeting is not cut off
        need_ms = self.setup.policy.barge_in_voice_ms
        if need_ms <= 0:
            self._barge_in()
        else:
            self._gate = BargeInGate(item_id, need_ms)

    def _playing_items(self) -> list[AssistantItem]:
        return [item for item in self._items.values() if not item.dropped and item.played_bytes < item.sent_bytes]

    def _gate_frame(self, payload: str) -> None:
        """Count voiced caller audio while the gate is open (the only place the shim looks at
        caller samples: decoding costs a few microseconds a frame, and only during the gate)."""
        gate = self._gate
        assert gate is not None
        if not self._playing_items() and self._response_id is None:
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
        playing = self._playing_items()
        generating = self._response_id is not None
        if not playing and not generating:
            return
        self.metrics.barge_in()
        if self._pending_end is not None and self._pending_end.cancellable:
            self._pending_end = None  # the goodbye was not heard: don't hang up on the caller
        if generating:
            self.model_out.append(rt.response_cancel(self._response_id))
        if playing:
            self.twilio_out.append(tw.clear_frame(self.stream_sid))
            self._marks.clear()  # their echoes now mean "discarded", not "played"
            self._playback_free_at = self.clock()
        if generating:
            self._cancelled.add(self._response_id)
        for item in self._items.values():
            still_coming = generating and item.response_id == self._response_id
            if item.dropped or (item.played_bytes >= item.sent_bytes and not still_coming):
                continue
            item.dropped = True
            item.interrupted = True
            heard_ms = item.played_bytes // tw.MULAW_BYTES_PER_MS
            if heard_ms > 0:
                self.model_out.append(rt.item_truncate(item.item_id, heard_ms))
            else:
                # Nothing of it reached the caller: truncating at 0 is rejected by the API, and
                # the model must not believe it said these words.
                self.model_out.append(rt.item_delete(item.item_id))
            self._record_item(item)
        self.record_event("barge_in", response_id=self._response_id)
        self.log.info("barge_in", response_id=self._response_id)

    def _on_speech_stopped(self, event: dict) -> None:
        now = self.clock()
        self._last_activity = now
        assert self.setup is not None
        # audio_end_ms includes the silence window that confirmed the end of the turn.
        ended = self._input_time(event.get("audio_end_ms")) - self.setup.policy.silence_duration_ms / 1000
        self._turn_end = min(now, ended)
        item_id = str(event.get("item_id"))
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
            self._noise_reply_until = now + NOISE_REPLY_WINDOW_S
            self._noise_items.append(item_id)
            self._ignored_turns.add(item_id)
            self.record_event("interruption_ignored", item_id=item_id)
        elif self._response_id is not None and self._response_id not in self._cancelled and self._pending_end is None:
            # A real turn ended under a response nobody cancelled (e.g. a tool answer that started
            # mid-turn): with interrupt_response off the server's own reply to it fails (openai SDK,
            # turn_detection.create_response), so it is asked for once that response is done.
            self._request_response()

    def _on_transcription_completed(self, event: dict) -> None:
        item_id = str(event.get("item_id") or "")
        turn = self._user_turns.get(item_id)
        if turn is None:  # no speech_started seen (e.g. a manual commit): place it now
            turn = self._user_turns[item_id] = UserTurn(self._next_seq(), item_id, self.clock())
            self.records.upsert(
                "utterances",
                {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "item_id": item_id,
                 "started_at": self._wall_at(self.clock())},
            )
        text = str(event.get("transcript") or "")
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
        event_id = rt.new_event_id()
        event = rt.response_create(instructions, {"purpose": purpose, "shim_id": event_id}, event_id)
        self._response_queue.append((event_id, event))
        self._next_response()

    def _next_response(self) -> None:
        if self._response_queue and self._response_id is None and self._in_flight is None:
            event_id, event = self._response_queue.popleft()
            self._in_flight = (event_id, event)
            self._in_flight_since = self.clock()
            self.model_out.append(event)

    def _on_response_created(self, event: dict) -> None:
        response = event.get("response") or {}
        response_id = str(response.get("id") or "")
        metadata = response.get("metadata") if isinstance(response.get("metadata"), dict) else {}
        ours = metadata.get("shim_id")
        purpose = metadata.get("purpose")
        self._response_id = response_id
        if self._in_flight is not None and ours == self._in_flight[0]:
            self._in_flight = None
        if self._noise_items:
            noise, self._noise_items = self._noise_items, []
            if ours is None and self.clock() < self._noise_reply_until:
                # the server's own reply to a turn the gate judged to be noise
                self.model_out.append(rt.response_cancel(response_id))
                self._cancelled.add(response_id)
                for item_id in noise:  # keep the noise out of the model's context
                    self.model_out.append(rt.item_delete(item_id))
                return
        if purpose == "greeting":
            self._greeting_response_id = response_id
        if purpose == "goodbye" and self._pending_end is not None:
            self._pending_end.awaiting_goodbye = False

    def _on_audio_delta(self, event: dict) -> None:
        item_id = event.get("item_id")
        delta = event.get("delta")
        if not isinstance(delta, str) or not isinstance(item_id, str) or self.phase is not Phase.LIVE:
            return
        item = self._items.get(item_id)
        now = self.clock()
        if item is None:
            response_id = str(event.get("response_id") or "")
            if response_id in self._cancelled:
                return  # a late delta of a response the caller interrupted
            item = self._new_item(item_id, response_id, now)
        if item.dropped:
            return  # deltas still in flight after a barge-in
        nbytes = tw.b64_decoded_len(delta)
        item.sent_bytes += nbytes
        self._playback_free_at = max(self._playback_free_at, now) + nbytes / 8000
        self._mark_counter += 1
        name = str(self._mark_counter)
        self._marks[name] = (item, item.sent_bytes)
        sid = self.stream_sid
        if self.mixer is not None:  # same length out: marks and truncation math are unchanged
            delta = self.mixer.mix_b64(delta)
        self.twilio_out.append(tw.media_frame(sid, delta))
        self.twilio_out.append(tw.mark_frame(sid, name))
        self.frames_out += 1

    def _new_item(self, item_id: str, response_id: str, now: float) -> AssistantItem:
        item = AssistantItem(
            item_id=item_id,
            response_id=response_id,
            seq=self._next_seq(),
            greeting=response_id != "" and response_id == self._greeting_response_id,
            started=max(now, self._playback_free_at),
        )
        self._items[item_id] = item
        item.transcript.extend(self._early_transcript.pop(item_id, ()))
        row: dict[str, Any] = {
            "call_sid": self.call_sid,
            "seq": item.seq,
            "role": "assistant",
            "item_id": item_id,
            "started_at": self._wall_at(max(now, self._playback_free_at)),
        }
        if self._turn_end is not None:
            latency = now - self._turn_end
            self._turn_end = None
            row["latency_ms"] = int(round(latency * 1000))
            self.metrics.turn_latency(latency)
        self.records.upsert("utterances", row)
        return item

    def _on_transcript_delta(self, event: dict) -> None:
        delta = event.get("delta")
        if not isinstance(delta, str):
            return
        item_id = str(event.get("item_id"))
        item = self._items.get(item_id)
        if item is not None:
            item.transcript.append(delta)
        elif len(self._early_transcript) < 16:  # text may arrive before the item's first audio
            self._early_transcript.setdefault(item_id, []).append(delta)

    def _on_transcript_done(self, event: dict) -> None:
        item = self._items.get(str(event.get("item_id")))
        if item is None or not isinstance(event.get("transcript"), str):
            return
        item.final_transcript = event["transcript"]
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

    def _on_output_item_done(self, event: dict) -> None:
        item = event.get("item") or {}
        if item.get("type") == "function_call" and item.get("status") == "completed":
            # Run tools only from a completed item (arguments.done also fires on cancelled ones).
            self._function_calls.append(item)

    def _retire(self, item: AssistantItem) -> None:
        """An item fully generated and fully heard: record it for good and forget it, so a long
        call keeps only what may still be interrupted."""
        if self._items.get(item.item_id) is item:
            self._record_item(item, final=True)
            del self._items[item.item_id]

    def _on_response_done(self, event: dict) -> None:
        response = event.get("response") or {}
        response_id = response.get("id")
        if response_id == self._response_id:
            self._response_id = None
        for item in [i for i in self._items.values() if i.response_id == response_id]:
            item.done = True
            if item.dropped or item.played_bytes >= item.sent_bytes:
                self._retire(item)
        if response.get("usage") and response_id and self.call_sid:  # billed tokens -> calls.cost_usd (0006)
            self.records.upsert("model_usage", {"call_sid": self.call_sid, "response_id": response_id,
                                                "at": self._wall_at(self.clock()), "usage": response["usage"]})
        status = response.get("status")
        if status == "failed":
            self.metrics.model_error()
            detail = (response.get("status_details") or {}).get("error")
            self.record_event("response_failed", error=detail)
            self.log.error("response_failed", error=detail)
        calls, self._function_calls = self._function_calls, []
        if status == "completed" and calls and response_id not in self._cancelled:
            self._run_function_calls(calls)
        if self._pending_end is not None:
            self._maybe_hang_up()
        self._next_response()

    # --- tools ---------------------------------------------------------------------------
    #
    # At response.done (only one response may be active), every function call of the response
    # becomes a ToolRequest for the shell (webhooks) or is handled here (endCall, transferCall,
    # dtmf). Every call_id gets a function_call_output; when the last one is in, exactly one
    # response.create follows (or the tool's own spoken message, as Vapi does).

    def _run_function_calls(self, calls: list[dict[str, Any]]) -> None:
        assert self.setup is not None
        bindings = {b.realtime_name: b for b in self.setup.tools}
        # A response may call tools while an earlier batch still waits (the caller spoke, the
        # model called again): one batch, finished once every call_id is answered.
        batch = self._batch if self._batch is not None else ToolBatch()
        start_message = None
        for call in calls:
            name, call_id = str(call.get("name") or ""), str(call.get("call_id") or "")
            binding = bindings.get(name)
            try:
                arguments = orjson.loads(call.get("arguments") or "{}")
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
            if kind == "endCall":
                self._tool_output(call_id, "Ending the call.", "ok")
                batch.end_reason = "assistant-ended-call"
                batch.end_say = tool_message(binding.vapi_tool, "request-start", arguments) or self.setup.policy.end_call_message
            elif kind == "transferCall":
                self._transfer(call_id, binding, arguments, batch)
            elif kind == "dtmf":
                self._press_keys(call_id, arguments)
            elif kind in ("function", "apiRequest"):
                request = ToolRequest(call_id=call_id, binding=binding, arguments=arguments, seq=seq,
                                      fire_and_forget=bool(binding.vapi_tool.get("async")))
                self.tool_requests.append(request)
                if request.fire_and_forget:
                    self._tool_output(call_id, async_outcome(call_id).output, "async")
                else:
                    batch.pending.add(call_id)
                    batch.deadline = max(batch.deadline, self.clock() + _server_timeout(binding.vapi_tool) + 5)
                    start_message = start_message or tool_message(binding.vapi_tool, "request-start", arguments)
            else:
                self._tool_output(call_id, f"Error: there is no tool named {name!r}.", "error")
        self._batch = batch
        if start_message:
            self._say(start_message, "tool-message")  # while the webhook runs, without blocking audio
        if not batch.pending:
            self._finish_batch()

    def on_tool_outcome(self, outcome: ToolOutcome, url: str | None = None) -> None:
        """A webhook answered (or failed): pass it to the model; continue once all are in."""
        batch = self._batch
        if self.end is not None or batch is None or outcome.call_id not in batch.pending:
            return
        batch.pending.discard(outcome.call_id)
        self._tool_output(outcome.call_id, outcome.output, outcome.status, result=outcome.result,
                          error=outcome.error, url=url, http_status=outcome.http_status)
        binding = self._binding_for(outcome.call_id)
        if binding is not None:
            kind = "request-complete" if outcome.status == "ok" else "request-failed"
            # The endpoint's own `message` wins over the tool's configured one (Vapi).
            if isinstance(outcome.message, dict) and outcome.message.get("type") == kind:
                spoken, text = outcome.message, str(outcome.message.get("content") or "")
            else:
                spoken = _first_message(binding.vapi_tool, kind)
                text = (tool_message(binding.vapi_tool, kind, self._tool_args.get(outcome.call_id, {})) or "") if spoken else ""
            if spoken and text:
                if spoken.get("role") == "system":
                    batch.system_notes.append(text)  # a hint for the model, which then answers
                else:
                    batch.speak_instead = text  # said word for word; the model is not asked
                    if spoken.get("endCallAfterSpokenEnabled"):
                        batch.end_reason = "assistant-ended-call-after-message-spoken"
        if not batch.pending:
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
        for note in batch.system_notes:
            self.model_out.append(rt.item_create_message("system", note))
        if batch.transfer is not None:
            self._end_after_playback("assistant-forwarded-call", say_first=batch.transfer_say,
                                     next_action=batch.transfer)
        elif batch.end_reason is not None:
            self._end_after_playback(batch.end_reason, say_first=batch.speak_instead or batch.end_say)
        elif batch.speak_instead:
            self._say(batch.speak_instead, "tool-message")  # Vapi: this, not the model, answers
        else:
            self._request_response()

    def _tool_output(self, call_id: str, output: str, status: str, *, name: str | None = None,
                     result: str | None = None, error: str | None = None, url: str | None = None,
                     http_status: int | None = None) -> None:
        self.model_out.append(rt.function_call_output(call_id, output))
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
            self.tool_requests.append(ToolRequest(call_id=call_id, binding=binding, arguments=arguments,
                                                  seq=self._tool_calls[call_id][0], kind="transfer-destination-request"))
            batch.pending.add(call_id)
            batch.deadline = max(batch.deadline, self.clock() + 25)
            return
        if destination is None:
            self._tool_output(call_id, f"Error: {wanted!r} is not one of the transfer destinations.", "error")
            return
        self._tool_output(call_id, "Transferring the call.", "ok")
        batch.transfer = transfer_action(destination, self._template_variables())
        batch.transfer_say = _transfer_message(binding.vapi_tool, destination, arguments)
        self.records.upsert("calls", {"call_sid": self.call_sid, "transfer": batch.transfer})

    def on_transfer_destination(self, call_id: str, answer: dict[str, Any] | None, error: str | None) -> None:
        """The server's answer to transfer-destination-request: a destination, or an error to say."""
        batch = self._batch
        if self.end is not None or batch is None or call_id not in batch.pending:
            return
        batch.pending.discard(call_id)
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
        if not batch.pending:
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
        self._mark_counter += 1  # a mark, so a hang-up waits until the tones have played
        tones_item = AssistantItem(item_id=f"dtmf-{self._mark_counter}", response_id="", seq=0, greeting=False,
                                   sent_bytes=len(tones))
        self._marks[str(self._mark_counter)] = (tones_item, len(tones))
        self.twilio_out.append(tw.mark_frame(self.stream_sid, str(self._mark_counter)))
        self._playback_free_at = max(self._playback_free_at, self.clock()) + len(tones) / 8000
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
        if self._pending_end is not None:
            return
        remaining = max(0.0, self._playback_free_at - self.clock())
        self._pending_end = PendingEnd(reason, self.clock() + remaining + HANGUP_GRACE_S, say_first,
                                       next_action=next_action, cancellable=cancellable)
        self._maybe_hang_up()

    def _maybe_hang_up(self) -> None:
        pending = self._pending_end
        if pending is None or self._response_id is not None or pending.awaiting_goodbye:
            return
        if pending.say_first:
            text, pending.say_first = pending.say_first, ""
            pending.awaiting_goodbye = True
            pending.deadline = self.clock() + len(text) * 0.1 + HANGUP_GRACE_S
            self._request_response(SAY_EXACTLY.format(text=text), "goodbye")
            return
        if not self._marks or self.clock() >= pending.deadline:
            self._finish(pending.reason, pending.next_action)

    def _on_error(self, event: dict) -> None:
        error = event.get("error") or {}
        code = error.get("code")
        if code == "response_cancel_not_active":
            return  # benign race: the response ended before our cancel arrived
        failed_create = self._in_flight is not None and error.get("event_id") == self._in_flight[0]
        if failed_create and code == "conversation_already_has_active_response":
            # The server started a response of its own (the caller spoke) just before ours:
            # ours goes back to the front of the queue and is sent after that one.
            self._response_queue.appendleft(self._in_flight)
            self._in_flight = None
            return
        if failed_create:  # any other refusal: drop that request, never block the ones behind it
            self._in_flight = None
            self._next_response()
        self.metrics.model_error()
        self.record_event("model_error", code=code, message=str(error.get("message") or "")[:300], param=error.get("param"))
        self.log.warning("model_error", code=code, message=str(error.get("message") or "")[:300])
        if code in ("session_expired", "invalid_api_key"):
            self._finish("pipeline-error-openai-llm-failed", {"verb": "hangup", "say": APOLOGY})
        elif self.phase is Phase.CONFIGURING:
            # session.update refused (a voice, a tool schema...): the call cannot be configured.
            self._finish("pipeline-error-openai-400-bad-request-validation-failed", {"verb": "hangup", "say": APOLOGY})

    _handlers: dict[str, Callable[[Call, dict], None]] = {
        "session.created": _on_session_created,
        "session.updated": _on_session_updated,
        "input_audio_buffer.speech_started": _on_speech_started,
        "input_audio_buffer.speech_stopped": _on_speech_stopped,
        "conversation.item.input_audio_transcription.completed": _on_transcription_completed,
        "response.created": _on_response_created,
        "response.output_audio.delta": _on_audio_delta,
        "response.output_audio_transcript.delta": _on_transcript_delta,
        "response.output_audio_transcript.done": _on_transcript_done,
        "response.output_item.done": _on_output_item_done,
        "response.done": _on_response_done,
        "error": _on_error,
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
        if self.phase is not Phase.LIVE or self.setup is None:
            return
        if self._model_progress[0] != self.model_events or self._response_id is None:
            self._model_progress = (self.model_events, now)
        elif now - self._model_progress[1] > MODEL_STALL_S:  # mid-answer, and the model went silent
            self.metrics.model_error()
            self.record_event("model_stalled", response_id=self._response_id, silent_s=round(now - self._model_progress[1], 1))
            self.log.error("model_stalled", response_id=self._response_id)
            self._finish("pipeline-error-openai-llm-failed", {"verb": "hangup", "say": APOLOGY})
            return
        batch = self._batch
        if batch is not None and batch.pending and now > batch.deadline:
            for call_id in list(batch.pending):  # a webhook task died without answering
                self.on_tool_outcome(ToolOutcome(call_id, "timeout", NO_RESULT, None, "no answer", None, None))
        if self._in_flight is not None and now - self._in_flight_since > 15:
            self.record_event("response_create_unanswered")  # neither created nor refused: move on
            self._in_flight = None
            self._next_response()
        policy = self.setup.policy
        if self._live_at is not None and now - self._live_at >= policy.max_duration_s:
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
        if self._pending_end is not None:
            if now >= self._pending_end.deadline:
                self._finish(self._pending_end.reason, self._pending_end.next_action)
            return
        if self._marks or self._response_id is not None:
            self._last_activity = now  # the assistant is talking or about to
            return
        if now - self._last_activity >= policy.silence_timeout_s:
            self._finish("silence-timed-out")

    # --- output --------------------------------------------------------------------------

    def take_twilio_out(self) -> list[str]:
        out, self.twilio_out = self.twilio_out, []
        return out

    def take_tool_requests(self) -> list[ToolRequest]:
        out, self.tool_requests = self.tool_requests, []
        return out

    def take_server_messages(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.server_out = self.server_out, []
        return out

    def take_model_out(self) -> list[str]:
        out, self.model_out = self.model_out, []
        return out


def _request_start_text(tool: dict[str, Any]) -> str:
    """The content of a tool's request-start message (what Vapi says when the tool runs)."""
    for message in tool.get("messages") or []:
        if isinstance(message, dict) and message.get("type") == "request-start" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def _first_message(tool: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for message in tool.get("messages") or []:
        if isinstance(message, dict) and message.get("type") == kind:
            return message
    return None


def _transfer_message(tool: dict[str, Any], destination: dict[str, Any], arguments: dict[str, Any]) -> str:
    """What Vapi says before a transfer: the tool's request-start if it has one (\"\" = silence),
    else the destination's message, else "Transferring the call now"."""
    if _first_message(tool, "request-start") is not None:
        return tool_message(tool, "request-start", arguments) or ""
    message = destination.get("message")
    if message is None:
        return "Transferring the call now"
    return message if isinstance(message, str) else str((message or {}).get("content") or "")


def transfer_action(destination: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
    """The next_action /twilio/stream-ended turns into <Dial>: a number (with extension) or a SIP
    URI, and the caller id (Liquid, e.g. {{phoneNumber.number}})."""
    action: dict[str, Any] = {"verb": "dial"}
    if destination.get("sipUri"):
        action["sip"] = str(destination["sipUri"])
        if isinstance(destination.get("sipHeaders"), dict):
            action["sipHeaders"] = {str(k): str(v) for k, v in destination["sipHeaders"].items()}
    else:
        action["number"] = str(destination.get("number") or "")
        if destination.get("extension"):
            action["extension"] = str(destination["extension"])
    caller_id = destination.get("callerId")
    if isinstance(caller_id, str) and caller_id:
        try:
            action["callerId"] = render(caller_id, variables, "destination.callerId")
        except AssistantError:
            action["callerId"] = caller_id
    return action


def _server_timeout(tool: dict[str, Any]) -> float:
    server = tool.get("server") if isinstance(tool.get("server"), dict) else {}
    value = server.get("timeoutSeconds")
    return float(value) if isinstance(value, (int, float)) and 1 <= value <= 300 else 20.0
