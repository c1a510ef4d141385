"""Tool orchestration, the part without I/O: the function calls of one model response form a
batch that is finished once every call_id has its answer (or the backstop deadline passed), and
then exactly one thing follows — a transfer or hang-up after a goodbye, a sentence said word for
word instead of the model (Vapi's request-complete/failed messages), or one model response.
Plus the pure helpers the call uses to read a tool's messages and transfer destinations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .assistant import AssistantError, render
from shim_tools.results import tool_message

DEFAULT_TIMEOUT_S = 20.0  # server.timeoutSeconds when unset (Vapi's default)
BACKSTOP_S = 5.0  # after a webhook's own timeout: its task died without answering


@dataclass(frozen=True, slots=True)
class AfterTools:
    """What follows a finished batch (in this order): system notes for the model, then either
    end the call (after saying `say`, with `next_action`, e.g. a <Dial>), say `say` instead of
    asking the model, or ask the model for one response."""

    notes: tuple[str, ...]
    end_reason: str | None
    say: str
    next_action: dict[str, Any] | None


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

    def expect(self, call_id: str, answer_by: float) -> None:
        """`call_id` is answered from outside (a webhook) by `answer_by` at the latest."""
        self.pending.add(call_id)
        self.deadline = max(self.deadline, answer_by)

    def answered(self, call_id: str) -> bool:
        """Take an answer; False if it was not awaited (late, duplicate, unknown)."""
        if call_id not in self.pending:
            return False
        self.pending.discard(call_id)
        return True

    @property
    def complete(self) -> bool:
        return not self.pending

    def overdue(self, now: float) -> list[str]:
        """Calls still unanswered past the backstop (their task died): to be answered as timed out."""
        return sorted(self.pending) if self.pending and now > self.deadline else []

    def after(self) -> AfterTools:
        notes = tuple(self.system_notes)
        if self.transfer is not None:
            return AfterTools(notes, "assistant-forwarded-call", self.transfer_say, self.transfer)
        if self.end_reason is not None:
            return AfterTools(notes, self.end_reason, self.speak_instead or self.end_say, None)
        return AfterTools(notes, None, self.speak_instead or "", None)


def first_message(tool: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for message in tool.get("messages") or []:
        if isinstance(message, dict) and message.get("type") == kind:
            return message
    return None


def transfer_message(tool: dict[str, Any], destination: dict[str, Any], arguments: dict[str, Any],
                      rng: random.Random | None) -> str:
    """What Vapi says before a transfer: the tool's request-start if it has one (\"\" = silence),
    else the destination's message, else "Transferring the call now"."""
    if first_message(tool, "request-start") is not None:
        return tool_message(tool, "request-start", arguments, rng=rng) or ""
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


def server_timeout(tool: dict[str, Any]) -> float:
    server = tool.get("server") if isinstance(tool.get("server"), dict) else {}
    value = server.get("timeoutSeconds")
    return float(value) if isinstance(value, (int, float)) and 1 <= value <= 300 else DEFAULT_TIMEOUT_S
