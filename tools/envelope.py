"""Vapi server-message envelopes, built exactly as Vapi sends them (https://docs.vapi.ai/server-url/events).

Pure: no I/O, no clock (every builder takes ``now_ms``), no randomness. Every object built here
validates against the vapi-server-sdk 3.0.0 model for it once the SDK's one known quirk is
normalised: ``toolCallList[].function.arguments`` (also ``toolCalls`` and
``toolWithToolCallList[].toolCall``) is a JSON **object** here, as live Vapi sends it, while the SDK
types it as a string (the API returns a string). Inside ``artifact`` (messages, messagesOpenAIFormatted) the
arguments are JSON strings, as Vapi writes them there.

Shapes follow the fixtures ``tests/fixtures/vapi/tool_calls.dental_check_availability.request.json``
and ``end_of_call_report.dental.json`` key for key, except for what only Vapi can know
(``call.monitor`` listen/control URLs, ``phoneNumber.server``, per-provider ``costs``,
``artifact.logUrl``, the mono recordings).

What the ``assistant`` field carries: the exported assistant as loaded, minus the export metadata
Vapi does not echo (``id``, ``orgId``, ``createdAt``, ``updatedAt``, ``isServerUrlSecretSet``,
``latestVersion``) and minus every secret: ``secret`` inside any ``server`` object,
``serverUrlSecret``, ``credentials``, ``twilioAuthToken`` / ``twilioApiSecret`` and any key naming a
credential (``…secret``, ``…password``, ``apiKey``, ``authorization``, ``token``…), every header
whose name suggests a credential (``Authorization``, ``X-Api-Key``, ``Cookie``, ``…Token``…: a tool's
``Authorization`` must not reach another tool's server; ``X-Clinic-Id`` is echoed as Vapi does),
and the query string, fragment and user:password of every http(s) URL, at any depth. The same scrubbing applies to the tool DTOs in ``toolWithToolCallList``. Liquid templates
are left as written (the fixture shows them unrendered).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "CallInfo", "Message", "ToolCallRequest",
    "vapi_call_id", "phone_number_id", "org_id",
    "call_object", "phone_number_object", "customer_object", "artifact", "sanitized_assistant",
    "sanitized_tool", "tool_call_object", "with_static_parameters",
    "tool_calls_message", "status_update_message", "transcript_message", "hang_message",
    "transfer_destination_request", "assistant_request", "end_of_call_report",
    "iso_ms", "json_compact",
]

# Fixed namespaces: the same CallSid / number / account always maps to the same uuid, across
# processes and instances (uuid5 is a hash, not random).
_NS = uuid.UUID("6f2d7a0e-3c55-5b8e-9a41-2f0c8d1e7b39")
_NS_CALL = uuid.uuid5(_NS, "vapi-call")
_NS_PHONE = uuid.uuid5(_NS, "vapi-phone-number")
_NS_ORG = uuid.uuid5(_NS, "vapi-org")

# Export metadata Vapi does not put into the envelope's `assistant` (compare
# dental_receptionist.assistant.json with the `assistant` of the tool-calls fixture).
_EXPORT_ONLY_KEYS = ("id", "orgId", "createdAt", "updatedAt", "isServerUrlSecretSet", "latestVersion")
# Secret-bearing keys, dropped at any depth.
_SECRET_KEYS = frozenset({"serverUrlSecret", "credentials", "twilioAuthToken", "twilioApiSecret"})
# ...and any key that names a credential (maxTokens, credentialIds are not credentials).
_SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|api[-_]?key|authorization|credentials?|private[-_]?key|access[-_]?token|auth[-_]?token|"
    r"bearer|cookie)$|^token$", re.IGNORECASE)
# Header names that may carry a credential (Authorization, X-Api-Key, X-Auth-Token, Cookie...):
# dropped from every echoed `headers` object; others (X-Clinic-Id) are echoed as Vapi does.
_CREDENTIAL_HEADER_RE = re.compile(r"auth|token|secret|key|cookie|pass|signature|credential|session|bearer", re.IGNORECASE)


@dataclass(frozen=True)
class CallInfo:
    call_sid: str                 # Twilio CallSid (CA…)
    account_sid: str              # Twilio AccountSid
    assistant_id: str             # "" when no assistant is chosen yet (assistant-request)
    assistant: dict               # the exported assistant as loaded ({} when none yet)
    from_number: str              # the caller (customer.number)
    to_number: str                # the shim number (phoneNumber.number)
    started_at: datetime          # tz-aware
    variable_values: dict[str, Any] = field(default_factory=dict)  # assistantOverrides.variableValues
    phone_number_name: str | None = None  # phoneNumber.name, when known


@dataclass(frozen=True)
class Message:
    """One artifact message in Vapi's format."""

    role: str                     # "system" | "bot" | "user" | "tool_calls" | "tool_call_result"
    text: str = ""
    time_ms: int = 0
    seconds_from_start: float = 0.0
    end_time_ms: int | None = None
    # role tool_calls: [{"id", "type": "function", "function": {"name", "arguments": JSON string}}]
    # (a dict `arguments` is accepted and encoded the way Vapi does: compact JSON)
    tool_calls: list[dict] | None = None
    # role tool_call_result
    name: str | None = None
    result: str | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ToolCallRequest:
    id: str                       # the model's call_id (Vapi's toolCallId)
    name: str                     # the Vapi tool name (function.name in the export)
    arguments: dict               # as sent (an object); static `parameters` already merged
    tool: dict                    # the Vapi tool DTO as exported / saved


