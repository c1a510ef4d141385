"""What the call hears from a speech-to-speech model, whatever the backend: small typed events.

A backend adapter (today `shim.openai_realtime`) turns its wire protocol into these, and the
call core (`shim.call`) consumes only these. Protocol-specific events that concern only the
connection (OpenAI's `session.created`, a cancel that arrived after the response ended) stay
inside the adapter. Model audio has its own entry point (`ModelEventSink.on_model_audio`) with
no event object: it is the hot path, 10-50 deltas a second per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True, frozen=True)
class SessionReady:
    """The session is configured as asked: caller audio may flow. `expires_at` (epoch seconds)
    is when the backend's session ends by itself (OpenAI: 60 minutes), if the backend says."""

    expires_at: float | None = None


@dataclass(slots=True, frozen=True)
class SessionRejected:
    """The session came up configured differently from what the call needs (e.g. not μ-law)."""

    detail: str
    formats: list[Any]


@dataclass(slots=True, frozen=True)
class SpeechStarted:
    """The model's voice detection heard the caller start (ms on the model's input timeline)."""

    item_id: str | None
    audio_start_ms: float | None


@dataclass(slots=True, frozen=True)
class SpeechStopped:
    item_id: str | None
    audio_end_ms: float | None


@dataclass(slots=True, frozen=True)
class UserTranscript:
    """The caller's words of one turn (input transcription, final)."""

    item_id: str
    text: str


@dataclass(slots=True, frozen=True)
class ResponseStarted:
    """A response began; `request_id` is ours when it answers one of our requests, None when
    the model started it by itself (the caller finished a turn)."""

    response_id: str
    request_id: str | None
    purpose: str | None


@dataclass(slots=True, frozen=True)
class AudioDelta:
    """One chunk of the assistant's voice, base64 μ-law (typed form of the hot-path call)."""

    response_id: str
    item_id: str
    audio_b64: str


@dataclass(slots=True, frozen=True)
class TranscriptDelta:
    item_id: str
    text: str


@dataclass(slots=True, frozen=True)
class TranscriptDone:
    item_id: str
    text: str


@dataclass(slots=True, frozen=True)
class FunctionCall:
    """A completed function call of the current response (run once the response is done)."""

    call_id: str
    name: str
    arguments: str  # JSON text as the model wrote it


@dataclass(slots=True, frozen=True)
class ResponseDone:
    response_id: str
    status: str  # completed | cancelled | failed | incomplete
    error: Any = None  # the backend's failure detail, when status is failed
    usage: dict[str, Any] | None = None  # billed tokens as the backend reports them (-> model_usage, calls.cost_usd)


@dataclass(slots=True, frozen=True)
class ModelError:
    """An error from the model. `request_id` names our request it refers to, if any; `busy`
    means "a response is already active" (our request can simply be sent again later); `fatal`
    means the session cannot go on (expired, bad credentials)."""

    code: str | None
    message: str
    param: str | None = None
    request_id: str | None = None
    busy: bool = False
    fatal: bool = False


@dataclass(slots=True, frozen=True)
class Unhandled:
    """An event this version does not use (forward compatible: logged once per kind)."""

    kind: str


ModelEvent = (
    SessionReady | SessionRejected | SpeechStarted | SpeechStopped | UserTranscript | ResponseStarted | AudioDelta
    | TranscriptDelta | TranscriptDone | FunctionCall | ResponseDone | ModelError | Unhandled
)


class ModelProtocolError(ValueError):
    """A model event that does not follow the protocol; the message names the field, the value
    and what was expected."""


class ModelEventSink(Protocol):
    """What a backend feeds (the call core implements it)."""

    def on_model_audio(self, response_id: str, item_id: str, audio_b64: str) -> None: ...
    def on_model_event(self, event: ModelEvent) -> None: ...
    def on_model_event_rejected(self, error: ModelProtocolError) -> None: ...


class ModelBackend(Protocol):
    """The one seam between the call and a speech-to-speech model. Sans-I/O: commands queue wire
    frames in `out` (the shell sends them in order), `feed` decodes one frame from the model.

    A backend owns everything about its protocol: how the session is configured (it gets the
    translation's session config), event ids, which errors are benign, and the conversation as
    the model holds it, so that a new session (after a lost socket, or before the session's time
    limit) continues it: `disconnected()` says the socket is gone (queued frames are dropped;
    commands until the next session only update the conversation), and on the next socket the
    backend re-sends the configuration and the conversation as text items, then reports
    `SessionReady` again. When to reconnect is the call's decision (`shim.model_link`)."""

    name: str
    out: list[str]
    # The append command's frame as (head, tail) around the caller's base64 μ-law, so the hot path
    # sends a caller frame as bytes without a str or a call (Call.relay_caller_frame); None: every
    # frame goes through append_audio.
    append_wire: tuple[bytes, bytes] | None

    def connect_target(self, base_url: str, model: str, api_key: str) -> tuple[str, dict[str, str]]: ...
    def configure(self, session: dict[str, Any]) -> None: ...
    def append_audio(self, audio_b64: str) -> None: ...
    def create_response(self, request_id: str, instructions: str | None, purpose: str) -> None: ...
    def cancel_response(self, response_id: str) -> None: ...
    def truncate_item(self, item_id: str, heard_ms: int) -> None: ...
    def delete_item(self, item_id: str) -> None: ...
    def add_message(self, role: str, text: str, remember: bool = True) -> None: ...
    def send_tool_result(self, call_id: str, output: str) -> None: ...
    def feed(self, text: str | bytes, sink: ModelEventSink) -> None: ...
    def disconnected(self) -> None: ...
