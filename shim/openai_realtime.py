"""The OpenAI Realtime (GA) backend: the call's model commands as Realtime client events, and
Realtime server events as the typed events of `shim.model_events`. Sans-I/O; the shell sends
`out` over the WebSocket and feeds every text frame to `feed`.

Everything specific to this protocol lives here: the URL and auth header, answering
`session.created` with `session.update`, checking that the session really is μ-law both ways,
telling our `response.create` apart from the server's own responses (our id rides in the
response metadata), and which errors are benign. Docs: https://platform.openai.com/docs/guides/realtime

It also keeps the conversation as the model holds it, as text (`Conversation`): the caller's
transcripts, the assistant's words as heard (cut where the caller interrupted), our messages,
function calls and their results. A new socket gets a new, empty session (the API replays
nothing: https://github.com/openai/openai-python/blob/main/src/openai/types/websocket_reconnection.py
lists the closes worth a reconnect), so after `disconnected()` the next `session.created` is
answered with the same `session.update` and the conversation as `conversation.item.create`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Any, Callable

import orjson

from . import realtime_events as rt
from .model_events import (
    FunctionCall,
    ModelEventSink,
    ModelProtocolError,
    ResponseDone,
    SessionReady,
    SessionRejected,
    SpeechStarted,
    TranscriptDelta,
    TranscriptDone,
    UserTranscript,
)
from .playback import heard_text

PCMU = "audio/pcmu"
# What a new session gets of a long conversation: the newest items verbatim up to this many
# characters (~6k tokens), the older ones condensed to a line each in one system message.
REPLAY_VERBATIM_CHARS = 24_000
REPLAY_CONDENSED_CHARS = 6_000
CONDENSED_LINE_CHARS = 160
REPLAY_ITEM_CHARS = 4_000
# An answer cut off mid-generation: its transcript runs ahead of its audio, so the words kept are
# those the audio sent can hold at a brisk speaking rate (about 16 characters a second).
CHARS_PER_AUDIO_MS = 0.016


@dataclass(slots=True)
class Turn:
    """One conversation item, as text."""

    role: str  # user | assistant | system | function_call | function_call_output
    text: str = ""
    parts: list[str] | None = None  # assistant transcript deltas, until the final transcript
    heard_ms: int | None = None  # assistant: the caller heard this much (truncated), else all
    call_id: str = ""
    name: str = ""


class Conversation:
    """The conversation as text items, in order; keys are the model's item ids, or ours for the
    items we add. Only what the model's own session holds: deleted items leave, truncated
    assistant items keep the words heard."""

    __slots__ = ("turns", "audio_bytes", "deleted", "_keys")

    def __init__(self) -> None:
        self.turns: dict[str, Turn] = {}
        self.audio_bytes: dict[str, int] = {}  # assistant item -> μ-law bytes of audio generated
        self.deleted: set[str] = set()
        self._keys = count(1)

    def add(self, turn: Turn, key: str | None = None) -> None:
        self.turns[key or f"shim:{next(self._keys)}"] = turn

    def assistant(self, item_id: str) -> Turn:
        turn = self.turns.get(item_id)
        if turn is None:
            turn = self.turns[item_id] = Turn("assistant", parts=[])
        return turn

    def text_of(self, key: str, turn: Turn) -> str:
        if turn.role != "assistant":
            return turn.text
        full = turn.text if turn.parts is None else "".join(turn.parts)
        generated = self.audio_bytes.get(key, 0)
        if turn.parts is not None and turn.heard_ms is None:  # no final transcript: cut off
            said = int(generated / 8 * CHARS_PER_AUDIO_MS)
            return full if said >= len(full) else heard_text(full, said, len(full))
        if turn.heard_ms is None:
            return full
        return heard_text(full, turn.heard_ms * 8, generated)

    def replay(self) -> list[Turn]:
        """The items to re-create on a new session: everything if short, else the newest items
        verbatim (each capped) and the older ones condensed into one leading system message."""
        items = [(turn, _capped(self.text_of(key, turn))) for key, turn in self.turns.items()]
        items = [(t, text) for t, text in items if text or t.role in ("function_call", "function_call_output")]
        budget, cut = REPLAY_VERBATIM_CHARS, len(items)
        while cut > 0:
            turn, text = items[cut - 1]
            size = len(text) + len(turn.name)
            if size > budget:
                break
            budget -= size
            cut -= 1
        # A kept function result needs its call in the conversation (the API checks): the cut
        # moves back to include the call.
        kept_calls = {t.call_id for t, _ in items[cut:] if t.role == "function_call"}
        for turn, _ in items[cut:]:
            if turn.role == "function_call_output" and turn.call_id not in kept_calls:
                cut = max((i for i, (t, _) in enumerate(items[:cut]) if t.role == "function_call" and t.call_id == turn.call_id),
                          default=cut)
        calls = {t.call_id for t, _ in items[cut:] if t.role == "function_call"}
        kept = [Turn(t.role, text, call_id=t.call_id, name=t.name) for t, text in items[cut:]
                if t.role != "function_call_output" or t.call_id in calls]
        if cut == 0:
            return kept
        lines: list[str] = []
        size = 0
        for turn, text in reversed(items[:cut]):
            who = {"user": "Caller", "assistant": "You", "system": "Note"}.get(turn.role, "Tool")
            body = f"{turn.name}({text})" if turn.role == "function_call" else text
            line = f"{who}: {body}"[:CONDENSED_LINE_CHARS]
            if size + len(line) > REPLAY_CONDENSED_CHARS:
                break
            lines.append(line)
            size += len(line) + 1
        lines.reverse()
        summary = "Earlier in this call (condensed):\n" + "\n".join(lines)
        return [Turn("system", summary), *kept]


def _capped(text: str) -> str:
    """One replayed item at most REPLAY_ITEM_CHARS (a 1 MB tool answer must not crowd out the call)."""
    return text if len(text) <= REPLAY_ITEM_CHARS else text[:REPLAY_ITEM_CHARS] + " …(cut)"


def counter_ids(prefix: str = "shim_") -> Callable[[], str]:
    """Event ids for one call: a counter (deterministic; unique within the session)."""
    numbers = count(1)
    return lambda: f"{prefix}{next(numbers)}"


class OpenAIRealtime:
    name = "openai-realtime"

    __slots__ = ("out", "_new_id", "_session", "_created", "_expires_at", "conversation", "_stale", "_calls")

    def __init__(self, new_id: Callable[[], str] | None = None):
        self.out: list[str] = []
        self._new_id = new_id or counter_ids()
        self._session: dict[str, Any] | None = None
        self._created = False  # this socket's session exists: commands become frames
        self._expires_at: float | None = None
        self.conversation = Conversation()
        self._stale: set[str] = set()  # item ids of earlier sessions (replayed as new text items)
        self._calls: list[FunctionCall] = []  # function calls of the response in progress

    # --- connection (the shell opens the socket) ------------------------------------------

    @staticmethod
    def connect_target(base_url: str, model: str, api_key: str) -> tuple[str, dict[str, str]]:
        sep = "&" if "?" in base_url else "?"
        return f"{base_url}{sep}model={model}", {"Authorization": f"Bearer {api_key}"}

    # --- commands ---------------------------------------------------------------------------

    def configure(self, session: dict[str, Any]) -> None:
        """The translation's session; sent as `session.update` once the server's session exists."""
        self._session = session
        if self._created:
            self.out.append(rt.session_update(session, self._new_id()))

    def append_audio(self, audio_b64: str) -> None:
        self.out.append('{"type":"input_audio_buffer.append","audio":"' + audio_b64 + '"}')

    # append_audio's frame as bytes around the payload (https://platform.openai.com/docs/api-reference/realtime-client-events/input_audio_buffer/append)
    append_wire = (b'{"type":"input_audio_buffer.append","audio":"', b'"}')

    # Between sockets (`disconnected()` until the next session.created) a command only updates
    # the conversation: the next session gets it in the replay.

    def create_response(self, request_id: str, instructions: str | None, purpose: str) -> None:
        # The request id is the event id (errors echo it) and rides in the response's metadata
        # (response.created echoes it), so both the refusal and the start find their request.
        if self._created:  # else the call holds its requests until the session is ready again
            self.out.append(rt.response_create(instructions, {"purpose": purpose, "shim_id": request_id}, request_id))

    def cancel_response(self, response_id: str) -> None:
        if self._created:
            self.out.append(rt.response_cancel(response_id, self._new_id()))

    def truncate_item(self, item_id: str, heard_ms: int) -> None:
        turn = self.conversation.turns.get(item_id)
        if turn is not None:
            turn.heard_ms = heard_ms
        if self._created and item_id not in self._stale:  # a replayed item is text: nothing to truncate
            self.out.append(rt.item_truncate(item_id, heard_ms, self._new_id()))

    def delete_item(self, item_id: str) -> None:
        self.conversation.turns.pop(item_id, None)
        self.conversation.deleted.add(item_id)  # a transcript arriving later must not bring it back
        if self._created and item_id not in self._stale:
            self.out.append(rt.item_delete(item_id, self._new_id()))

    def add_message(self, role: str, text: str, remember: bool = True) -> None:
        """`remember=False`: for this session only (e.g. a note about a reconnect), not replayed."""
        if remember:
            self.conversation.add(Turn(role, text))
        if self._created:
            self.out.append(rt.item_create_message(role, text, self._new_id()))

    def send_tool_result(self, call_id: str, output: str) -> None:
        self.conversation.add(Turn("function_call_output", output, call_id=call_id))
        if self._created:
            self.out.append(rt.function_call_output(call_id, output, self._new_id()))

    # --- connection -------------------------------------------------------------------------

    def disconnected(self) -> None:
        """The socket is gone (lost, or closed for a rollover): frames not yet sent are dropped,
        and the next socket's session gets the configuration and the conversation again."""
        self.out.clear()
        self._created = False
        self._calls.clear()  # the response in progress was dropped with its function calls
        self._stale.update(self.conversation.turns)

    def _replay(self) -> None:
        for turn in self.conversation.replay():
            if turn.role == "function_call":
                self.out.append(rt.item_create_function_call(turn.call_id, turn.name, turn.text, self._new_id()))
            elif turn.role == "function_call_output":
                self.out.append(rt.function_call_output(turn.call_id, turn.text, self._new_id()))
            else:
                self.out.append(rt.item_create_message(turn.role, turn.text, self._new_id()))

    # --- events -----------------------------------------------------------------------------

    def feed(self, text: str | bytes, sink: ModelEventSink) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            sink.on_model_event_rejected(ModelProtocolError(f"frame is not JSON ({exc}): {str(text)[:80]!r}"))
            return
        if type(msg) is dict and msg.get("type") == "response.output_audio.delta":
            # The hot path: no event object, plain lookups; the checks that name a bad field
            # only when something is off.
            response_id, item_id, delta = msg.get("response_id"), msg.get("item_id"), msg.get("delta")
            if type(delta) is str and type(item_id) is str and type(response_id) is str:
                sink.on_model_audio(response_id, item_id, delta)
                audio = self.conversation.audio_bytes  # how much was generated: where a cut falls in the text
                # b64_decoded_len, inlined (one Python call fewer per delta)
                pad = 2 if delta.endswith("==") else 1 if delta.endswith("=") else 0
                audio[item_id] = audio.get(item_id, 0) + len(delta) * 3 // 4 - pad
                return
        try:
            event = rt.parse_object(msg)
        except ModelProtocolError as exc:
            sink.on_model_event_rejected(exc)
            return
        kind = type(event)
        if kind is rt.SessionCreated:
            self._created = True
            self._expires_at = event.expires_at
            if self._session is not None:
                self.out.append(rt.session_update(self._session, self._new_id()))
            self._replay()
            return
        if kind is not rt.SessionUpdated and kind is not rt.CancelNotActive:
            self._note(event)
        if kind is rt.SessionUpdated:
            formats = [event.input_format, event.output_format]
            if formats == [PCMU, PCMU]:
                sink.on_model_event(SessionReady(self._expires_at))
            else:
                # Relaying μ-law into a PCM session would play static to the caller.
                sink.on_model_event(SessionRejected("the session is not μ-law (audio/pcmu) both ways", formats))
        elif kind is rt.CancelNotActive:
            pass  # the response ended before our cancel arrived
        else:
            sink.on_model_event(event)

    def _note(self, event: Any) -> None:
        """Keep the conversation as the session holds it (text)."""
        kind = type(event)
        conversation = self.conversation
        if getattr(event, "item_id", None) in conversation.deleted:
            return  # e.g. a noise turn's transcript arriving after the call deleted it
        if kind is TranscriptDelta:
            turn = conversation.assistant(event.item_id)
            if turn.parts is not None:
                turn.parts.append(event.text)
        elif kind is TranscriptDone:
            turn = conversation.assistant(event.item_id)
            turn.text, turn.parts = event.text, None
        elif kind is SpeechStarted:
            if event.item_id is not None and event.item_id not in conversation.turns:
                conversation.turns[event.item_id] = Turn("user")  # its place, before the reply
        elif kind is UserTranscript:
            turn = conversation.turns.get(event.item_id)
            if turn is None:
                conversation.turns[event.item_id] = Turn("user", event.text)
            else:
                turn.text = event.text
        elif kind is FunctionCall:
            self._calls.append(event)
        elif kind is ResponseDone:
            calls, self._calls = self._calls, []
            if event.status == "completed":  # the call runs (and answers) only these
                for call in calls:
                    conversation.add(Turn("function_call", call.arguments, call_id=call.call_id, name=call.name))
