"""The decisions the I/O shell (`shim.bridge`) used to make inline, as pure functions: which
assistant a call runs with which overrides, what an `apiRequest` tool sends and how its answer
reads, and the post-call work (analysis row, end-of-call report). No sockets, files or clocks:
the shell does the I/O around them, and each is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable
from urllib.parse import quote

from . import twilio_media as tw
from .assistant import CallContext, render
from shim_tools import envelope
from shim_tools.results import ToolOutcome

# --- which assistant, with which overrides ------------------------------------------------

RESERVED_PARAMETERS = frozenset({"assistant", "from", "to"})  # <Parameter>s that are not template variables


@dataclass(frozen=True)
class ChosenAssistant:
    assistant_id: str
    assistant: dict[str, Any]
    context: CallContext


def choose_assistant(start: tw.Start, requested: dict[str, Any] | None,
                     load: Callable[[str], dict[str, Any]]) -> ChosenAssistant:
    """The call's assistant: the number's (the stream's `assistant` parameter), or Vapi's
    assistant-request answer: an inline assistant or an id, plus `assistantOverrides` (top-level
    keys replace the assistant's, `variableValues` become template variables). `load` reads a
    saved assistant by id (raises AssistantError)."""
    params = start.custom_parameters
    overrides: dict[str, Any] = {}
    if requested is not None:
        overrides = dict(requested.get("assistantOverrides") or {})
        if isinstance(requested.get("assistant"), dict):
            assistant = dict(requested["assistant"])
            assistant_id = str(assistant.get("id") or assistant.get("name") or "inline")
        else:
            assistant_id = str(requested.get("assistantId") or "")
            assistant = load(assistant_id)
    else:
        assistant_id = params.get("assistant", "")
        assistant = load(assistant_id)
    variable_values = overrides.pop("variableValues", None) or {}
    context = CallContext(
        call_sid=start.call_sid,
        from_number=params.get("from", ""),
        to_number=params.get("to", ""),
        variables={**variable_values, **{k: v for k, v in params.items() if k not in RESERVED_PARAMETERS}},
    )
    return ChosenAssistant(assistant_id, {**assistant, **overrides}, context)


# --- the apiRequest tool ------------------------------------------------------------------

API_ANSWER_MAX_CHARS = 20_000
# The shell reads at most this much of an answer (the rest is never downloaded), and the tool's
# timeout is a total deadline: a server dripping bytes cannot hold the call.
API_ANSWER_MAX_BYTES = 20_000


@dataclass(frozen=True)
class ApiRequest:
    method: str
    url: str
    headers: dict[str, str]
    json: Any
    timeout_s: float


def api_request(tool: dict[str, Any], arguments: dict[str, Any], variables: dict[str, Any]) -> ApiRequest:
    """Vapi's apiRequest tool: the platform calls the URL itself (method, Liquid URL, headers,
    JSON body = the model's arguments + static parameters). Raises AssistantError/ValueError for
    a URL template or timeout that cannot be used.

    Security rule: the model's arguments fill the URL template URL-encoded, and never replace
    the call's own variables, so a model cannot point the request (and the customer's headers)
    at another host or path."""
    encoded = {k: quote(str(v), safe="") for k, v in arguments.items() if not isinstance(v, (dict, list))}
    url = render(str(tool.get("url") or ""), {**encoded, **variables}, "tool.url")
    timeout = float(tool.get("timeoutSeconds") or 20)
    headers = {
        str(name): str(spec.get("value"))
        for name, spec in ((tool.get("headers") or {}).get("properties") or {}).items()
        if isinstance(spec, dict) and spec.get("value") is not None
    }
    return ApiRequest(str(tool.get("method") or "POST"), url, headers,
                      envelope.with_static_parameters(tool, arguments), timeout)


def failed_outcome(call_id: str, output: str, *, status: str = "error", http_status: int | None = None) -> ToolOutcome:
    return ToolOutcome(call_id, status, output, None, output, None, http_status)


def api_answer(call_id: str, status_code: int, text: str) -> ToolOutcome:
    """The response is the tool's result (capped); a non-2xx status is an error for the model."""
    text = text[:API_ANSWER_MAX_CHARS]
    if 200 <= status_code < 300:
        return ToolOutcome(call_id, "ok", text or "Success.", text, None, None, status_code)
    return failed_outcome(call_id, f"Error: the request failed with HTTP {status_code}.", http_status=status_code)


def api_failure(call_id: str, error: BaseException, *, timed_out: bool) -> ToolOutcome:
    if timed_out:
        return failed_outcome(call_id, "No result returned.", status="timeout")
    return failed_outcome(call_id, f"Error: the request could not be made ({type(error).__name__}).")


# --- after the call -----------------------------------------------------------------------


def should_analyze(*, api_key: str, hipaa: bool) -> bool:
    """analysisPlan runs through OpenAI chat; never on a HIPAA call (no transcript leaves)."""
    return bool(api_key) and not hipaa


def kept_analysis(analysis: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of the analysis that produced something, or None."""
    kept = {k: v for k, v in (analysis or {}).items() if v is not None}
    return kept or None


def analysis_row(call_sid: str, analysis: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `calls` columns the analysis fills (summary, analysis), or None when it produced nothing."""
    kept = kept_analysis(analysis)
    if kept is None:
        return None
    return {"call_sid": call_sid, "summary": kept.get("summary"), "analysis": kept}


def end_of_call_report(info: envelope.CallInfo, *, ended_reason: str, ended_at: datetime | None,
                       messages: list[envelope.Message], now_ms: int, recording_url: str | None,
                       analysis: dict[str, Any] | None) -> dict[str, Any]:
    return envelope.end_of_call_report(
        info, ended_reason=ended_reason, ended_at=ended_at, messages=messages, now_ms=now_ms,
        recording_url=recording_url, analysis=kept_analysis(analysis),
    )


def vapi_tool_name(tool: dict[str, Any], fallback: str) -> str:
    """The name Vapi puts in a tool-calls message: function.name, else the tool's name."""
    function = tool.get("function")
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return function["name"]
    return str(tool.get("name") or fallback)
