"""What the call core asks its I/O shell to do, as typed effects (`Call.take_effects()`).

Frames are the exception: audio and control frames for Twilio (`Call.twilio_out`) and for the
model (`Call.backend.out`) are strings in two outboxes of their own, because they are the hot
path (an effect object per 20 ms frame would cost more than the frame). Rows are the other:
the injected RecordSink only appends to the writer's in-memory queue, which is the same thing
as an effect executed inline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import twilio_media as tw
from .tool_schema import ToolBinding


@dataclass(frozen=True, slots=True)
class ResolveAssistant:
    """The stream started: load and translate the assistant, answer with Call.on_setup or
    Call.on_setup_failed (the shell also checks the start frame's per-call token first)."""

    start: tw.Start


@dataclass(frozen=True, slots=True)
class ConnectModel:
    """Open the model socket (URL and headers from Call.backend) after `delay_s`, closing the
    call's current one first if it has one (a reconnect or a rollover: frames from the old socket
    are no longer delivered); report with on_model_connected / on_model_connect_failed."""

    delay_s: float = 0.0
    timeout_s: float | None = None  # for the handshake; None: the configured MODEL_CONNECT_TIMEOUT


@dataclass(frozen=True, slots=True)
class StartRecording:
    """artifactPlan.recordingEnabled: have Twilio record the call; report on_recording_started."""

    account_sid: str
    call_sid: str


@dataclass(frozen=True, slots=True)
class LoadBackground:
    """backgroundSound: load the ambience (a name or a URL); hand it over with on_background_ready."""

    sound: str


@dataclass(slots=True)
class ToolRequest:
    """A webhook to call for one function call (the core decides, the shell does the I/O and
    feeds the answer back through on_tool_outcome / on_transfer_destination)."""

    call_id: str
    binding: ToolBinding
    arguments: dict[str, Any]
    seq: int
    fire_and_forget: bool = False  # async tools: the model was answered already
    kind: str = "tool-calls"  # or "transfer-destination-request"


@dataclass(frozen=True, slots=True)
class DeliverServerMessage:
    """A Vapi server message (status-update, transcript, hang...) for the assistant's server."""

    kind: str
    body: dict[str, Any]


@dataclass(frozen=True)
class End:
    reason: str  # Vapi endedReason vocabulary
    next_action: dict[str, Any]  # what /twilio/stream-ended answers
    ended_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call is over: close both sockets, end the call's tasks, run the post-call work."""

    end: End


Effect = ResolveAssistant | ConnectModel | StartRecording | LoadBackground | ToolRequest | DeliverServerMessage | CallEnded
