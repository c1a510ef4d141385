"""What a tool endpoint answered, read the way Vapi reads it (https://docs.vapi.ai/tools/custom-tools).

Pure: no I/O. `parse_tool_response` never raises: whatever came back (or didn't), every tool call
gets exactly one `ToolOutcome` whose `output` is what the model is given as the
`function_call_output`.

Wording given to the model:

* a result: the `result` string as sent (non-strings JSON-encoded compactly, i.e. on one line);
  an empty result -> `NO_RESULT`;
* an `error` (per result, or the top-level one): ``"Error: <error>"``;
* a non-2xx answer: ``"Error: the tool failed with HTTP status <code>."``;
* a timeout, a connection error, invalid JSON, no `results`, no result for this `toolCallId`, a
  result with neither `result` nor `error`: ``"No result returned."`` (Vapi's own wording,
  Vapi's documented response shape);
* an async tool (answered at once, the webhook's answer is not used): ``"Success."`` — the
  placeholder Vapi writes for platform-run tools (Vapi's text for async tools is unconfirmed).

Spoken messages (`tool_message`, `delayed_messages`, `pick_message`) follow Vapi's tool messages: `conditions`
are ANDed against the call's arguments; messages whose conditions all match are preferred over
unconditional ones of the same type; several candidates are variants (one picked at random by the
`rng` passed in); `contents` (per-language variants) override `content`; `content: ""` means
silence; an unknown message type counts as `request-failed`; async tools never get
request-start / request-response-delayed / request-failed. A missing request-start gives a random
`DEFAULT_FILLERS` entry, except for the platform built-ins (`endCall`, `transferCall`, `dtmf`),
which have their own speech.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_RESULT", "ASYNC_RESULT", "DEFAULT_FILLERS", "MESSAGE_KINDS", "ToolOutcome",
    "parse_tool_response", "async_outcome", "tool_message", "pick_message", "delayed_messages",
    "message_content", "conditions_match",
]

NO_RESULT = "No result returned."      # Vapi's wording when nothing usable came back
ASYNC_RESULT = "Success."               # what the model is told at once for an async tool
DEFAULT_FILLERS = ("Hold on a sec", "One moment", "Just a sec", "Give me a moment", "This'll just take a sec")
MESSAGE_KINDS = ("request-start", "request-response-delayed", "request-complete", "request-failed")
_BUILTINS_WITHOUT_FILLER = frozenset({"endCall", "transferCall", "dtmf"})


@dataclass(frozen=True)
class ToolOutcome:
    call_id: str
    status: str             # "ok" | "error" | "timeout" | "async"
    output: str             # the Realtime function_call_output
    result: str | None      # the endpoint's result (encoded to a string), when it gave one
    error: str | None       # what went wrong (the endpoint's error, or a description for logs)
    message: dict | None    # the result's `message` (request-complete / request-failed to speak instead)
    http_status: int | None


def _json_compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else _json_compact(value)


def _fail_all(call_ids: list[str], *, status: str, output: str, error: str, http_status: int | None) -> dict[str, ToolOutcome]:
    return {cid: ToolOutcome(cid, status, output, None, error, None, http_status) for cid in call_ids}


def parse_tool_response(call_ids: list[str], *, http_status: int | None, body: bytes | None,
                        timed_out: bool = False, transport_error: str | None = None) -> dict[str, ToolOutcome]:
    """One outcome per id in `call_ids`, from one HTTP exchange with a tool endpoint."""
    ids = list(dict.fromkeys(call_ids))
    if timed_out:
        return _fail_all(ids, status="timeout", output=NO_RESULT, error="the tool did not answer in time",
                         http_status=http_status)
    if transport_error is not None or http_status is None:
        detail = transport_error or "no response"
        return _fail_all(ids, status="error", output=NO_RESULT, error=f"could not reach the tool: {detail}",
                         http_status=http_status)
    if not 200 <= http_status < 300:
        return _fail_all(ids, status="error", output=f"Error: the tool failed with HTTP status {http_status}.",
                         error=f"HTTP {http_status}", http_status=http_status)
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return _fail_all(ids, status="error", output=NO_RESULT, error="the response is not valid JSON",
                         http_status=http_status)
    if not isinstance(data, dict):
        return _fail_all(ids, status="error", output=NO_RESULT, error="the response is not a JSON object",
                         http_status=http_status)

    top_error = data.get("error")
    if top_error is not None and top_error != "":
        text = _as_text(top_error)
        return _fail_all(ids, status="error", output=f"Error: {text}", error=text, http_status=http_status)

    results = data.get("results")
    if not isinstance(results, list):
        return _fail_all(ids, status="error", output=NO_RESULT, error="the response has no results",
                         http_status=http_status)

    by_id: dict[str, dict] = {}
    for item in results:
        if isinstance(item, dict) and isinstance(item.get("toolCallId"), str) and item["toolCallId"] not in by_id:
            by_id[item["toolCallId"]] = item

    out: dict[str, ToolOutcome] = {}
    for cid in ids:
        item = by_id.get(cid)
        if item is None:
            out[cid] = ToolOutcome(cid, "error", NO_RESULT, None, "no result for this toolCallId", None, http_status)
            continue
        message = item.get("message") if isinstance(item.get("message"), dict) else None
        error = item.get("error")
        result = item.get("result")
        if error is not None and error != "":
            text = _as_text(error)
            out[cid] = ToolOutcome(cid, "error", f"Error: {text}", None, text, message, http_status)
        elif result is not None:
            text = _as_text(result)
            out[cid] = ToolOutcome(cid, "ok", text if text else NO_RESULT, text, None, message, http_status)
        else:
            out[cid] = ToolOutcome(cid, "error", NO_RESULT, None, "the result has neither result nor error",
                                   message, http_status)
    return out


def async_outcome(call_id: str) -> ToolOutcome:
    """An async tool: the model is answered at once (`ASYNC_RESULT`); the webhook's answer is not used."""
    return ToolOutcome(call_id, "async", ASYNC_RESULT, None, None, None, None)


