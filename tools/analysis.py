"""Vapi's post-call analysis (``assistant.analysisPlan``, https://docs.vapi.ai/assistants/call-analysis).

    analysis = await analyze(assistant.get("analysisPlan"), transcript, ended_reason="customer-ended-call",
                             client=http, base_url=OPENAI_BASE_URL, api_key=OPENAI_API_KEY,
                             model=SHIM_ANALYSIS_MODEL, system_prompt=instructions)
    # -> {"summary": str | None, "structuredData": Any | None, "successEvaluation": str | None}

Each part is one OpenAI Chat Completions request (``POST {base_url}/chat/completions``), run
concurrently, each under its own deadline (the part's ``timeoutSeconds``, else `timeout_s`). A part
that fails or times out is None and logged; `analyze` never raises (except when cancelled).

Defaults follow Vapi's spec (``AnalysisPlan`` and its sub-plans in Vapi's OpenAPI document, as
published in the generated SDKs' docstrings): summary on, success evaluation on with rubric
``PassFail``, structured data off, ``minMessagesThreshold`` 2. The default messages below are Vapi's
``@default`` messages, verbatim except that the spec's literal ``\\n`` after ``Rubric:`` / ``Json
Schema:`` (an escaping slip in the spec) is a real newline here. What Vapi substitutes for
``{{rubric}}`` is not documented; the shim uses the rubric's name and the spec's description of it.

Placeholders filled in every message (customer's or default): ``{{transcript}}``, ``{{endedReason}}``,
``{{systemPrompt}}``, ``{{schema}}`` (the structured-data JSON Schema), ``{{rubric}}``. Other Liquid
is left as written. Legacy flat fields (``summaryPrompt``, ``structuredDataPrompt``,
``structuredDataSchema``, ``successEvaluationPrompt``, ``successEvaluationRubric``) are honoured when
the corresponding plan is absent; an empty ``summaryPrompt`` / ``successEvaluationPrompt`` disables
that part (Vapi's documented way).

``minMessagesThreshold``: the transcript's non-empty lines are counted as messages ("AI: …" /
"User: …", one per line); fewer than the threshold ⇒ no analysis at all (every part None).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
import structlog

log = structlog.get_logger(__name__)

__all__ = ["DEFAULT_MESSAGES", "RUBRICS", "analyze", "count_messages"]

DEFAULT_MIN_MESSAGES = 2
_TIMEOUT_RANGE = (1.0, 60.0)
_PARTS = ("summary", "structuredData", "successEvaluation")

DEFAULT_MESSAGES: dict[str, list[dict[str, str]]] = {
    "summary": [
        {"role": "system", "content": (
            "You are an expert note-taker. You will be given a transcript of a call. Summarize the call in "
            "2-3 sentences. DO NOT return anything except the summary.")},
        {"role": "user", "content": (
            "Here is the transcript:\n\n{{transcript}}\n\n. Here is the ended reason of the call:\n\n"
            "{{endedReason}}\n\n")},
    ],
    "structuredData": [
        {"role": "system", "content": (
            "You are an expert data extractor. You will be given a transcript of a call. Extract structured "
            "data per the JSON Schema. DO NOT return anything except the structured data.\n\nJson Schema:\n"
            "{{schema}}\n\nOnly respond with the JSON.")},
        {"role": "user", "content": (
            "Here is the transcript:\n\n{{transcript}}\n\n. Here is the ended reason of the call:\n\n"
            "{{endedReason}}\n\n")},
    ],
    "successEvaluation": [
        {"role": "system", "content": (
            "You are an expert call evaluator. You will be given a transcript of a call and the system prompt "
            "of the AI participant. Determine if the call was successful based on the objectives inferred "
            "from the system prompt. DO NOT return anything except the result.\n\nRubric:\n{{rubric}}\n\n"
            "Only respond with the result.")},
        {"role": "user", "content": "Here is the transcript:\n\n{{transcript}}\n\n"},
        {"role": "user", "content": (
            "Here was the system prompt of the call:\n\n{{systemPrompt}}\n\n. Here is the ended reason of the "
            "call:\n\n{{endedReason}}\n\n")},
    ],
}

# SuccessEvaluationPlan.rubric (SPEC): name -> the spec's description (what {{rubric}} becomes).
RUBRICS: dict[str, str] = {
    "NumericScale": "A scale of 1 to 10.",
    "DescriptiveScale": "A scale of Excellent, Good, Fair, Poor.",
    "Checklist": "A checklist of criteria and their status.",
    "Matrix": "A grid that evaluates multiple criteria across different performance levels.",
    "PercentageScale": "A scale of 0% to 100%.",
    "LikertScale": "A scale of Strongly Agree, Agree, Neutral, Disagree, Strongly Disagree.",
    "AutomaticRubric": "Automatically break down evaluation into several criteria, each with its own score.",
    "PassFail": "A simple 'true' if call passed, 'false' if not.",
}
DEFAULT_RUBRIC = "PassFail"

_PLACEHOLDER = re.compile(r"\{\{\s*(transcript|endedReason|systemPrompt|schema|rubric)\s*\}\}")
_ROLES = frozenset({"system", "user", "assistant", "developer"})


def count_messages(transcript: str) -> int:
    """Messages in a Vapi-style transcript ("AI: …\\nUser: …\\n"): its non-empty lines."""
    return sum(1 for line in (transcript or "").splitlines() if line.strip())


class _PartFailed(Exception):
    """One analysis part could not produce a value (logged; the part is None)."""


def _sub_plan(plan: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = plan.get(key)
    return value if isinstance(value, Mapping) else None


def _fill(text: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)


def _messages(custom: Any, default: list[dict[str, str]], values: Mapping[str, str]) -> list[dict[str, str]]:
    source = default
    if isinstance(custom, list) and custom:
        usable = [m for m in custom if isinstance(m, Mapping) and m.get("role") in _ROLES
                  and isinstance(m.get("content"), str)]
        if usable:
            source = usable
    return [{"role": m["role"], "content": _fill(m["content"], values)} for m in source]


def _part_timeout(sub: Mapping[str, Any] | None, default: float) -> float:
    raw = sub.get("timeoutSeconds") if sub else None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != raw:
        return default
    return float(min(max(raw, _TIMEOUT_RANGE[0]), _TIMEOUT_RANGE[1]))


def _enabled(sub: Mapping[str, Any] | None, default: bool) -> bool:
    value = sub.get("enabled") if sub else None
    return value if isinstance(value, bool) else default


def _normalize_pass_fail(text: str) -> str | None:
    word = text.strip().strip("\"'`.!* ").lower()
    if word in ("true", "pass", "passed", "yes", "success", "successful"):
        return "true"
    if word in ("false", "fail", "failed", "no", "unsuccessful", "failure"):
        return "false"
    return None


async def _complete(client: httpx.AsyncClient, base_url: str, api_key: str, body: dict) -> str:
    url = base_url.rstrip("/") + "/chat/completions"
    response = await client.post(url, content=orjson.dumps(body), headers={
        "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    if response.status_code != 200:
        detail = ""
        try:
            err = response.json().get("error") or {}
            detail = str(err.get("message") or err.get("code") or "")[:200]
        except (ValueError, AttributeError):
            pass
        if api_key and api_key in detail:
            detail = detail.replace(api_key, "[redacted]")
        raise _PartFailed(f"HTTP {response.status_code}" + (f": {detail}" if detail else ""))
    try:
        data = response.json()
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _PartFailed("malformed chat completion") from None
    if message.get("refusal"):
        raise _PartFailed("the model refused")
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise _PartFailed("empty answer")
    return content


async def analyze(plan: dict | None, transcript: str, *, ended_reason: str, client: httpx.AsyncClient,
                  base_url: str, api_key: str, model: str, timeout_s: float = 10,
                  system_prompt: str | None = None) -> dict:
    """`analysisPlan` applied to `transcript`: {"summary", "structuredData", "successEvaluation"}.

    `system_prompt`: the assistant's rendered system prompt (Vapi's ``{{systemPrompt}}``; the default
    success evaluation infers the call's objectives from it)."""
    result: dict[str, Any] = dict.fromkeys(_PARTS)
    plan = plan if isinstance(plan, Mapping) else {}
    threshold = plan.get("minMessagesThreshold", DEFAULT_MIN_MESSAGES)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        threshold = DEFAULT_MIN_MESSAGES
    n = count_messages(transcript)
    if n == 0 or n < threshold:
        log.info("analysis.skipped", messages=n, min_messages=threshold)
        return result

    values = {"transcript": transcript, "endedReason": ended_reason or "", "systemPrompt": system_prompt or ""}
    jobs: dict[str, tuple[float, Any]] = {}

    # -- summary
    summary_plan = _sub_plan(plan, "summaryPlan")
    legacy_summary = plan.get("summaryPrompt") if summary_plan is None else None
    if _enabled(summary_plan, True) and legacy_summary != "":
        msgs = _messages(summary_plan.get("messages") if summary_plan else None, DEFAULT_MESSAGES["summary"], values)
        if isinstance(legacy_summary, str) and legacy_summary.strip():
            msgs[0] = {"role": "system", "content": _fill(legacy_summary, values)}

        async def summary(msgs=msgs) -> str | None:
            text = (await _complete(client, base_url, api_key, {"model": model, "messages": msgs})).strip()
            return text or None

        jobs["summary"] = (_part_timeout(summary_plan, timeout_s), summary)

    # -- structured data
    sd_plan = _sub_plan(plan, "structuredDataPlan")
    legacy_schema = plan.get("structuredDataSchema") if sd_plan is None else None
    legacy_sd_prompt = plan.get("structuredDataPrompt") if sd_plan is None else None
    sd_default_on = isinstance(legacy_schema, Mapping) or (
        isinstance(legacy_sd_prompt, str) and bool(legacy_sd_prompt.strip()))
    if _enabled(sd_plan, sd_default_on):
        schema = sd_plan.get("schema") if sd_plan else legacy_schema
        schema = schema if isinstance(schema, Mapping) and schema else None
        sd_values = {**values, "schema": orjson.dumps(schema).decode() if schema else ""}
        msgs = _messages(sd_plan.get("messages") if sd_plan else None, DEFAULT_MESSAGES["structuredData"], sd_values)
        if isinstance(legacy_sd_prompt, str) and legacy_sd_prompt.strip():
            msgs[0] = {"role": "system", "content": _fill(legacy_sd_prompt, sd_values)}
        body: dict[str, Any] = {"model": model, "messages": msgs}
        wrapped = False
        if schema is None:
            body["response_format"] = {"type": "json_object"}
        else:
            root = dict(schema)
            if root.get("type") != "object":  # OpenAI wants an object at the root
                root = {"type": "object", "properties": {"value": root}, "required": ["value"]}
                wrapped = True
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "structured_data", "schema": root, "strict": False}}

        async def structured(body=body, wrapped=wrapped) -> Any:
            text = await _complete(client, base_url, api_key, body)
            try:
                data = orjson.loads(_strip_fence(text))
            except orjson.JSONDecodeError:
                raise _PartFailed("the answer is not JSON") from None
            if wrapped:
                if not isinstance(data, dict) or "value" not in data:
                    raise _PartFailed("the answer lacks the wrapped 'value'")
                data = data["value"]
            return data

        jobs["structuredData"] = (_part_timeout(sd_plan, timeout_s), structured)

    # -- success evaluation
    se_plan = _sub_plan(plan, "successEvaluationPlan")
    legacy_se_prompt = plan.get("successEvaluationPrompt") if se_plan is None else None
    if _enabled(se_plan, True) and legacy_se_prompt != "":
        rubric = se_plan.get("rubric") if se_plan else plan.get("successEvaluationRubric")
        rubric = rubric if isinstance(rubric, str) and rubric in RUBRICS else DEFAULT_RUBRIC
        se_values = {**values, "rubric": f"{rubric}: {RUBRICS[rubric]}"}
        msgs = _messages(se_plan.get("messages") if se_plan else None, DEFAULT_MESSAGES["successEvaluation"],
                         se_values)
        if isinstance(legacy_se_prompt, str) and legacy_se_prompt.strip():
            msgs[0] = {"role": "system", "content": _fill(legacy_se_prompt, se_values)}

        async def success(msgs=msgs, rubric=rubric) -> str | None:
            text = (await _complete(client, base_url, api_key, {"model": model, "messages": msgs})).strip()
            if rubric == "PassFail":
                verdict = _normalize_pass_fail(text)
                if verdict is None:
                    raise _PartFailed("a PassFail answer that is neither true nor false")
                return verdict
            return text or None

        jobs["successEvaluation"] = (_part_timeout(se_plan, timeout_s), success)

    async def run(part: str, timeout: float, fn: Any) -> None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                result[part] = await fn()
            log.info("analysis.part_done", part=part, ms=int((time.monotonic() - t0) * 1000))
        except TimeoutError:
            log.warning("analysis.part_failed", part=part, error=f"timed out after {timeout:g} s")
        except _PartFailed as exc:
            log.warning("analysis.part_failed", part=part, error=str(exc))
        except (httpx.HTTPError, OSError) as exc:
            log.warning("analysis.part_failed", part=part, error=type(exc).__name__)
        except Exception as exc:  # never let analysis break the end-of-call report
            log.exception("analysis.part_error", part=part, error=type(exc).__name__)

    await asyncio.gather(*(run(part, t, fn) for part, (t, fn) in jobs.items()))
    return result


def _strip_fence(text: str) -> str:
    """Models sometimes wrap JSON in a Markdown code fence despite response_format."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t
