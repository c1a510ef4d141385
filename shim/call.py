"""One phone call as a sans-I/O state machine: Twilio frames and Realtime events in, frames,
events and database rows out. No sockets, no awaits, no clocks of its own (they are injected),
so every behaviour here is tested without a network.

After feeding an input, the I/O shell drains `twilio_out` and `model_out` (strings to send),
looks at `model_wanted` (open the model socket now) and `end` (close everything).

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
from .assistant import AssistantError, AssistantNotFound
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
SAY_EXACTLY = 'Say exactly the following words, word for word, and nothing else: "{text}"'
TOOL_UNAVAILABLE = "This tool is not available right now."


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
    sent_bytes: int = 0
    played_bytes: int = 0  # confirmed by Twilio mark echoes
    transcript: list[str] = field(default_factory=list)
    final_transcript: str | None = None
    interrupted: bool = False
    dropped: bool = False  # interrupted: further deltas are not forwarded


@dataclass(slots=True)
class UserTurn:
    seq: int
    item_id: str


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
        resolve_setup: Callable[[tw.Start], CallSetup],
        records: RecordSink,
        *,
        log: Any,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ):
        self._resolve_setup = resolve_setup
        self.records = records
        self.log = log
        self.metrics = metrics or NoMetrics()
        self.clock = clock
        self._wall0 = wall()
        self._mono0 = clock()

        self.phase = Phase.AWAITING_START
        self.twilio_out: list[str] = []
        self.model_out: list[str] = []
        self.model_wanted = False
        self.end: End | None = None

        self.setup: CallSetup | None = None
        self.call_sid = ""
        self.stream_sid = ""
        self.account_sid = ""
        self.frames_in = 0
        self.frames_out = 0

        self._early_audio: deque[tuple[str, int]] = deque(maxlen=MAX_EARLY_FRAMES)
        self._seq = 0
        self._items: dict[str, AssistantItem] = {}
        self._marks: dict[str, tuple[AssistantItem, int]] = {}
        self._mark_counter = 0
        self._user_turns: dict[str, UserTurn] = {}
        self._response_id: str | None = None
        self._cancelled: set[str] = set()
        self._early_transcript: dict[str, list[str]] = {}
        self._greeting_pending = False
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
        self._tool_seq = 0
        self.mixer: AudioMixer | None = None  # background sound, set by the shell when ready

    # --- helpers -----------------------------------------------------------------------

    def _wall_at(self, mono: float) -> datetime:
        return self._wall0 + timedelta(seconds=mono - self._mono0)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

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
        for item in self._items.values():
            self._record_item(item, final=True)
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
        self.log.info("call_ended", ended_reason=reason, frames_in=self.frames_in, frames_out=self.frames_out)

    # --- Twilio side ---------------------------------------------------------------------

    def on_twilio_text(self, text: str | bytes) -> None:
        try:
            event = tw.parse(text)
        except tw.ProtocolError as exc:
            # Bad input loses nothing already accepted: log it, keep the call.
            self.log.warning("twilio_frame_rejected", error=str(exc))
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
            self.record_event("dtmf", digit=event.digit)

    def on_start(self, start: tw.Start) -> None:
        if self.phase is not Phase.AWAITING_START:
            self.log.warning("duplicate_start_ignored")
            return
        self.call_sid, self.stream_sid, self.account_sid = start.call_sid, start.stream_sid, start.account_sid
        self._stream_t0 = self.clock()
        self.log = self.log.bind(call_sid=start.call_sid)
        params = start.custom_parameters
        row: dict[str, Any] = {
            "call_sid": start.call_sid,
            "stream_sid": start.stream_sid,
            "account_sid": start.account_sid or None,
            "assistant_id": params.get("assistant") or None,
            "from_number": params.get("from") or None,
            "to_number": params.get("to") or None,
            "stack": "shim",
            "status": "in-progress",
            "started_at": self._wall_at(self._mono0),
            "custom_parameters": params,
        }
        try:
            self.setup = self._resolve_setup(start)
        except AssistantError as exc:
            self.records.upsert("calls", row)
            self.log.error("assistant_unusable", error=str(exc))
            reason = "assistant-not-found" if isinstance(exc, AssistantNotFound) else "assistant-not-valid"
            self._finish(reason, {"verb": "hangup", "say": APOLOGY})
            return
        row.update(
            assistant_name=self.setup.assistant_name or None, model=self.setup.model, voice=self.setup.voice
        )
        self.records.upsert("calls", row)
        self.phase = Phase.CONFIGURING
        self.model_wanted = True
        self.log.info("call_started", assistant_id=self.setup.assistant_id)

    def on_caller_audio(self, payload: str, timestamp_ms: int) -> None:
        self.frames_in += 1
        if self.phase is Phase.LIVE:
            self._append_audio(payload, timestamp_ms)
            if self._gate is not None:
                self._gate_frame(payload)
        elif self.phase is Phase.CONFIGURING:
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
        if self._pending_end is not None and not self._marks:
            self._maybe_hang_up()

    def on_recording_started(self, url: str) -> None:
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
        try:
            event = orjson.loads(text)
            kind = event["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.log.warning("model_event_rejected", frame=str(text)[:120])
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(self, event)

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
        assert self.setup is not None
        greeting = self.setup.greeting
        for role, text in self.setup.policy.few_shot:
            self.model_out.append(rt.item_create_message(role, text))
        if greeting.mode == "assistant-speaks-first":
            self._greeting_pending = True
            self.model_out.append(
                rt.response_create(
                    instructions="Greet the caller. " + SAY_EXACTLY.format(text=greeting.text),
                    metadata={"purpose": "greeting"},
                )
            )
        elif greeting.mode == "assistant-speaks-first-with-model-generated-message":
            self._greeting_pending = True
            self.model_out.append(rt.response_create(metadata={"purpose": "greeting"}))
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
        turn = UserTurn(self._next_seq(), item_id)
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
        if self._pending_end is not None and not self._pending_end.say_first:
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
            self.record_event("interruption_ignored", item_id=item_id)

    def _on_transcription_completed(self, event: dict) -> None:
        item_id = str(event.get("item_id") or "")
        turn = self._user_turns.get(item_id)
        if turn is None:  # no speech_started seen (e.g. a manual commit): place it now
            turn = self._user_turns[item_id] = UserTurn(self._next_seq(), item_id)
            self.records.upsert(
                "utterances",
                {"call_sid": self.call_sid, "seq": turn.seq, "role": "user", "item_id": item_id,
                 "started_at": self._wall_at(self.clock())},
            )
        self.records.upsert(
            "utterances",
            {"call_sid": self.call_sid, "seq": turn.seq, "role": "user",
             "text": self._keep_text(str(event.get("transcript") or ""))},
        )

    def _on_response_created(self, event: dict) -> None:
        response_id = str((event.get("response") or {}).get("id") or "")
        self._response_id = response_id
        if self._noise_items:
            noise, self._noise_items = self._noise_items, []
            if self.clock() < self._noise_reply_until and not self._greeting_pending:
                self.model_out.append(rt.response_cancel(response_id))
                self._cancelled.add(response_id)
                for item_id in noise:  # keep the noise out of the model's context
                    self.model_out.append(rt.item_delete(item_id))
                return
        if self._greeting_pending:
            self._greeting_pending = False
            self._greeting_response_id = response_id
        if self._pending_end is not None:
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
            self._end_after_playback("assistant-said-end-call-phrase")

    def _record_item(self, item: AssistantItem, final: bool = False) -> None:
        full = item.final_transcript if item.final_transcript is not None else "".join(item.transcript)
        row: dict[str, Any] = {
            "call_sid": self.call_sid,
            "seq": item.seq,
            "role": "assistant",
            "audio_ms": item.sent_bytes // tw.MULAW_BYTES_PER_MS,
            "heard_ms": item.played_bytes // tw.MULAW_BYTES_PER_MS,
        }
        if item.interrupted:
            row.update(
                interrupted=True,
                text=self._keep_text(heard_text(full, item.played_bytes, item.sent_bytes)),
                full_text=self._keep_text(full),
            )
        elif full or final:
            row["text"] = self._keep_text(full)
        self.records.upsert("utterances", row)

    def _keep_text(self, text: str) -> str | None:
        """hipaaEnabled: no transcript text is stored (the row, its timing and flags still are)."""
        return None if self.setup is not None and self.setup.policy.hipaa else text

    def _on_output_item_done(self, event: dict) -> None:
        item = event.get("item") or {}
        if item.get("type") == "function_call" and item.get("status") == "completed":
            # Run tools only from a completed item (arguments.done also fires on cancelled ones).
            self._function_calls.append(item)

    def _on_response_done(self, event: dict) -> None:
        response = event.get("response") or {}
        response_id = response.get("id")
        if response_id == self._response_id:
            self._response_id = None
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

    def _run_function_calls(self, calls: list[dict[str, Any]]) -> None:
        """Answer every call_id, then exactly one response.create (the model never goes silent
        after a tool). endCall is the shim's own; webhook tools arrive with the tools issue."""
        assert self.setup is not None
        bindings = {b.realtime_name: b for b in self.setup.tools}
        end_call = None
        now = self._wall_at(self.clock())
        for call in calls:
            name, call_id = str(call.get("name") or ""), str(call.get("call_id") or "")
            binding = bindings.get(name)
            kind = binding.kind if binding is not None else "unknown"
            try:
                arguments = orjson.loads(call.get("arguments") or "{}")
            except orjson.JSONDecodeError:
                arguments = {"_raw": str(call.get("arguments"))[:1000]}
            if kind == "endCall":
                output, status = "Ending the call.", "ok"
                end_call = binding
            else:
                output, status = TOOL_UNAVAILABLE, "error"
            self._tool_seq += 1
            self.records.upsert(
                "tool_calls",
                {"call_sid": self.call_sid, "seq": self._tool_seq, "call_id": call_id, "name": name,
                 "arguments": arguments if isinstance(arguments, dict) else {"_value": arguments},
                 "status": status, "result": output, "requested_at": now, "completed_at": now, "latency_ms": 0},
            )
            self.model_out.append(rt.function_call_output(call_id, output))
        if end_call is not None:
            goodbye = _request_start_text(end_call.vapi_tool) or self.setup.policy.end_call_message
            self._end_after_playback("assistant-ended-call", say_first=goodbye)
            return
        self.model_out.append(rt.response_create())

    def _end_after_playback(self, reason: str, say_first: str = "") -> None:
        """Hang up once everything queued at Twilio has been played (marks), optionally after
        saying `say_first` word for word; bounded so a lost mark cannot keep the line open."""
        if self._pending_end is not None:
            return
        remaining = max(0.0, self._playback_free_at - self.clock())
        self._pending_end = PendingEnd(reason, self.clock() + remaining + HANGUP_GRACE_S, say_first)
        self._maybe_hang_up()

    def _maybe_hang_up(self) -> None:
        pending = self._pending_end
        if pending is None or self._response_id is not None or pending.awaiting_goodbye:
            return
        if pending.say_first:
            text, pending.say_first = pending.say_first, ""
            pending.awaiting_goodbye = True
            pending.deadline = self.clock() + len(text) * 0.1 + HANGUP_GRACE_S
            self.model_out.append(rt.response_create(instructions=SAY_EXACTLY.format(text=text), metadata={"purpose": "goodbye"}))
            return
        if not self._marks or self.clock() >= pending.deadline:
            self._finish(pending.reason)

    def _on_error(self, event: dict) -> None:
        error = event.get("error") or {}
        code = error.get("code")
        if code == "response_cancel_not_active":
            return  # benign race: the response ended before our cancel arrived
        self.metrics.model_error()
        self.record_event("model_error", code=code, message=str(error.get("message") or "")[:300], param=error.get("param"))
        self.log.warning("model_error", code=code, message=str(error.get("message") or "")[:300])
        if code in ("session_expired", "invalid_api_key"):
            self._finish("pipeline-error-openai-llm-failed", {"verb": "hangup", "say": APOLOGY})

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

    def playing(self) -> bool:
        return bool(self._marks)

    def tick(self) -> None:
        """Called about twice a second by the shell: call-level timers."""
        if self.phase is not Phase.LIVE or self.setup is None:
            return
        now = self.clock()
        policy = self.setup.policy
        if self._live_at is not None and now - self._live_at >= policy.max_duration_s:
            self._finish("exceeded-max-duration")
            return
        if self._pending_end is not None:
            if now >= self._pending_end.deadline:
                self._finish(self._pending_end.reason)
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

    def take_model_out(self) -> list[str]:
        out, self.model_out = self.model_out, []
        return out


def _request_start_text(tool: dict[str, Any]) -> str:
    """The content of a tool's request-start message (what Vapi says when the tool runs)."""
    for message in tool.get("messages") or []:
        if isinstance(message, dict) and message.get("type") == "request-start" and isinstance(message.get("content"), str):
            return message["content"]
    return ""