# --- spoken tool messages ------------------------------------------------------------------------


def _lookup(arguments: dict, param: str) -> tuple[bool, Any]:
    if param in arguments:
        return True, arguments[param]
    node: Any = arguments
    for part in param.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return _json_compact(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _condition_holds(condition: Any, arguments: dict) -> bool:
    if not isinstance(condition, dict):
        return False
    operator = condition.get("operator")
    param = condition.get("param")
    if not isinstance(param, str):
        return False
    found, actual = _lookup(arguments, param)
    expected = condition.get("value")
    if not found:
        return operator == "neq"
    a, b = _number(actual), _number(expected)
    if operator in ("eq", "neq"):
        same = a == b if a is not None and b is not None else _text(actual) == _text(expected)
        return same if operator == "eq" else not same
    if operator in ("gt", "gte", "lt", "lte"):
        if a is not None and b is not None:
            left, right = a, b
        else:
            left, right = _text(actual), _text(expected)
        return {"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[operator]
    return False


def conditions_match(message: dict, arguments: dict) -> bool:
    """All of the message's `conditions` hold for `arguments` (none -> True)."""
    conditions = message.get("conditions") or []
    return all(_condition_holds(c, arguments) for c in conditions)


def message_content(message: dict, language: str | None = None) -> str | None:
    """The text of a tool message: the `contents` variant for `language` (else the first one),
    which overrides `content`; None when the message has neither."""
    contents = [c for c in message.get("contents") or () if isinstance(c, dict) and isinstance(c.get("text"), str)]
    if contents:
        if language:
            lang = language.lower()
            for c in contents:
                if str(c.get("language", "")).lower() == lang:
                    return c["text"]
            for c in contents:
                if str(c.get("language", "")).lower().split("-")[0] == lang.split("-")[0]:
                    return c["text"]
        return contents[0]["text"]
    content = message.get("content")
    return content if isinstance(content, str) else None


def _of_kind(tool: dict, kind: str) -> list[dict]:
    out = []
    for m in tool.get("messages") or ():
        if not isinstance(m, dict):
            continue
        mtype = m.get("type")
        if mtype == kind or (kind == "request-failed" and mtype not in MESSAGE_KINDS):
            out.append(m)
    return out


def _matching(candidates: list[dict], arguments: dict) -> list[dict]:
    conditional = [m for m in candidates if m.get("conditions") and conditions_match(m, arguments)]
    if conditional:
        return conditional
    return [m for m in candidates if not m.get("conditions")]


def _is_async(tool: dict) -> bool:
    return tool.get("async") is True


def _stages(tool: dict, arguments: dict) -> dict[int, list[dict]]:
    """request-response-delayed candidates by timing (the conditional preference applies per stage)."""
    by_timing: dict[int, list[dict]] = {}
    for m in _of_kind(tool, "request-response-delayed"):
        by_timing.setdefault(_timing(m), []).append(m)
    stages = {}
    for timing, group in by_timing.items():
        matched = _matching(group, arguments)
        if matched:
            stages[timing] = matched
    return stages


def pick_message(tool: dict, kind: str, arguments: dict, *, rng: random.Random | None = None) -> dict | None:
    """The configured message of `kind` to use for this call (the whole message dict, so that
    `role`, `endCallAfterSpokenEnabled`, `blocking` can be read), or None when there is none
    (no default filler here). For request-response-delayed: the earliest stage."""
    if kind not in MESSAGE_KINDS:
        raise ValueError(f"unknown tool message kind {kind!r}")
    if _is_async(tool) and kind != "request-complete":
        return None
    if kind == "request-response-delayed":
        stages = _stages(tool, arguments)
        candidates = stages[min(stages)] if stages else []
    else:
        candidates = _matching(_of_kind(tool, kind), arguments)
    if not candidates:
        return None
    return (rng or random).choice(candidates)


def tool_message(tool: dict, kind: str, arguments: dict, *, rng: random.Random | None = None,
                 language: str | None = None) -> str | None:
    """What to say for `kind` ("request-start" | "request-response-delayed" | "request-complete" |
    "request-failed"), or None for silence / nothing configured. A missing request-start gives a
    random DEFAULT_FILLERS entry (`rng` makes the pick deterministic)."""
    rng = rng or random
    message = pick_message(tool, kind, arguments, rng=rng)
    if message is None:
        if kind == "request-start" and not _is_async(tool) and tool.get("type", "function") not in _BUILTINS_WITHOUT_FILLER:
            return rng.choice(DEFAULT_FILLERS)
        return None
    content = message_content(message, language)
    return content or None


def _timing(message: dict) -> int:
    value = message.get("timingMilliseconds")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)


def delayed_messages(tool: dict, arguments: dict, *, rng: random.Random | None = None,
                     language: str | None = None) -> list[tuple[int, str]]:
    """The staged request-response-delayed messages: one (timingMilliseconds, content) per distinct
    timing (variants at the same timing: one picked), sorted by timing; silent ones left out.
    Vapi keeps 2.5 s between delayed messages — the caller's scheduling concern."""
    if _is_async(tool):
        return []
    rng = rng or random
    stages = _stages(tool, arguments)
    out = []
    for timing in sorted(stages):
        content = message_content(rng.choice(stages[timing]), language)
        if content:
            out.append((timing, content))
    return out
