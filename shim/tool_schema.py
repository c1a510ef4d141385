"""Vapi tools -> OpenAI Realtime (GA) function tools, with a finding for every change. Pure, no I/O.

`convert_tools` takes the assistant's tools as `(json_path, vapi_tool)` pairs (inline `model.tools`
first, then the resolved `model.toolIds`, Vapi's merge order) and returns

* the Realtime tool dicts, exactly what goes into `session.tools`: flat
  `{"type": "function", "name", "description"?, "parameters"}`. These are the only keys
  `openai.types.realtime.RealtimeFunctionTool` declares (the GA session `tools` union is
  `RealtimeFunctionTool | Mcp`); there is no `strict` flag on GA function tools;
* one `ToolBinding` per emitted tool (same order): the name the model sees -> the original Vapi DTO
  and its kind, for the bridge. A renamed tool (invalid or duplicate name) keeps its original name in
  `vapi_tool`, so the `tool-calls` webhook can still carry the name the customer's server expects;
* `Finding`s: `mapped` (reproduced, or the change has no effect on what the model may send),
  `approximated` (reproduced in a lossy way, e.g. a constraint moved into the description), or
  `unsupported` (dropped: the user loses that behaviour).

Tool kinds: `function`, `endCall`, `transferCall`, `dtmf` and `apiRequest` become function tools
(built-ins get the LLM-visible shape Vapi gives them, https://docs.vapi.ai/tools/default-tools); every other Vapi tool
type is reported as `unsupported` and not emitted. Keys that are not LLM-visible (`messages`,
`async`, `server`, static `parameters`, `variableExtractionPlan`, `rejectionPlan`, destinations'
transfer plans, apiRequest `url`/`method`/`headers`) are never emitted; they stay in
`ToolBinding.vapi_tool`.

The `parameters` schemas go through `shim.json_schema_subset.sanitize_schema` (its docstring lists
the subset). The tool kinds themselves are registered in `shim.tool_kinds`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from .json_schema_subset import (  # noqa: F401  (re-exported: callers import them from here)
    APPROXIMATED,
    MAPPED,
    MAX_DEPTH,
    SAFE_FORMATS,
    UNSUPPORTED,
    Finding,
    ToolSchemaError,
    _error,
    _show,
    sanitize_schema,
)
from .tool_kinds import SUPPORTED, UNSUPPORTED as UNSUPPORTED_TOOLS

__all__ = [
    "Finding",
    "ToolBinding",
    "ToolSchemaError",
    "convert_tools",
    "realtime_tool_name",
    "sanitize_schema",
]

NAME_MAX = 64
_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
DEFAULT_END_CALL_DESCRIPTION = "Use this function to end the call."
DEFAULT_TRANSFER_DESCRIPTION = "Use this function to transfer the call to another phone number or SIP address."
DEFAULT_DTMF_DESCRIPTION = (
    "Use this function to press keys on the phone keypad (DTMF), e.g. to navigate a phone menu."
)
DTMF_KEYS_SCHEMA = {
    "type": "string",
    "description": "The keys to press, in order: digits 0-9, * and #; w pauses 0.5 s, W pauses 1 s.",
    "pattern": "^[0-9*#wW]+$",
}
BRIDGE = "handled by the bridge"


@dataclass(frozen=True)
class ToolBinding:
    realtime_name: str  # the name the model sees (unique within the session)
    kind: str  # a key of shim.tool_kinds.SUPPORTED
    vapi_tool: dict  # the original Vapi tool DTO (not copied, never mutated)
    path: str  # JSON path of the tool
    destinations: dict[str, dict] = field(default_factory=dict)  # transferCall: enum value -> destination


def realtime_tool_name(name: str, taken: set[str]) -> str:
    """A name matching ^[a-zA-Z0-9_-]{1,64}$ and not in `taken` (suffix _2, _3…). `taken` is not modified."""
    base = name if isinstance(name, str) else ""
    if not _NAME_RE.fullmatch(base):
        ascii_ = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
        base = re.sub(r"[^a-zA-Z0-9_-]+", "_", ascii_).strip("_")[:NAME_MAX] or "tool"
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = base[: NAME_MAX - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


# ---------------------------------------------------------------------------------------------
# tools


@dataclass
class _Draft:
    kind: str
    name: str  # requested (Vapi) name
    name_path: str
    description: str | None
    parameters: dict
    destinations: dict[str, dict] = field(default_factory=dict)


def _legacy_function(path: str, tool: dict) -> dict:
    fn = tool.get("function")
    if fn is None:
        return {}
    if not isinstance(fn, dict):
        raise _error(f"{path}.function", fn, "an object with the function's name/description")
    name = fn.get("name")
    if name is not None and not isinstance(name, str):
        raise _error(f"{path}.function.name", name, "a string")
    return fn


def _description(value: Any, path: str, findings: list[Finding]) -> str | None:
    if value is None or isinstance(value, str):
        return value
    findings.append(Finding(path, UNSUPPORTED, "description is not a string: dropped"))
    return None


def _common_findings(path: str, tool: dict, findings: list[Finding], bridge_keys: tuple[str, ...]) -> None:
    for key in bridge_keys:
        if tool.get(key) is not None:
            findings.append(Finding(f"{path}.{key}", MAPPED, BRIDGE))
    if tool.get("rejectionPlan") is not None:
        findings.append(Finding(f"{path}.rejectionPlan", UNSUPPORTED,
                                "rejectionPlan is not evaluated: the tool call is never rejected based on the conversation"))
    if tool.get("variableExtractionPlan") is not None:
        findings.append(Finding(f"{path}.variableExtractionPlan", UNSUPPORTED,
                                "variableExtractionPlan is not evaluated: values from the tool result do not become call variables"))


def _function(path: str, tool: dict, findings: list[Finding]) -> _Draft:
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _error(f"{path}.function", fn, "an object with at least a 'name' string")
    name = fn.get("name")
    if not isinstance(name, str):
        raise _error(f"{path}.function.name", name, "the function's name as a string")
    desc = _description(fn.get("description"), f"{path}.function.description", findings)
    params, f = sanitize_schema(fn.get("parameters"), f"{path}.function.parameters")
    findings.extend(f)
    if "strict" in fn:
        if fn["strict"] is True:
            findings.append(Finding(f"{path}.function.strict", APPROXIMATED,
                                    "Realtime function tools have no strict mode: arguments are not guaranteed to match the schema"))
        else:
            findings.append(Finding(f"{path}.function.strict", MAPPED, "strict off is how Realtime function tools behave"))
    _common_findings(path, tool, findings, ("messages", "async", "server", "parameters"))
    return _Draft("function", name, f"{path}.function.name", desc, params)


def _end_call(path: str, tool: dict, findings: list[Finding]) -> _Draft:
    fn = _legacy_function(path, tool)
    desc = _description(fn.get("description"), f"{path}.function.description", findings)
    _ignored_parameters(path, fn, findings, "endCall takes no arguments")
    _common_findings(path, tool, findings, ("messages",))
    return _Draft("endCall", fn.get("name") or "endCall", f"{path}.function.name",
                  desc if desc is not None else DEFAULT_END_CALL_DESCRIPTION, {"type": "object", "properties": {}})


def _dtmf(path: str, tool: dict, findings: list[Finding]) -> _Draft:
    fn = _legacy_function(path, tool)
    desc = _description(fn.get("description"), f"{path}.function.description", findings)
    _ignored_parameters(path, fn, findings, "dtmf always takes one 'keys' string")
    findings.append(Finding(path, APPROXIMATED,
                            "exposed as dtmf(keys); Twilio Media Streams cannot send out-of-band DTMF, so the keys "
                            "must be played in-band by the bridge, which some phone menus detect less reliably"))
    if tool.get("sipInfoDtmfEnabled") is True:
        findings.append(Finding(f"{path}.sipInfoDtmfEnabled", UNSUPPORTED, "DTMF via SIP INFO is not available over Twilio Media Streams"))
    _common_findings(path, tool, findings, ("messages",))
    params = {"type": "object", "properties": {"keys": dict(DTMF_KEYS_SCHEMA)}, "required": ["keys"]}
    return _Draft("dtmf", fn.get("name") or "dtmf", f"{path}.function.name",
                  desc if desc is not None else DEFAULT_DTMF_DESCRIPTION, params)


def _ignored_parameters(path: str, fn: dict, findings: list[Finding], why: str) -> None:
    params = fn.get("parameters")
    if isinstance(params, dict) and params.get("properties"):
        findings.append(Finding(f"{path}.function.parameters", APPROXIMATED, f"function.parameters ignored: {why}"))


def _transfer_call(path: str, tool: dict, findings: list[Finding]) -> _Draft:
    fn = _legacy_function(path, tool)
    dests = tool.get("destinations")
    if dests is None:
        dests = []
    if not isinstance(dests, list):
        raise _error(f"{path}.destinations", dests, "a list of transfer destinations")
    values: dict[str, dict] = {}
    lines: list[str] = []
    for i, d in enumerate(dests):
        dpath = f"{path}.destinations[{i}]"
        if not isinstance(d, dict):
            raise _error(dpath, d, "a transfer destination object")
        dtype = d.get("type")
        if dtype == "assistant":
            findings.append(Finding(dpath, UNSUPPORTED,
                                    f"transfer to assistant {_show(d.get('assistantName'), 40)} (squads) is not supported: left out of the destinations"))
            continue
        if dtype == "number":
            value = d.get("number")
        elif dtype == "sip":
            value = d.get("sipUri")
        else:
            findings.append(Finding(f"{dpath}.type", UNSUPPORTED, f"unknown destination type {_show(dtype, 30)}: left out"))
            continue
        key = "number" if dtype == "number" else "sipUri"
        if not isinstance(value, str) or not value.strip():
            findings.append(Finding(f"{dpath}.{key}", MAPPED, f"destination without a {key}: left out of the enum, as Vapi does"))
            continue
        if value in values:
            findings.append(Finding(dpath, APPROXIMATED,
                                    f"duplicate destination {value!r}: the model cannot tell it from the earlier one, only the first is reachable"))
            continue
        values[value] = d
        ddesc = d.get("description")
        if isinstance(ddesc, str) and ddesc.strip():
            lines.append(f"- {value}: {ddesc.strip()}")

    given_desc = _description(fn.get("description"), f"{path}.function.description", findings)
    desc = given_desc if given_desc is not None else DEFAULT_TRANSFER_DESCRIPTION
    if lines:
        desc = f"{desc.rstrip()}\n\nDestinations:\n" + "\n".join(lines)

    given = fn.get("parameters")
    given_dest = None
    if isinstance(given, dict) and isinstance(given.get("properties"), dict):
        given_dest = given["properties"].get("destination")
    param_desc = given_dest.get("description") if isinstance(given_dest, dict) else None
    dest_schema: dict = {"type": "string"}
    if values:
        dest_schema["description"] = param_desc if isinstance(param_desc, str) else "Where to transfer the call."
        dest_schema["enum"] = list(values)
        params = {"type": "object", "properties": {"destination": dest_schema}, "required": ["destination"]}
    else:
        dest_schema["description"] = (
            param_desc if isinstance(param_desc, str) else "Where to transfer the call, if the caller named a number; may be left empty."
        )
        params = {"type": "object", "properties": {"destination": dest_schema}}
        findings.append(Finding(f"{path}.destinations", APPROXIMATED,
                                "no usable destinations: 'destination' is a free string and the shim asks the server with transfer-destination-request"))
    if given is not None:
        given_enum = given_dest.get("enum") if isinstance(given_dest, dict) else None
        same = (isinstance(given, dict) and isinstance(given.get("properties"), dict) and set(given["properties"]) == {"destination"}
                and isinstance(given_enum, list) and sorted(map(str, given_enum)) == sorted(values))
        if same:
            findings.append(Finding(f"{path}.function.parameters", MAPPED, "rebuilt from destinations (same enum)"))
        else:
            findings.append(Finding(f"{path}.function.parameters", APPROXIMATED,
                                    "function.parameters replaced by a 'destination' enum built from destinations"))
    _common_findings(path, tool, findings, ("messages",))
    return _Draft("transferCall", fn.get("name") or "transferCall", f"{path}.function.name", desc, params, values)


def _api_request(path: str, tool: dict, findings: list[Finding]) -> _Draft:
    url = tool.get("url")
    if not isinstance(url, str) or not url:
        raise _error(f"{path}.url", url, "the request URL as a non-empty string")
    fn = _legacy_function(path, tool)
    name = tool.get("name")
    name_path = f"{path}.name"
    if name is not None and not isinstance(name, str):
        raise _error(name_path, name, "a string")
    if name is None and fn.get("name"):
        name, name_path = fn["name"], f"{path}.function.name"
    if name is None:
        name = "apiRequest"
    desc = _description(tool.get("description"), f"{path}.description", findings)
    if desc is None and isinstance(fn.get("description"), str):
        desc = fn["description"]
    params, f = sanitize_schema(tool.get("body"), f"{path}.body")
    findings.extend(f)
    if fn.get("parameters") is not None:
        findings.append(Finding(f"{path}.function.parameters", MAPPED, "ignored: body is the schema, as in Vapi"))
    findings.append(Finding(f"{path}.url", MAPPED, "the bridge performs the HTTP request itself (method, url, headers, timeoutSeconds)"))
    if tool.get("credentialId") is not None:
        findings.append(Finding(f"{path}.credentialId", APPROXIMATED,
                                "credentials are not exported: the shim must be configured with this credential"))
    if tool.get("encryptedPaths"):
        findings.append(Finding(f"{path}.encryptedPaths", UNSUPPORTED, "request-body encryption is not reproduced"))
    _common_findings(path, tool, findings, ("messages", "headers", "parameters", "backoffPlan"))
    return _Draft("apiRequest", name, name_path, desc, params)


_CONVERTERS = {
    "function": _function,
    "endCall": _end_call,
    "transferCall": _transfer_call,
    "dtmf": _dtmf,
    "apiRequest": _api_request,
}
assert set(_CONVERTERS) == set(SUPPORTED), "every supported tool kind (shim.tool_kinds) has a converter"


def convert_tools(tools: list[tuple[str, dict]]) -> tuple[list[dict], list[ToolBinding], list[Finding]]:
    """(json_path, Vapi tool) pairs in Vapi's merge order -> (session.tools, bindings, findings)."""
    out_tools: list[dict] = []
    bindings: list[ToolBinding] = []
    findings: list[Finding] = []
    taken: set[str] = set()
    for path, tool in tools:
        if not isinstance(tool, dict):
            raise _error(path, tool, "a Vapi tool object")
        ttype = tool.get("type")
        if not isinstance(ttype, str) or not ttype:
            raise _error(f"{path}.type", ttype, "the tool type as a string (e.g. 'function', 'transferCall', 'endCall')")
        convert = _CONVERTERS.get(ttype)
        if convert is None:
            fn = tool.get("function") if isinstance(tool.get("function"), dict) else {}
            label = fn.get("name") or tool.get("name")
            loses = UNSUPPORTED_TOOLS.get(ttype, "a tool type the shim does not know")
            named = f" {label!r}" if isinstance(label, str) and label else ""
            findings.append(Finding(path, UNSUPPORTED, f"{ttype} tool{named} not available to the model: the caller loses {loses}"))
            continue
        tool_findings: list[Finding] = []
        draft = convert(path, tool, tool_findings)
        name = realtime_tool_name(draft.name, taken)
        valid = realtime_tool_name(draft.name, set())
        if valid != draft.name:
            tool_findings.insert(0, Finding(draft.name_path, APPROXIMATED,
                                            f"name {_show(draft.name, 70)} is not a valid Realtime tool name: the model sees {name!r}"))
        elif name != draft.name:
            tool_findings.insert(0, Finding(draft.name_path, APPROXIMATED,
                                            f"another tool is already named {draft.name!r}: the model sees {name!r}, the webhook still gets the original name"))
        taken.add(name)
        rt: dict = {"type": "function", "name": name}
        if draft.description is not None:
            rt["description"] = draft.description
        rt["parameters"] = draft.parameters
        out_tools.append(rt)
        bindings.append(ToolBinding(name, draft.kind, tool, path, draft.destinations))
        findings.extend(tool_findings)
    return out_tools, bindings, list(dict.fromkeys(findings))