# --- ids and small helpers -----------------------------------------------------------------------


def vapi_call_id(call_sid: str) -> str:
    """`call.id` for a Twilio call: a uuid5 of the CallSid (stable across processes)."""
    return str(uuid.uuid5(_NS_CALL, call_sid))


def phone_number_id(number: str) -> str:
    """`phoneNumber.id` / `call.phoneNumberId` for a number: a uuid5 of the E.164 number."""
    return str(uuid.uuid5(_NS_PHONE, number))


def org_id(info: CallInfo) -> str:
    """The assistant's `orgId` when the export has one, else a uuid5 of the Twilio AccountSid."""
    oid = info.assistant.get("orgId") if isinstance(info.assistant, dict) else None
    return oid if isinstance(oid, str) and oid else str(uuid.uuid5(_NS_ORG, info.account_sid))


def iso_ms(moment: datetime | int | float) -> str:
    """ISO 8601 UTC with milliseconds and `Z` ("2026-02-17T15:03:41.512Z"); ints are epoch ms."""
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            raise ValueError("naive datetime: pass a tz-aware one")
        dt = moment.astimezone(timezone.utc)
    else:
        dt = datetime.fromtimestamp(moment / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _epoch_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def json_compact(value: Any) -> str:
    """JSON the way Vapi (JavaScript's JSON.stringify) writes it: no spaces, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _strip_url_credentials(text: str) -> str:
    """An http(s) URL without its query, fragment and user:password (where tokens ride)."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.scheme.lower() not in ("http", "https") or not (parts.query or parts.fragment or "@" in parts.netloc):
        return text
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _scrub(node: Any, *, under_server: bool = False) -> Any:
    """A deep copy of `node` without credentials: secret-bearing keys, credential-like headers
    (one tool's Authorization must not reach another tool's server), and URL query strings."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if (key in _SECRET_KEYS or (under_server and key == "secret")
                    or (isinstance(key, str) and _SECRET_KEY_RE.search(key))):
                continue
            if key == "headers" and isinstance(value, dict):  # Vapi echoes headers: keep the harmless ones
                out[key] = {k: v for k, v in value.items() if not (isinstance(k, str) and _CREDENTIAL_HEADER_RE.search(k))}
                continue
            out[key] = _scrub(value, under_server=key == "server")
        return out
    if isinstance(node, list):
        return [_scrub(item) for item in node]
    if isinstance(node, str) and "://" in node[:10]:
        return _strip_url_credentials(node)
    return node


def sanitized_assistant(assistant: dict) -> dict:
    """The `assistant` Vapi echoes in server messages: the export minus its metadata and secrets."""
    if not assistant:
        return {}
    return _scrub({k: v for k, v in assistant.items() if k not in _EXPORT_ONLY_KEYS})


def sanitized_tool(tool: dict) -> dict:
    """A tool DTO as echoed in `toolWithToolCallList`: as exported/saved, minus secrets."""
    return _scrub(tool)


def with_static_parameters(tool: dict, arguments: dict, render: Callable[[str], str] = lambda s: s) -> dict:
    """The arguments Vapi sends for `tool`: the model's, then the tool's static `parameters`
    ([{key, value}]) merged over them (same keys overridden), string values passed through
    `render` (the caller's Liquid renderer) recursively (https://docs.vapi.ai/tools/custom-tools)."""

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return render(value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    merged = dict(arguments)
    static = tool.get("parameters")
    for param in static if isinstance(static, list) else ():
        if isinstance(param, dict) and isinstance(param.get("key"), str):
            merged[param["key"]] = walk(param.get("value"))
    return merged


# --- Call / phone number / customer --------------------------------------------------------------


def customer_object(info: CallInfo) -> dict:
    return {"number": info.from_number}


def phone_number_object(info: CallInfo) -> dict:
    """The number record (`TwilioPhoneNumber`); never an auth token. createdAt/updatedAt are not
    known to the shim: the call's start is used."""
    out: dict[str, Any] = {
        "id": phone_number_id(info.to_number),
        "orgId": org_id(info),
        "provider": "twilio",
        "number": info.to_number,
    }
    if info.phone_number_name:
        out["name"] = info.phone_number_name
    out["status"] = "active"
    out["twilioAccountSid"] = info.account_sid
    out["assistantId"] = info.assistant_id or None
    created = iso_ms(info.started_at)
    out["createdAt"] = created
    out["updatedAt"] = created
    return out


def call_object(info: CallInfo, *, status: str = "in-progress", ended_at: datetime | None = None,
                ended_reason: str | None = None, now_ms: int | None = None, cost: float | None = None) -> dict:
    """Vapi's `Call` for an inbound Twilio call. `updatedAt` is `now_ms` (else the end, else
    the start); `createdAt` is the start."""
    started = iso_ms(info.started_at)
    if now_ms is not None:
        updated = iso_ms(now_ms)
    elif ended_at is not None:
        updated = iso_ms(ended_at)
    else:
        updated = started
    out: dict[str, Any] = {
        "id": vapi_call_id(info.call_sid),
        "orgId": org_id(info),
        "createdAt": started,
        "updatedAt": updated,
        "type": "inboundPhoneCall",
        "status": status,
        "phoneCallProvider": "twilio",
        "phoneCallTransport": "pstn",
        "phoneCallProviderId": info.call_sid,
        "phoneNumberId": phone_number_id(info.to_number),
    }
    if info.assistant_id:
        out["assistantId"] = info.assistant_id
    if info.variable_values:
        out["assistantOverrides"] = {"variableValues": dict(info.variable_values)}
    out["customer"] = customer_object(info)
    out["startedAt"] = started
    out["transport"] = {"provider": "twilio", "callSid": info.call_sid, "accountSid": info.account_sid}
    if ended_reason is not None:
        out["endedReason"] = ended_reason
    if ended_at is not None:
        out["endedAt"] = iso_ms(ended_at)
    if cost is not None:
        out["cost"] = cost
    return out


# --- artifact ------------------------------------------------------------------------------------


def _arguments_string(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json_compact(arguments if arguments is not None else {})


def _artifact_tool_calls(calls: list[dict] | None) -> list[dict]:
    out = []
    for call in calls or ():
        fn = call.get("function") or {}
        out.append({"id": call.get("id", ""), "type": call.get("type", "function"),
                    "function": {"name": fn.get("name", ""), "arguments": _arguments_string(fn.get("arguments"))}})
    return out


def _vapi_message(m: Message) -> dict:
    secs = m.seconds_from_start
    if m.role == "system":
        return {"role": "system", "message": m.text, "time": m.time_ms, "secondsFromStart": secs}
    if m.role in ("bot", "user"):
        end = m.end_time_ms if m.end_time_ms is not None else m.time_ms
        out = {"role": m.role, "message": m.text, "time": m.time_ms, "endTime": end,
               "secondsFromStart": secs, "duration": end - m.time_ms}
        if m.role == "bot":
            out["source"] = ""
        return out
    if m.role == "tool_calls":
        return {"role": "tool_calls", "toolCalls": _artifact_tool_calls(m.tool_calls), "message": m.text,
                "time": m.time_ms, "secondsFromStart": secs}
    if m.role == "tool_call_result":
        return {"role": "tool_call_result", "toolCallId": m.tool_call_id or "", "name": m.name or "",
                "result": m.result if m.result is not None else m.text,
                "time": m.time_ms, "secondsFromStart": secs}
    raise ValueError(f"unknown artifact message role {m.role!r}")


def _openai_message(m: Message) -> dict:
    if m.role == "system":
        return {"role": "system", "content": m.text}
    if m.role == "bot":
        return {"role": "assistant", "content": m.text}
    if m.role == "user":
        return {"role": "user", "content": m.text}
    if m.role == "tool_calls":
        return {"role": "assistant", "content": m.text, "tool_calls": _artifact_tool_calls(m.tool_calls)}
    if m.role == "tool_call_result":
        return {"role": "tool", "tool_call_id": m.tool_call_id or "",
                "content": m.result if m.result is not None else m.text}
    raise ValueError(f"unknown artifact message role {m.role!r}")


def _transcript(messages: list[Message]) -> str:
    lines = []
    for m in messages:
        if m.role == "bot":
            lines.append(f"AI: {m.text}\n")
        elif m.role == "user":
            lines.append(f"User: {m.text}\n")
    return "".join(lines)


def artifact(messages: list[Message]) -> dict:
    """`{messages, messagesOpenAIFormatted, transcript}` (transcript = "AI: …\\nUser: …\\n")."""
    return {
        "messages": [_vapi_message(m) for m in messages],
        "messagesOpenAIFormatted": [_openai_message(m) for m in messages],
        "transcript": _transcript(messages),
    }


def _live_artifact(messages: list[Message]) -> dict:
    # What Vapi attaches to in-call messages (the tool-calls message): no transcript.
    return {"messages": [_vapi_message(m) for m in messages],
            "messagesOpenAIFormatted": [_openai_message(m) for m in messages]}


# --- messages ------------------------------------------------------------------------------------


def _common(info: CallInfo, *, call: dict, include_assistant: bool = True) -> dict:
    out = {"call": call, "phoneNumber": phone_number_object(info), "customer": customer_object(info)}
    if include_assistant and info.assistant:
        out["assistant"] = sanitized_assistant(info.assistant)
    return out


def tool_call_object(call: ToolCallRequest) -> dict:
    """`{id, type: "function", function: {name, arguments: <object>}}` (live shape)."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": dict(call.arguments)}}


def tool_calls_message(info: CallInfo, calls: list[ToolCallRequest], messages: list[Message], now_ms: int) -> dict:
    """The `tool-calls` request body: all calls of one model turn bound for one server."""
    with_tool = []
    for c in calls:
        item = sanitized_tool(c.tool)
        item.pop("toolCall", None)
        item["toolCall"] = tool_call_object(c)
        with_tool.append(item)
    msg: dict[str, Any] = {
        "timestamp": now_ms,
        "type": "tool-calls",
        "toolCalls": [tool_call_object(c) for c in calls],   # legacy duplicate, read by Vapi's examples
        "toolCallList": [tool_call_object(c) for c in calls],
        "toolWithToolCallList": with_tool,
        "artifact": _live_artifact(messages),
    }
    msg.update(_common(info, call=call_object(info, now_ms=now_ms)))
    return {"message": msg}


def status_update_message(info: CallInfo, status: str, messages: list[Message], now_ms: int, *,
                          ended_reason: str | None = None, ended_at: datetime | None = None,
                          destination: dict | None = None) -> dict:
    """`status-update`. `ended` carries `endedReason` (and the call's `endedAt`, `now_ms` when
    `ended_at` is not given); `forwarding` carries `destination` and the conversation so far."""
    msg: dict[str, Any] = {"timestamp": now_ms, "type": "status-update", "status": status}
    if ended_reason is not None:
        msg["endedReason"] = ended_reason
    if status == "ended" and ended_at is None:
        ended_at = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
    if status == "forwarding":
        if destination is not None:
            msg["destination"] = dict(destination)
        full = artifact(messages)
        msg["messages"] = full["messages"]
        msg["messagesOpenAIFormatted"] = full["messagesOpenAIFormatted"]
        msg["transcript"] = full["transcript"]
    msg["artifact"] = _live_artifact(messages)
    msg.update(_common(info, call=call_object(
        info, status=status, now_ms=now_ms, ended_reason=ended_reason if status == "ended" else None,
        ended_at=ended_at if status == "ended" else None)))
    return {"message": msg}


def transcript_message(info: CallInfo, role: str, text: str, now_ms: int) -> dict:
    """A final `transcript` message for one utterance."""
    if role not in ("assistant", "user"):
        raise ValueError(f"transcript role must be 'assistant' or 'user', not {role!r}")
    msg: dict[str, Any] = {"timestamp": now_ms, "type": "transcript", "role": role,
                           "transcriptType": "final", "transcript": text}
    msg.update(_common(info, call=call_object(info, now_ms=now_ms)))
    return {"message": msg}


def hang_message(info: CallInfo, now_ms: int) -> dict:
    """`hang`: the assistant is silent because something (model, tool) is slow."""
    msg: dict[str, Any] = {"timestamp": now_ms, "type": "hang"}
    msg.update(_common(info, call=call_object(info, now_ms=now_ms)))
    return {"message": msg}


def transfer_destination_request(info: CallInfo, messages: list[Message], now_ms: int) -> dict:
    """`transfer-destination-request`: a transferCall without destinations."""
    msg: dict[str, Any] = {"timestamp": now_ms, "type": "transfer-destination-request",
                           "artifact": _live_artifact(messages)}
    msg.update(_common(info, call=call_object(info, now_ms=now_ms)))
    return {"message": msg}


def assistant_request(info: CallInfo, now_ms: int) -> dict:
    """`assistant-request`: sent while the call rings; `assistant` (and `call.assistantId`)
    only when one is already known."""
    msg: dict[str, Any] = {"timestamp": now_ms, "type": "assistant-request"}
    msg.update(_common(info, call=call_object(info, status="ringing", now_ms=now_ms)))
    return {"message": msg}


def _success_evaluation(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json_compact(value)


def end_of_call_report(info: CallInfo, *, ended_reason: str, ended_at: datetime, messages: list[Message],
                       now_ms: int, recording_url: str | None = None, analysis: dict | None = None,
                       cost: float | None = None) -> dict:
    """`end-of-call-report`: the spec fields plus the legacy top-level fields handlers read
    (transcript, summary, messages, recordingUrl, stereoRecordingUrl, durationMs/Seconds/Minutes,
    costBreakdown when the cost is known).

    The shim has one recording (Twilio's dual-channel file): it is given as `recordingUrl`,
    `stereoRecordingUrl` and `recording.stereoUrl` alike. `summary` (top level) is always a string,
    "" when no summary was made; `analysis` holds only what was given."""
    art = artifact(messages)
    variables = dict(info.variable_values)
    variables["customer"] = {"number": info.from_number}
    variables["phoneNumber"] = {"number": info.to_number}
    if recording_url:
        art["recordingUrl"] = recording_url
        art["stereoRecordingUrl"] = recording_url
        art["recording"] = {"stereoUrl": recording_url}
    art["variableValues"] = variables

    ana: dict[str, Any] = {}
    for key, value in (analysis or {}).items():
        if value is None:
            continue
        ana[key] = _success_evaluation(value) if key == "successEvaluation" else value

    duration_ms = max(0, _epoch_ms(ended_at) - _epoch_ms(info.started_at))
    msg: dict[str, Any] = {
        "timestamp": now_ms,
        "type": "end-of-call-report",
        "endedReason": ended_reason,
        "startedAt": iso_ms(info.started_at),
        "endedAt": iso_ms(ended_at),
    }
    if cost is not None:
        msg["cost"] = cost
    msg["artifact"] = art
    msg["analysis"] = ana
    msg.update(_common(info, call=call_object(info, status="ended", ended_at=ended_at, ended_reason=ended_reason,
                                              now_ms=now_ms, cost=cost)))
    msg["durationMs"] = duration_ms
    msg["durationSeconds"] = round(duration_ms / 1000, 3)
    msg["durationMinutes"] = round(duration_ms / 60000, 4)
    msg["summary"] = ana.get("summary") if isinstance(ana.get("summary"), str) else ""
    msg["transcript"] = art["transcript"]
    msg["messages"] = list(art["messages"])
    if recording_url:
        msg["recordingUrl"] = recording_url
        msg["stereoRecordingUrl"] = recording_url
    if cost is not None:
        msg["costBreakdown"] = {"total": cost}
    return {"message": msg}
