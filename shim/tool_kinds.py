"""The one registry of Vapi tool kinds: which the shim runs and how, and what a user loses with
the ones it cannot run. Translation (which tool types an assistant may have), the tool
converters (`shim.vapi_tools`), the call core (built-ins) and the shell (who makes the request)
all read it. Adding a tool kind starts here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RunBy(Enum):
    CUSTOMER_SERVER = "customer server"  # a tool-calls webhook to the customer's server URL
    SHIM_HTTP = "shim http"  # the shim makes the configured HTTP request itself (apiRequest)
    CALL = "call"  # handled inside the call core: no request leaves (endCall, transferCall, dtmf)


@dataclass(frozen=True)
class ToolKind:
    name: str  # Vapi's tool `type`
    run_by: RunBy


FUNCTION = ToolKind("function", RunBy.CUSTOMER_SERVER)
API_REQUEST = ToolKind("apiRequest", RunBy.SHIM_HTTP)
END_CALL = ToolKind("endCall", RunBy.CALL)
TRANSFER_CALL = ToolKind("transferCall", RunBy.CALL)
DTMF = ToolKind("dtmf", RunBy.CALL)

SUPPORTED: dict[str, ToolKind] = {k.name: k for k in (FUNCTION, API_REQUEST, END_CALL, TRANSFER_CALL, DTMF)}

# What the user loses for tool types the shim cannot run (Vapi executes them on its platform).
UNSUPPORTED: dict[str, str] = {
    "query": "knowledge-base search over files stored in Vapi",
    "sms": "sending text messages from the call",
    "voicemail": "the voicemail tool (leaving a message when a machine answers)",
    "handoff": "handing the call to another assistant (squads)",
    "mcp": "the tools of the MCP server (Realtime has native MCP tools; not wired up)",
    "code": "code run in Vapi's sandbox",
    "sipRequest": "sending SIP requests on the call",
    "output": "Vapi's output tool",
    "make": "the Make.com scenario",
    "ghl": "the GoHighLevel workflow",
    "gohighlevel.calendar.availability.check": "GoHighLevel calendar availability checks",
    "gohighlevel.calendar.event.create": "GoHighLevel calendar bookings",
    "gohighlevel.contact.create": "GoHighLevel contact creation",
    "gohighlevel.contact.get": "GoHighLevel contact lookups",
    "google.calendar.availability.check": "Google Calendar availability checks",
    "google.calendar.event.create": "Google Calendar bookings",
    "google.sheets.row.append": "appending rows to Google Sheets",
    "slack.message.send": "sending Slack messages",
    "bash": "the bash computer-use tool",
    "computer": "the computer-use tool",
    "textEditor": "the text-editor computer-use tool",
}

# Every tool `type` Vapi defines: an assistant with any other type is not a valid assistant.
KNOWN_TYPES: frozenset[str] = frozenset(SUPPORTED) | frozenset(UNSUPPORTED)


def runs_in_call(kind: str) -> bool:
    spec = SUPPORTED.get(kind)
    return spec is not None and spec.run_by is RunBy.CALL
