"""vapi-server-sdk 3.0.0 rejects some valid Vapi JSON (its pydantic models are stricter than the API on a few fields): the stand-ins validate a
rewritten copy. Kept free of SDK imports (the SDK takes seconds to import)."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pydantic

_SIP_VERBS = {"refer", "bye", "dial"}
_BACKOFF_TYPES = {"fixed", "exponential"}


def sdk_view(body: Any) -> Any:
    """A copy of ``body`` with the valid Vapi constructs that vapi-server-sdk 3.0.0 rejects
    (fields the API accepts but the SDK's models refuse) rewritten so that validation checks everything else:

    * ``transferPlan.sipVerb: "refer"|"bye"|"dial"`` (typed ``dict`` in the SDK) -> removed;
    * ``backoffPlan.type: "fixed"|"exponential"`` (typed ``dict`` and required) -> ``{}``;
    * JSON-schema property/items schemas without ``type`` (``{"anyOf": [...]}``) -> ``type`` added;
    * non-string ``enum`` values in those schemas -> JSON-encoded to strings.

    (The other listed false negatives — tool-call ``arguments`` as an object, ``ToolCallResult``
    without ``name`` — concern webhook bodies, which this fake does not serve.)"""
    out = copy.deepcopy(body)
    _fix(out)
    return out


def _fix(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _fix(item)
        return
    if not isinstance(node, dict):
        return
    plan = node.get("transferPlan")
    if isinstance(plan, dict) and plan.get("sipVerb") in _SIP_VERBS:
        del plan["sipVerb"]
    backoff = node.get("backoffPlan")
    if isinstance(backoff, dict) and backoff.get("type") in _BACKOFF_TYPES:
        backoff["type"] = {}
    props = node.get("properties")
    if isinstance(props, dict) and node.get("type") in ("object", None):
        for schema in props.values():
            _fix_schema(schema)
    if isinstance(node.get("items"), dict) and node.get("type") == "array":
        _fix_schema(node["items"])
    for value in node.values():
        _fix(value)


def _fix_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    if "type" not in schema:
        schema["type"] = "object" if "properties" in schema else "string"
    enum = schema.get("enum")
    if isinstance(enum, list):
        schema["enum"] = [e if isinstance(e, str) else json.dumps(e) for e in enum]


def summarize(exc: "pydantic.ValidationError", limit: int = 6) -> str:
    """The errors of the union members that match the body's discriminants (`provider`, `type`):
    pydantic reports every member of every union, which buries the real error."""
    errors = exc.errors()
    foreign = {tuple(e["loc"][:-1]) for e in errors
               if e["type"] == "literal_error" and e["loc"] and e["loc"][-1] in ("provider", "type")}
    relevant = [e for e in errors if not any(tuple(e["loc"][: len(f)]) == f for f in foreign)] or errors
    shown = [".".join(str(p) for p in e["loc"]) + f" ({e['msg']})" for e in relevant[:limit]]
    more = len(relevant) - len(shown)
    return "; ".join(shown) + (f"; … {more} more" if more > 0 else "")
