"""Vapi tools -> Realtime function tools (shim/tool_schema.py, shim/json_schema_subset.py): fixtures, every rule, and a property test.

Every output is validated against the openai SDK's GA types with no extra keys
(openai.types.realtime), and against the plain JSON-Schema subset the module documents. Every
hand-written *input* tool is validated against vapi-server-sdk where the SDK accepts it (the SDK
refuses a few valid shapes; those cases pass `sdk=False` with the reason).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.realtime import RealtimeClientEvent, RealtimeFunctionTool
from pydantic import Field, TypeAdapter
from vapi.core.serialization import convert_and_respect_annotation_metadata
from vapi.tools.types.get_tools_response import GetToolsResponse
from vapi.types import OpenAiModelToolsItem

from shim.testing.fake_realtime import find_extras
from shim.json_schema_subset import MAX_DEPTH, SAFE_FORMATS, Finding, ToolSchemaError, sanitize_schema
from shim.tool_kinds import KNOWN_TYPES, SUPPORTED
from shim.tool_schema import (
    DEFAULT_END_CALL_DESCRIPTION,
    ToolBinding,
    convert_tools,
    realtime_tool_name,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("VAPI_FIXTURES_DIR", Path(__file__).parent / "fixtures" / "vapi"))
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"Vapi fixtures not found at {FIXTURES}")

CLIENT = TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TYPES = {"string", "number", "integer", "boolean", "array", "object"}
SUBSET_KEYS = {"type", "description", "properties", "required", "items", "enum", "additionalProperties",
               "minimum", "maximum", "minItems", "maxItems", "pattern", "format"}
STATUSES = {"mapped", "approximated", "unsupported"}


# ------------------------------------------------------------------------------------------------
# helpers


def check_subset(node: Any, where: str = "parameters") -> None:
    """The plain JSON-Schema subset documented in shim/json_schema_subset.py, node by node."""
    assert isinstance(node, dict), where
    assert set(node) <= SUBSET_KEYS, (where, set(node) - SUBSET_KEYS)
    t = node["type"]
    assert t in TYPES, (where, t)
    if "description" in node:
        assert isinstance(node["description"], str), where
    if t == "object":
        props = node["properties"]
        assert isinstance(props, dict), where
        for name, sub in props.items():
            assert isinstance(name, str)
            check_subset(sub, f"{where}.{name}")
        if "required" in node:
            req = node["required"]
            assert req and len(req) == len(set(req)) and set(req) <= set(props), where
        if "additionalProperties" in node:
            assert isinstance(node["additionalProperties"], bool), where
    else:
        assert not {"properties", "required", "additionalProperties"} & set(node), where
    if t == "array":
        check_subset(node["items"], f"{where}[]")
        for k in ("minItems", "maxItems"):
            if k in node:
                assert isinstance(node[k], int) and not isinstance(node[k], bool) and node[k] >= 0, where
    else:
        assert not {"items", "minItems", "maxItems"} & set(node), where
    if t in ("number", "integer"):
        for k in ("minimum", "maximum"):
            if k in node:
                v = node[k]
                assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), where
    else:
        assert not {"minimum", "maximum"} & set(node), where
    if t == "string":
        if "pattern" in node:
            re.compile(node["pattern"])
        if "format" in node:
            assert node["format"] in SAFE_FORMATS, where
    else:
        assert not {"pattern", "format"} & set(node), where
    if "enum" in node:
        values = node["enum"]
        assert isinstance(values, list) and values, where
        ok = {
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "boolean": lambda v: isinstance(v, bool),
        }[t]
        assert all(ok(v) for v in values), (where, values)
        assert len({(type(v), v) for v in values}) == len(values), where


def assert_realtime_valid(tools: list[dict]) -> None:
    """Each tool is a RealtimeFunctionTool with no extras; together they make a valid session.update."""
    declared = set(RealtimeFunctionTool.model_fields)
    names = []
    for tool in tools:
        assert set(tool) <= declared, set(tool) - declared
        model = RealtimeFunctionTool.model_validate(tool)
        assert not model.model_extra
        assert tool["type"] == "function"
        assert NAME_RE.fullmatch(tool["name"]), tool["name"]
        assert "description" not in tool or isinstance(tool["description"], str)
        assert tool["parameters"]["type"] == "object"
        check_subset(tool["parameters"], tool["name"])
        names.append(tool["name"])
    assert len(names) == len(set(names)), names
    event = CLIENT.validate_python({"type": "session.update", "session": {"type": "realtime", "tools": tools}})
    assert find_extras(event) == []
    assert all(type(t) is RealtimeFunctionTool for t in event.session.tools or [])
    json.dumps(tools, allow_nan=False)  # strict JSON: no NaN/Infinity can reach the API


# What `vapi.core.pydantic_utilities.parse_obj_as` does, with the TypeAdapters built once: it builds
# a new one per call (~0.25 s for these big unions).
VAPI_ADAPTERS: dict[Any, TypeAdapter] = {}


def vapi_valid(tool: dict, saved: bool = False) -> None:
    """The input is valid Vapi JSON as far as vapi-server-sdk 3.0.0 can tell."""
    type_ = GetToolsResponse if saved else OpenAiModelToolsItem
    adapter = VAPI_ADAPTERS.get(type_) or VAPI_ADAPTERS.setdefault(type_, TypeAdapter(type_))
    adapter.validate_python(convert_and_respect_annotation_metadata(object_=tool, annotation=type_, direction="read"))


def fn_tool(name: str = "lookup", schema: Any = None, sdk: bool = True, **extra: Any) -> dict:
    function: dict = {"name": name, "description": f"Does {name}."}
    if schema is not None:
        function["parameters"] = schema
    tool = {"type": "function", "function": function, **extra}
    if sdk:
        vapi_valid(tool)
    return tool


def convert_one(tool: dict, path: str = "model.tools[0]") -> tuple[dict | None, ToolBinding | None, list[Finding]]:
    tools, bindings, findings = convert_tools([(path, tool)])
    assert_realtime_valid(tools)
    return (tools[0] if tools else None), (bindings[0] if bindings else None), findings


def obj(**props: Any) -> dict:
    return {"type": "object", "properties": props}


def san(prop: Any, *, sdk: bool = True) -> tuple[dict, list[Finding]]:
    """Sanitize `prop` as property `x` of a function's parameters; return the output property."""
    params = obj(x=prop)
    if sdk:
        vapi_valid(fn_tool("t", params, sdk=False))
    out, findings = sanitize_schema(params, "p")
    check_subset(out)
    return out["properties"]["x"], findings


def at(findings: list[Finding], path: str) -> list[Finding]:
    return [f for f in findings if f.path == path]


def statuses(findings: list[Finding], path: str) -> set[str]:
    return {f.status for f in at(findings, path)}


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# ------------------------------------------------------------------------------------------------
# fixtures


@needs_fixtures
def test_dental_fixture_tools():
    tools_in = load("dental_receptionist.assistant.json")["model"]["tools"]
    for t in tools_in:
        vapi_valid(t)
    pairs = [(f"model.tools[{i}]", t) for i, t in enumerate(tools_in)]
    before = copy.deepcopy(pairs)
    tools, bindings, findings = convert_tools(pairs)
    assert pairs == before  # input untouched
    assert_realtime_valid(tools)

    assert [t["name"] for t in tools] == ["check_availability", "book_appointment", "transfer_to_staff", "endCall"]
    assert [b.kind for b in bindings] == ["function", "function", "transferCall", "endCall"]
    assert [b.path for b in bindings] == [p for p, _ in pairs]
    assert all(b.vapi_tool is t for b, (_, t) in zip(bindings, pairs))

    check = tools[0]
    assert check["description"] == tools_in[0]["function"]["description"]
    assert check["parameters"] == tools_in[0]["function"]["parameters"]  # already in the subset: unchanged
    assert tools[1]["parameters"] == tools_in[1]["function"]["parameters"]

    transfer = tools[2]
    assert transfer["parameters"] == {
        "type": "object",
        "properties": {"destination": {"type": "string", "description": "Where to transfer the call.",
                                       "enum": ["+15125550199", "sip:oncall@pbx.brightside-dental.example"]}},
        "required": ["destination"],
    }
    assert transfer["description"].startswith("Transfer the caller to a human.")
    assert "- +15125550199: Front desk staff" in transfer["description"]
    assert "- sip:oncall@pbx.brightside-dental.example: On-call dentist" in transfer["description"]
    assert bindings[2].destinations == {
        "+15125550199": tools_in[2]["destinations"][0],
        "sip:oncall@pbx.brightside-dental.example": tools_in[2]["destinations"][1],
    }

    assert tools[3] == {"type": "function", "name": "endCall", "description": tools_in[3]["function"]["description"],
                        "parameters": {"type": "object", "properties": {}}}

    # everything in this export is reproducible: only "mapped" findings
    assert {f.status for f in findings} == {"mapped"}
    assert Finding("model.tools[0].messages", "mapped", "handled by the bridge") in findings
    assert Finding("model.tools[0].server", "mapped", "handled by the bridge") in findings
    assert Finding("model.tools[0].async", "mapped", "handled by the bridge") in findings
    assert Finding("model.tools[1].parameters", "mapped", "handled by the bridge") in findings
    assert statuses(findings, "model.tools[2].function.parameters") == {"mapped"}
    assert not [f for f in findings if f.path.startswith("model.tools[0].function")]


@needs_fixtures
def test_luna_saved_tools():
    saved = load("luna_trattoria.tools.json")
    for t in saved:
        vapi_valid(t, saved=True)
    assistant = load("luna_trattoria.assistant.json")
    by_id = {t["id"]: t for t in saved}
    pairs = [(f"model.toolIds[{i}]", by_id[tid]) for i, tid in enumerate(assistant["model"]["toolIds"])]
    tools, bindings, findings = convert_tools(pairs)
    assert_realtime_valid(tools)
    assert [t["name"] for t in tools] == ["check_table_availability", "create_reservation", "transferCall", "endCall"]
    assert [b.kind for b in bindings] == ["function", "function", "transferCall", "endCall"]

    avail = tools[0]["parameters"]["properties"]
    assert avail["time"]["pattern"] == "^([01][0-9]|2[0-3]):[0-5][0-9]$"
    assert avail["date"]["format"] == "date"
    assert avail["partySize"] == {"type": "integer", "description": "Number of guests (1-8)."}
    assert tools[0]["parameters"]["required"] == ["date", "time", "partySize"]

    assert tools[2]["parameters"]["properties"]["destination"]["enum"] == ["+12075550142"]
    assert tools[2]["description"].endswith("Destinations:\n- +12075550142: Events manager")
    assert bindings[2].destinations == {"+12075550142": by_id["5f6e7d8c-9b0a-4c1d-8e2f-3a4b5c6d7e8f"]["destinations"][0]}

    # a saved endCall without `function`: Vapi's default shape
    assert tools[3] == {"type": "function", "name": "endCall", "description": DEFAULT_END_CALL_DESCRIPTION,
                        "parameters": {"type": "object", "properties": {}}}
    assert {f.status for f in findings} == {"mapped"}
    assert Finding("model.toolIds[1].server", "mapped", "handled by the bridge") in findings
    assert Finding("model.toolIds[2].messages", "mapped", "handled by the bridge") in findings  # request-start ""


@needs_fixtures
def test_merged_fixture_tools_get_unique_names():
    """inline tools then resolved toolIds (Vapi's merge order): the second endCall is renamed."""
    inline = load("dental_receptionist.assistant.json")["model"]["tools"]
    saved = load("luna_trattoria.tools.json")
    pairs = [(f"model.tools[{i}]", t) for i, t in enumerate(inline)] + [(f"model.toolIds[{i}]", t) for i, t in enumerate(saved)]
    tools, bindings, findings = convert_tools(pairs)
    assert_realtime_valid(tools)
    assert [t["name"] for t in tools][-1] == "endCall_2"
    assert bindings[-1].realtime_name == "endCall_2" and bindings[-1].path == "model.toolIds[3]"
    (renamed,) = at(findings, "model.toolIds[3].function.name")
    assert renamed.status == "approximated" and "endCall_2" in renamed.detail


@needs_fixtures
def test_minimal_fixture_has_no_tools():
    assert "tools" not in load("minimal.assistant.json")["model"]
    assert convert_tools([]) == ([], [], [])


# ------------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(("name", "taken", "expected"), [
    ("lookup", set(), "lookup"),
    ("look-up_2", set(), "look-up_2"),
    ("héllo wörld", set(), "hello_world"),
    ("get order status!", set(), "get_order_status"),
    ("", set(), "tool"),
    ("名前", set(), "tool"),
    ("a" * 70, set(), "a" * 64),
    ("ends\n", set(), "ends"),  # `$` would accept a trailing newline; fullmatch does not
    ("lookup", {"lookup"}, "lookup_2"),
    ("lookup", {"lookup", "lookup_2"}, "lookup_3"),
    ("a" * 64, {"a" * 64}, "a" * 62 + "_2"),
])
def test_realtime_tool_name(name, taken, expected):
    snapshot = set(taken)
    got = realtime_tool_name(name, taken)
    assert got == expected
    assert NAME_RE.fullmatch(got) and got not in taken
    assert taken == snapshot  # not modified


def test_invalid_and_duplicate_names_are_reported():
    tools, bindings, findings = convert_tools([
        ("model.tools[0]", fn_tool("check status")),
        ("model.tools[1]", fn_tool("check_status")),
        ("model.tools[2]", fn_tool("x" * 65)),
    ])
    assert_realtime_valid(tools)
    assert [t["name"] for t in tools] == ["check_status", "check_status_2", "x" * 64]
    assert [b.vapi_tool["function"]["name"] for b in bindings] == ["check status", "check_status", "x" * 65]
    (f0,) = at(findings, "model.tools[0].function.name")
    assert f0.status == "approximated" and "not a valid Realtime tool name" in f0.detail
    (f1,) = at(findings, "model.tools[1].function.name")
    assert f1.status == "approximated" and "already named 'check_status'" in f1.detail
    assert statuses(findings, "model.tools[2].function.name") == {"approximated"}


# ------------------------------------------------------------------------------------------------
# function tools


def test_function_description_kept_or_omitted_and_missing_parameters():
    tool = {"type": "function", "function": {"name": "ping"}}
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert out == {"type": "function", "name": "ping", "parameters": {"type": "object", "properties": {}}}
    assert binding == ToolBinding("ping", "function", tool, "model.tools[0]")
    assert findings == []
    out, _, _ = convert_one(fn_tool("ping", obj(a={"type": "string"})))
    assert out["description"] == "Does ping."


def test_function_strict_and_non_llm_keys():
    tool = fn_tool(
        "book", obj(a={"type": "string"}),
        **{"async": True, "server": {"url": "https://x.example/t"}, "messages": [{"type": "request-start", "content": "One sec."}],
           "parameters": [{"key": "clinic", "value": "c1"}],
           "variableExtractionPlan": {"aliases": [{"key": "bookingId", "value": "{{$.id}}"}]},
           "rejectionPlan": {"conditions": [{"type": "regex", "regex": "\\?", "target": {"role": "user", "position": -1}}]}},
    )
    tool["function"]["strict"] = True
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert set(out) == {"type", "name", "description", "parameters"}  # no strict, async, server, messages…
    assert binding.vapi_tool is tool
    for key in ("async", "server", "messages", "parameters"):
        assert Finding(f"model.tools[0].{key}", "mapped", "handled by the bridge") in findings
    assert statuses(findings, "model.tools[0].rejectionPlan") == {"unsupported"}
    assert statuses(findings, "model.tools[0].variableExtractionPlan") == {"unsupported"}
    assert statuses(findings, "model.tools[0].function.strict") == {"approximated"}
    tool["function"]["strict"] = False
    _, _, findings = convert_one(tool)
    assert statuses(findings, "model.tools[0].function.strict") == {"mapped"}


# ------------------------------------------------------------------------------------------------
# schema: $ref


def test_ref_inlined_from_defs_definitions_and_pointers():
    params = {
        "type": "object",
        "$defs": {"Date": {"type": "string", "format": "date", "description": "A day."}},
        "definitions": {"a/b": {"type": "integer"}},
        "properties": {
            "day": {"$ref": "#/$defs/Date"},
            "n": {"$ref": "#/definitions/a~1b", "description": "How many."},
            "again": {"$ref": "#/properties/day"},
        },
    }
    # the SDK requires `type` on every property schema (an SDK false negative: the API accepts it)
    out, findings = sanitize_schema(params, "p")
    check_subset(out)
    assert out["properties"] == {
        "day": {"type": "string", "description": "A day.", "format": "date"},
        "n": {"type": "integer", "description": "How many."},
        "again": {"type": "string", "description": "A day.", "format": "date"},
    }
    assert statuses(findings, "p.properties.day.$ref") == {"mapped"}
    assert statuses(findings, "p.$defs") == {"mapped"} and statuses(findings, "p.definitions") == {"mapped"}


def test_ref_cycle_is_cut():
    params = {
        "type": "object",
        "$defs": {"Node": {"type": "object", "properties": {
            "name": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
        }}},
        "properties": {"tree": {"$ref": "#/$defs/Node"}, "self": {"$ref": "#"}},
    }
    out, findings = sanitize_schema(params, "p")
    check_subset(out)
    tree = out["properties"]["tree"]
    assert tree["properties"]["name"] == {"type": "string"}
    cut = tree["properties"]["children"]["items"]
    assert cut["type"] == "object" and cut["properties"] == {} and "not expanded" in cut["description"]
    (f,) = at(findings, "p.properties.tree.properties.children.items.$ref")
    assert f.status == "approximated" and "recursive" in f.detail
    assert out["properties"]["self"]["type"] == "object"  # "#" is the root: cut at once
    assert statuses(findings, "p.properties.self.$ref") == {"approximated"}


def test_unresolvable_and_external_refs():
    x, findings = san({"$ref": "#/$defs/Nope"}, sdk=False)  # no `type`: SDK false negative
    assert x == {"type": "string"}
    assert statuses(findings, "p.properties.x.$ref") == {"unsupported"}
    x, findings = san({"$ref": "https://example.com/schema.json", "type": "integer"})
    assert x == {"type": "integer"}
    assert statuses(findings, "p.properties.x.$ref") == {"unsupported"}


# ------------------------------------------------------------------------------------------------
# schema: type arrays and unions


def test_type_array_nullable():
    x, findings = san({"type": ["string", "null"], "description": "Middle name."})
    assert x == {"type": "string", "description": "Middle name. (may be null)"}
    assert statuses(findings, "p.properties.x.type") == {"approximated"}


def test_type_array_object_or_null_keeps_properties():
    x, _ = san({"type": ["object", "null"], "properties": {"a": {"type": "string"}}, "required": ["a"]})
    assert x == {"type": "object", "description": "May be null", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def test_type_array_mixed_scalars_and_numbers():
    x, findings = san({"type": ["string", "integer"]})
    assert x["type"] == "string" and x["description"].startswith("One of: string | integer")
    assert statuses(findings, "p.properties.x.type") == {"approximated"}
    x, _ = san({"type": ["integer", "number"]})
    assert x == {"type": "number"}


def test_any_of_null_and_one_type():
    # a bare anyOf has no `type`: SDK false negative
    x, findings = san({"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}], "description": "Email."}, sdk=False)
    assert x == {"type": "string", "description": "Email. (may be null)", "format": "email"}
    (f,) = at(findings, "p.properties.x.anyOf")
    assert f.status == "approximated"


def test_single_branch_one_of_unwrapped():
    x, findings = san({"oneOf": [{"type": "integer", "minimum": 1}]}, sdk=False)
    assert x == {"type": "integer", "minimum": 1}
    assert statuses(findings, "p.properties.x.oneOf") == {"mapped"}


def test_one_of_objects_merged_required_intersection():
    contact = {
        "type": "object",  # Pinecrest-style: the union sits on a typed node, which the SDK accepts
        "description": "How to reach the claimant.",
        "oneOf": [
            {"type": "object", "properties": {"method": {"type": "string", "enum": ["phone"]}, "phone": {"type": "string"}},
             "required": ["method", "phone"]},
            {"type": "object", "properties": {"method": {"type": "string", "enum": ["email"]}, "email": {"type": "string", "format": "email"}},
             "required": ["method", "email"]},
        ],
    }
    x, findings = san(contact)
    assert x["type"] == "object"
    assert x["properties"] == {
        "method": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string", "format": "email"},
    }
    assert x["required"] == ["method"]
    assert x["description"].startswith("How to reach the claimant. (one of: object with method, phone | object with method, email")
    (f,) = at(findings, "p.properties.x.oneOf")
    assert f.status == "approximated" and "required" in f.detail


def test_pinecrest_style_nested_unions():
    """A real-world export shape: unions on typed nodes, nested arrays, nullable, pattern."""
    params = {"type": "object", "required": ["policyNumber", "contact", "location"], "properties": {
        "policyNumber": {"type": "string", "pattern": "^PM-[0-9]{6}$"},
        "incidentDate": {"type": "string", "format": "date"},
        "contact": {"type": "object", "description": "How to reach the claimant.", "oneOf": [
            {"type": "object", "properties": {"phone": {"type": "string"}}, "required": ["phone"]},
            {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}, "required": ["email"]}]},
        "location": {"type": "object", "anyOf": [
            {"type": "object", "title": "Street address", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
             "required": ["street", "city"]},
            {"type": "object", "title": "Highway landmark", "properties": {"highway": {"type": "string"}, "mileMarker": {"type": "number"}},
             "required": ["highway"]}]},
        "vehicles": {"type": "array", "items": {"type": "object", "required": ["driver"], "properties": {
            "plate": {"type": ["string", "null"]},
            "driver": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}},
    }}
    out, binding, findings = convert_one(fn_tool("report_incident", params))
    p = out["parameters"]
    assert p["required"] == ["policyNumber", "contact", "location"]
    assert p["properties"]["policyNumber"] == {"type": "string", "pattern": "^PM-[0-9]{6}$"}
    assert set(p["properties"]["contact"]["properties"]) == {"phone", "email"} and "required" not in p["properties"]["contact"]
    location = p["properties"]["location"]
    assert set(location["properties"]) == {"street", "city", "highway", "mileMarker"} and "required" not in location
    assert "Street address" in location["description"] and "Highway landmark" in location["description"]
    vehicle = p["properties"]["vehicles"]["items"]
    assert vehicle["required"] == ["driver"] and vehicle["properties"]["plate"] == {"type": "string", "description": "May be null"}
    base = "model.tools[0].function.parameters.properties"
    assert {(f.path, f.status) for f in findings} == {
        (f"{base}.contact.oneOf", "approximated"),
        (f"{base}.location.anyOf", "approximated"),
        (f"{base}.vehicles.items.properties.plate.type", "approximated"),
    }


def test_any_of_mixed_object_and_scalar_on_an_object_node_keeps_the_object():
    when = {"type": "object", "properties": {"date": {"type": "string"}},
            "anyOf": [{"type": "object", "properties": {"time": {"type": "string"}}}, {"type": "string"}]}
    x, findings = san(when)
    assert x["type"] == "object" and set(x["properties"]) == {"date", "time"}
    assert "dropped" in at(findings, "p.properties.x.anyOf")[0].detail


def test_any_of_mixed_scalars_becomes_described_string():
    when = {"anyOf": [{"type": "string", "format": "date", "description": "a day"},
                      {"type": "integer", "description": "days from now"}]}
    x, findings = san(when, sdk=False)
    assert x == {"type": "string", "description": "One of: string (format date): a day | integer: days from now"}
    (f,) = at(findings, "p.properties.x.anyOf")
    assert f.status == "approximated" and "string" in f.detail


def test_one_of_consts_becomes_enum():
    x, _ = san({"type": "string", "oneOf": [{"const": "a", "description": "Apple"}, {"const": "b", "description": "Banana"}]})
    assert x["type"] == "string" and x["enum"] == ["a", "b"]
    assert "Apple" in x["description"] and "Banana" in x["description"]


def test_any_of_arrays_unions_items():
    x, _ = san({"type": "array", "items": {"type": "string"},
                "anyOf": [{"type": "array", "items": {"type": "string", "enum": ["a"]}},
                          {"type": "array", "items": {"type": "string", "enum": ["b"]}}]})
    assert x["type"] == "array" and x["items"]["type"] == "string"


def test_all_of_merged():
    x, findings = san({"allOf": [
        {"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}, "required": ["a"]},
        {"properties": {"a": {"type": "integer", "minimum": 5, "maximum": 9}, "b": {"type": "boolean"}}, "required": ["b"]},
    ]}, sdk=False)
    assert x == {"type": "object",
                 "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 9}, "b": {"type": "boolean"}},
                 "required": ["a", "b"]}
    assert statuses(findings, "p.properties.x.allOf") == {"mapped"}
    x, findings = san({"type": "string", "allOf": [{"enum": ["a", "b", "c"]}, {"enum": ["b", "c", "d"]}]})
    assert x == {"type": "string", "enum": ["b", "c"]}


def test_all_of_conflicting_types_keep_first_with_finding():
    x, findings = san({"type": "string", "allOf": [{"type": "boolean"}]})
    assert x == {"type": "string"}
    assert statuses(findings, "p.properties.x.type") == {"approximated"}


# ------------------------------------------------------------------------------------------------
# schema: keywords


def test_formats_safe_kept_others_described():
    for fmt in sorted(SAFE_FORMATS):
        x, findings = san({"type": "string", "format": fmt})
        assert x == {"type": "string", "format": fmt} and findings == []
    x, findings = san({"type": "string", "format": "uri", "description": "Link."})
    assert x == {"type": "string", "description": "Link. (format: uri)"}
    assert statuses(findings, "p.properties.x.format") == {"approximated"}


def test_const_is_single_value_enum():
    x, findings = san({"type": "string", "const": "yes"})
    assert x == {"type": "string", "enum": ["yes"]}
    assert statuses(findings, "p.properties.x.const") == {"mapped"}
    x, _ = san({"const": 3}, sdk=False)
    assert x == {"type": "integer", "enum": [3]}


def test_enums_numeric_allowed_mismatches_dropped_or_stringified():
    x, findings = san({"type": "integer", "enum": [1, 2, 2.0, 3]}, sdk=False)  # numeric enum: SDK false negative
    assert x == {"type": "integer", "enum": [1, 2, 3]} and findings == []
    x, _ = san({"type": "number", "enum": [1.5, 2]}, sdk=False)
    assert x == {"type": "number", "enum": [1.5, 2]}
    x, _ = san({"type": "boolean", "enum": [True]}, sdk=False)
    assert x == {"type": "boolean", "enum": [True]}
    x, findings = san({"type": "integer", "enum": [1, "two", True]}, sdk=False)
    assert x == {"type": "integer", "enum": [1]}
    assert statuses(findings, "p.properties.x.enum") == {"unsupported"}
    x, findings = san({"type": "string", "enum": ["a", 1, True, None]}, sdk=False)
    assert x == {"type": "string", "description": "May be null", "enum": ["a", "1", "true"]}
    assert statuses(findings, "p.properties.x.enum") == {"approximated"}
    x, findings = san({"type": "object", "enum": [{"a": 1}]}, sdk=False)
    assert x == {"type": "object", "properties": {}}


def test_annotations_and_unknown_keywords():
    x, findings = san({"type": "string", "title": "Name", "default": "Bob", "examples": ["Ann", "Cy", "Di"],
                       "x-internal": True, "$comment": "hi", "not": {"const": "x"}, "minLength": 2, "maxLength": 40})
    assert x == {"type": "string",
                 "description": 'Name (at least 2 characters; at most 40 characters; default: "Bob"; e.g. "Ann", "Cy")'}
    assert statuses(findings, "p.properties.x.title") == {"mapped"}
    assert statuses(findings, "p.properties.x.default") == {"approximated"}
    assert statuses(findings, "p.properties.x.x-internal") == {"mapped"}
    assert statuses(findings, "p.properties.x.$comment") == {"mapped"}
    assert statuses(findings, "p.properties.x.not") == {"unsupported"}
    assert statuses(findings, "p.properties.x.minLength") == {"approximated"}


def test_numeric_bounds_and_array_bounds():
    x, _ = san({"type": "integer", "minimum": 1, "maximum": 8, "exclusiveMaximum": 9, "multipleOf": 2})
    assert x == {"type": "integer", "description": "Less than 9; a multiple of 2", "minimum": 1, "maximum": 8}
    x, findings = san({"type": "integer", "minimum": "1"}, sdk=False)
    assert x == {"type": "integer"} and statuses(findings, "p.properties.x.minimum") == {"unsupported"}
    x, _ = san({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3, "uniqueItems": True})
    assert x == {"type": "array", "description": "Items must be unique", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}


def test_pattern_that_does_not_compile_is_described():
    x, findings = san({"type": "string", "pattern": "(unclosed"})
    assert x == {"type": "string", "description": "Pattern: (unclosed"}
    assert statuses(findings, "p.properties.x.pattern") == {"approximated"}


def test_missing_type_inferred():
    cases = [
        ({"properties": {"a": {"type": "string"}}}, "object"),
        ({"items": {"type": "integer"}}, "array"),
        ({"enum": ["a", "b"]}, "string"),
        ({"enum": [1, 2]}, "integer"),
        ({"enum": [True, False]}, "boolean"),
        ({"minimum": 0.5}, "number"),
        ({"description": "anything"}, "string"),
        ({}, "string"),
    ]
    for schema, expected in cases:
        x, findings = san(schema, sdk=False)  # no `type`: SDK false negative
        assert x["type"] == expected, schema
        assert statuses(findings, "p.properties.x.type") == ({"approximated"} if expected == "string" and "enum" not in schema else {"mapped"})


def test_arrays_without_items_and_tuple_items():
    x, findings = san({"type": "array"})
    assert x == {"type": "array", "items": {"type": "string"}}
    assert statuses(findings, "p.properties.x.items") == {"approximated"}
    x, _ = san({"type": "array", "items": [{"type": "integer"}, {"type": "number"}]}, sdk=False)
    assert x == {"type": "array", "items": {"type": "number"}}
    x, _ = san({"type": "array", "prefixItems": [{"type": "string"}]})
    assert x == {"type": "array", "items": {"type": "string"}}


def test_required_entries_naming_no_property_are_dropped():
    out, findings = sanitize_schema({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b", "a", 3]}, "p")
    assert out["required"] == ["a"]
    assert statuses(findings, "p.required") == {"mapped"}


def test_additional_properties():
    out, _ = sanitize_schema({"type": "object", "properties": {}, "additionalProperties": False}, "p")
    assert out == {"type": "object", "properties": {}, "additionalProperties": False}
    out, findings = sanitize_schema({"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}, "p")
    assert out == {"type": "object", "properties": {}}
    assert statuses(findings, "p.additionalProperties") == {"approximated"}


def test_top_level_is_always_an_object():
    out, findings = sanitize_schema({"type": "string", "description": "A note."}, "p")
    assert out == {"type": "object", "properties": {"value": {"type": "string", "description": "A note."}}, "required": ["value"]}
    assert statuses(findings, "p") == {"approximated"}
    out, _ = sanitize_schema({"properties": {"a": {"type": "string"}}}, "p")
    assert out["type"] == "object"
    assert sanitize_schema(None, "p") == ({"type": "object", "properties": {}}, [])
    assert sanitize_schema(True, "p") == ({"type": "object", "properties": {}}, [])
    out, findings = sanitize_schema(False, "p")
    assert out == {"type": "object", "properties": {}} and findings[0].status == "unsupported"
    out, _ = sanitize_schema({"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "null"}]}, "p")
    assert out["type"] == "object" and "a" in out["properties"]


def test_property_paths_quote_odd_names():
    _, findings = sanitize_schema({"type": "object", "properties": {"a b": {"type": "string", "format": "uri"}}}, "p")
    assert findings[0].path == 'p.properties["a b"].format'


def test_deep_and_huge_schemas_are_cut_not_raised():
    deep: dict = {"type": "string"}
    for _ in range(MAX_DEPTH + 5):
        deep = obj(a=deep)
    out, findings = sanitize_schema(deep, "p")
    check_subset(out)
    assert any(f.status == "unsupported" and "deeper" in f.detail for f in findings)
    # a $ref DAG that doubles at every level: 2**30 nodes if inlined naively
    defs = {f"D{i}": {"type": "object", "properties": {"l": {"$ref": f"#/$defs/D{i + 1}"}, "r": {"$ref": f"#/$defs/D{i + 1}"}}}
            for i in range(30)}
    defs["D30"] = {"type": "string"}
    out, findings = sanitize_schema({"type": "object", "$defs": defs, "properties": {"x": {"$ref": "#/$defs/D0"}}}, "p")
    check_subset(out)
    assert any(f.status == "unsupported" for f in findings)


def test_sanitize_does_not_mutate_input():
    schema = {"type": "object", "$defs": {"A": {"type": ["string", "null"]}},
              "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"allOf": [{"type": "object", "properties": {"c": {"const": 1}}}]}}}
    before = copy.deepcopy(schema)
    sanitize_schema(schema, "p")
    assert schema == before


# ------------------------------------------------------------------------------------------------
# built-in tools


def test_end_call():
    tool = {"type": "endCall", "messages": [{"type": "request-start", "content": "Goodbye!"}]}
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert out == {"type": "function", "name": "endCall", "description": "Use this function to end the call.",
                   "parameters": {"type": "object", "properties": {}}}
    assert binding.kind == "endCall"
    assert findings == [Finding("model.tools[0].messages", "mapped", "handled by the bridge")]
    legacy = {"type": "endCall", "function": {"name": "hang_up", "description": "Hang up politely."}}
    vapi_valid(legacy)  # `function` is an extra key for the SDK, but accepted
    out, _, _ = convert_one(legacy)
    assert out["name"] == "hang_up" and out["description"] == "Hang up politely."


def test_dtmf():
    tool = {"type": "dtmf", "sipInfoDtmfEnabled": True}
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert out["name"] == "dtmf" and binding.kind == "dtmf"
    assert out["parameters"]["required"] == ["keys"]
    keys = out["parameters"]["properties"]["keys"]
    assert keys["type"] == "string" and re.fullmatch(keys["pattern"], "1w2W#*0") and not re.fullmatch(keys["pattern"], "1a")
    assert statuses(findings, "model.tools[0]") == {"approximated"}
    assert statuses(findings, "model.tools[0].sipInfoDtmfEnabled") == {"unsupported"}
    out, _, _ = convert_one({"type": "dtmf", "function": {"name": "press_keys"}})
    assert out["name"] == "press_keys"


def test_transfer_call_destinations():
    tool = {
        "type": "transferCall",
        "destinations": [
            {"type": "number", "number": "+15550001111", "description": "Billing team"},
            {"type": "sip", "sipUri": "sip:desk@pbx.example"},
            {"type": "assistant", "assistantName": "Sales bot"},
            {"type": "number", "number": "+15550001111", "extension": "12"},
        ],
    }
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert out["name"] == "transferCall"
    assert out["parameters"]["properties"]["destination"]["enum"] == ["+15550001111", "sip:desk@pbx.example"]
    assert out["parameters"]["required"] == ["destination"]
    assert out["description"].endswith("Destinations:\n- +15550001111: Billing team")
    assert binding.destinations == {"+15550001111": tool["destinations"][0], "sip:desk@pbx.example": tool["destinations"][1]}
    assert statuses(findings, "model.tools[0].destinations[2]") == {"unsupported"}
    assert statuses(findings, "model.tools[0].destinations[3]") == {"approximated"}


def test_transfer_call_destination_without_value_is_dropped():
    # a number destination without `number` fails the SDK (it is required there); Vapi drops it from the enum
    tool = {"type": "transferCall", "destinations": [{"type": "number", "description": "nobody"},
                                                    {"type": "sip", "sipUri": "sip:a@b.example"}]}
    out, binding, findings = convert_one(tool)
    assert out["parameters"]["properties"]["destination"]["enum"] == ["sip:a@b.example"]
    assert statuses(findings, "model.tools[0].destinations[0].number") == {"mapped"}


def test_transfer_call_without_destinations():
    tool = {"type": "transferCall", "function": {"name": "transfer", "description": "Send to a human."}}
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert out["name"] == "transfer" and out["description"] == "Send to a human."
    dest = out["parameters"]["properties"]["destination"]
    assert dest["type"] == "string" and "enum" not in dest and "required" not in out["parameters"]
    assert binding.destinations == {}
    (f,) = at(findings, "model.tools[0].destinations")
    assert f.status == "approximated" and "transfer-destination-request" in f.detail


def test_transfer_call_function_parameters_that_disagree_with_destinations():
    tool = {"type": "transferCall",
            "function": {"name": "transferCall", "parameters": obj(destination={"type": "string", "enum": ["+15550009999"]})},
            "destinations": [{"type": "number", "number": "+15550001111"}]}
    vapi_valid(tool)
    out, _, findings = convert_one(tool)
    assert out["parameters"]["properties"]["destination"]["enum"] == ["+15550001111"]
    assert statuses(findings, "model.tools[0].function.parameters") == {"approximated"}


def test_api_request():
    tool = {"type": "apiRequest", "method": "GET", "url": "https://api.example/orders/{{orderNumber}}", "name": "get_order",
            "description": "Look up an order.", "credentialId": "cred_1", "timeoutSeconds": 10,
            "headers": {"type": "object", "properties": {"X-Key": {"type": "string", "value": "k"}}},
            "body": {"type": "object", "properties": {"orderNumber": {"type": "string", "pattern": "^[0-9]+$"},
                                                      "email": {"type": "string", "format": "idn-email"}},
                     "required": ["orderNumber"]}}
    vapi_valid(tool)
    out, binding, findings = convert_one(tool)
    assert out == {"type": "function", "name": "get_order", "description": "Look up an order.",
                   "parameters": {"type": "object",
                                  "properties": {"orderNumber": {"type": "string", "pattern": "^[0-9]+$"},
                                                 "email": {"type": "string", "description": "Format: idn-email"}},
                                  "required": ["orderNumber"]}}
    assert binding.kind == "apiRequest"
    assert statuses(findings, "model.tools[0].url") == {"mapped"}
    assert statuses(findings, "model.tools[0].headers") == {"mapped"}
    assert statuses(findings, "model.tools[0].credentialId") == {"approximated"}
    assert statuses(findings, "model.tools[0].body.properties.email.format") == {"approximated"}
    bare = {"type": "apiRequest", "method": "POST", "url": "https://api.example/ping"}
    vapi_valid(bare)
    out, _, _ = convert_one(bare)
    assert out == {"type": "function", "name": "apiRequest", "parameters": {"type": "object", "properties": {}}}


UNSUPPORTED_INPUTS = [
    ({"type": "query", "knowledgeBases": [{"name": "menu", "provider": "google", "description": "The menu", "fileIds": ["f1"]}]}, True),
    ({"type": "sms"}, True),
    ({"type": "voicemail"}, True),
    ({"type": "handoff"}, True),
    ({"type": "mcp", "server": {"url": "https://mcp.example"}}, True),
    ({"type": "code", "code": "return 1"}, True),
    ({"type": "sipRequest", "verb": "INFO"}, True),
    ({"type": "google.calendar.event.create"}, True),
    ({"type": "google.sheets.row.append"}, True),
    ({"type": "slack.message.send"}, True),
    ({"type": "gohighlevel.contact.get"}, True),
    ({"type": "bash", "subType": "bash_20241022", "name": "bash"}, True),
    ({"type": "computer", "subType": "computer_20241022", "name": "computer", "displayWidthPx": 1024, "displayHeightPx": 768}, True),
    ({"type": "textEditor", "subType": "text_editor_20241022", "name": "str_replace_editor"}, True),
    # not members of the SDK's inline tools union (legacy / saved-only types): not validated
    ({"type": "make", "metadata": {"scenarioId": 1}}, False),
    ({"type": "ghl"}, False),
    ({"type": "output"}, False),
    ({"type": "somethingNew"}, False),
]


@pytest.mark.parametrize(("tool", "sdk"), UNSUPPORTED_INPUTS, ids=[t["type"] for t, _ in UNSUPPORTED_INPUTS])
def test_unsupported_tool_types(tool, sdk):
    if sdk:
        vapi_valid(tool)
    tools, bindings, findings = convert_tools([("model.tools[3]", tool), ("model.tools[4]", fn_tool("kept"))])
    assert [t["name"] for t in tools] == ["kept"] and [b.path for b in bindings] == ["model.tools[4]"]
    (f,) = at(findings, "model.tools[3]")
    assert f.status == "unsupported" and tool["type"] in f.detail and "loses" in f.detail


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(("tool", "path", "fragment"), [
    ("transferCall", "model.tools[0]", '"transferCall"'),
    ({"function": {"name": "x"}}, "model.tools[0].type", "null"),
    ({"type": 7}, "model.tools[0].type", "7"),
    ({"type": "function"}, "model.tools[0].function", "null"),
    ({"type": "function", "function": {"description": "no name"}}, "model.tools[0].function.name", "null"),
    ({"type": "function", "function": {"name": "x", "parameters": "{\"type\": \"object\"}"}}, "model.tools[0].function.parameters", '"{\\"type'),
    ({"type": "function", "function": {"name": "x", "parameters": [1]}}, "model.tools[0].function.parameters", "[1]"),
    ({"type": "transferCall", "destinations": {"type": "number"}}, "model.tools[0].destinations", '{"type": "number"}'),
    ({"type": "transferCall", "destinations": ["+1555"]}, "model.tools[0].destinations[0]", '"+1555"'),
    ({"type": "endCall", "function": "endCall"}, "model.tools[0].function", '"endCall"'),
    ({"type": "apiRequest", "method": "GET"}, "model.tools[0].url", "null"),
])
def test_tool_schema_error_names_path_value_and_expectation(tool, path, fragment):
    with pytest.raises(ToolSchemaError) as err:
        convert_tools([("model.tools[0]", tool)])
    message = str(err.value)
    assert message.startswith(f"{path}: expected "), message
    assert fragment in message, message
    assert isinstance(err.value, ValueError)


def test_sanitize_schema_error():
    with pytest.raises(ToolSchemaError, match=r"^tool\.body: expected a JSON Schema object.*got string \"object\""):
        sanitize_schema("object", "tool.body")


# ------------------------------------------------------------------------------------------------
# property-based: arbitrary JSON-Schema-like input never raises and always yields valid tools

TYPE_NAMES = st.sampled_from(["string", "number", "integer", "boolean", "array", "object", "null", "int", "foo"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=6))
KEYS = st.one_of(st.sampled_from(["a", "b", "phone", "email", "$ref", "a b"]), st.text(max_size=5))
REFS = st.sampled_from(["#", "#/$defs/A", "#/$defs/B", "#/definitions/C", "#/$defs/A/properties/a",
                        "#/properties/a", "#/$defs/missing", "https://x.example/s.json", "#anchor", ""])
FORMATS = st.sampled_from(["date", "date-time", "email", "uri", "uuid", "phone"])
ODD = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))

LEAVES = st.one_of(
    st.booleans(),
    st.just({}),
    st.fixed_dictionaries({"type": TYPE_NAMES}),
    st.fixed_dictionaries({"type": st.lists(TYPE_NAMES, max_size=3)}),
    st.fixed_dictionaries({"enum": st.lists(SCALARS, max_size=4)}, optional={"type": TYPE_NAMES}),
    st.fixed_dictionaries({"const": SCALARS}),
    st.fixed_dictionaries({"$ref": REFS}),
    st.fixed_dictionaries({"type": st.just("string")}, optional={
        "format": FORMATS, "pattern": st.sampled_from(["^[0-9]+$", "(", "\\d{3}", "(?<n>x)"]),
        "minLength": SCALARS, "maxLength": st.integers(0, 9)}),
    st.fixed_dictionaries({"type": st.sampled_from(["number", "integer"])}, optional={
        "minimum": SCALARS, "maximum": SCALARS, "exclusiveMinimum": SCALARS, "multipleOf": SCALARS}),
    st.fixed_dictionaries({}, optional={
        "description": SCALARS, "title": SCALARS, "default": ODD, "examples": ODD, "x-vendor": ODD,
        "$schema": st.just("https://json-schema.org/draft/2020-12/schema"), "nullable": SCALARS,
        "readOnly": st.booleans(), "if": st.just({}), "patternProperties": ODD, "format": ODD, "enum": ODD}),
)


def _extend(children):
    union = st.lists(children, max_size=3)
    return st.one_of(
        st.fixed_dictionaries({}, optional={
            "type": st.one_of(st.just("object"), TYPE_NAMES, st.lists(TYPE_NAMES, max_size=2)),
            "properties": st.one_of(st.dictionaries(KEYS, children, max_size=4), ODD),
            "required": st.one_of(st.lists(KEYS, max_size=3), ODD),
            "additionalProperties": st.one_of(st.booleans(), children),
            "description": st.text(max_size=10)}),
        st.fixed_dictionaries({}, optional={
            "type": st.just("array"), "items": st.one_of(children, st.lists(children, max_size=2), ODD),
            "prefixItems": st.lists(children, max_size=2), "minItems": SCALARS, "maxItems": st.integers(0, 5),
            "uniqueItems": SCALARS}),
        *[st.fixed_dictionaries({kw: st.one_of(union, ODD)}, optional={
            "type": st.one_of(TYPE_NAMES, st.lists(TYPE_NAMES, max_size=2)),
            "properties": st.dictionaries(KEYS, children, max_size=2), "description": st.text(max_size=5)})
          for kw in ("anyOf", "oneOf", "allOf")],
        st.fixed_dictionaries({"$ref": REFS}, optional={"description": SCALARS, "type": TYPE_NAMES,
                                                        "properties": st.dictionaries(KEYS, children, max_size=2)}),
        st.fixed_dictionaries({"not": children}, optional={"then": children, "dependentSchemas": st.dictionaries(KEYS, children, max_size=1)}),
    )


SCHEMAS = st.recursive(LEAVES, _extend, max_leaves=10)
ROOTS = st.one_of(
    st.none(),
    st.booleans(),
    SCHEMAS,
    st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(KEYS, SCHEMAS, max_size=4)}, optional={
        "required": st.lists(KEYS, max_size=4),
        "$defs": st.fixed_dictionaries({}, optional={"A": SCHEMAS, "B": SCHEMAS}),
        "definitions": st.fixed_dictionaries({}, optional={"C": SCHEMAS}),
        "anyOf": st.lists(SCHEMAS, max_size=2), "$ref": REFS, "additionalProperties": st.booleans()}),
)
NAMES = st.one_of(st.sampled_from(["lookup", "lookup", "endCall", "transferCall", "a" * 64, "a" * 65, "", "héllo wörld",
                                   "名前", "x\n", "lookup_2", "-"]), st.text(max_size=80))


@st.composite
def vapi_tools(draw):
    kind = draw(st.sampled_from(["function"] * 6 + ["endCall", "transferCall", "dtmf", "apiRequest", "sms"]))
    if kind == "function":
        function: dict = {"name": draw(NAMES)}
        if draw(st.booleans()):
            function["description"] = draw(st.one_of(st.text(max_size=20), SCALARS))
        params = draw(ROOTS)
        if params is not None:
            function["parameters"] = params
        if draw(st.booleans()):
            function["strict"] = draw(st.booleans())
        return {"type": "function", "function": function,
                **draw(st.fixed_dictionaries({}, optional={"async": st.booleans(), "rejectionPlan": st.just({"conditions": []})}))}
    if kind == "transferCall":
        dest = st.one_of(
            st.fixed_dictionaries({"type": st.just("number")}, optional={"number": st.sampled_from(["+15550001111", "", "+15550002222"]),
                                                                        "description": SCALARS}),
            st.fixed_dictionaries({"type": st.just("sip")}, optional={"sipUri": st.sampled_from(["sip:a@b.example", None])}),
            st.fixed_dictionaries({"type": st.sampled_from(["assistant", "weird"])}),
        )
        tool: dict = {"type": "transferCall", "destinations": draw(st.lists(dest, max_size=4))}
        if draw(st.booleans()):
            tool["function"] = {"name": draw(NAMES), "parameters": draw(ROOTS)}
        return tool
    if kind in ("endCall", "dtmf"):
        return {"type": kind, **({"function": {"name": draw(NAMES)}} if draw(st.booleans()) else {})}
    if kind == "apiRequest":
        return {"type": "apiRequest", "method": "POST", "url": "https://api.example/x", "name": draw(NAMES), "body": draw(ROOTS)}
    return {"type": kind}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(vapi_tools(), max_size=5))
def test_property_any_schema_converts_to_valid_realtime_tools(vapi_list):
    pairs = [(f"model.tools[{i}]", t) for i, t in enumerate(vapi_list)]
    snapshot = json.dumps(pairs, default=repr)
    tools, bindings, findings = convert_tools(pairs)
    assert json.dumps(pairs, default=repr) == snapshot  # input untouched
    assert_realtime_valid(tools)  # SDK types, no extras, names valid + unique, top level object, plain subset
    assert [b.realtime_name for b in bindings] == [t["name"] for t in tools]
    assert len(tools) == sum(t["type"] != "sms" for t in vapi_list)
    for f in findings:
        assert f.status in STATUSES and isinstance(f.detail, str) and f.detail
        assert f.path.startswith("model.tools[")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(SCHEMAS)
def test_property_sanitize_schema_is_idempotent_on_its_output(schema):
    out, _ = sanitize_schema(schema, "p")
    check_subset(out)
    again, findings = sanitize_schema(out, "p")
    assert again == out
    assert findings == []


def test_every_tool_kind_in_the_registry_converts_and_unknown_kinds_are_reported():
    for kind in SUPPORTED:
        tool = {"type": kind, "function": {"name": f"t_{kind}", "parameters": {"type": "object", "properties": {}}}}
        if kind == "transferCall":
            tool["destinations"] = [{"type": "number", "number": "+15551234567"}]
        if kind == "apiRequest":
            tool.update(url="https://api.example.com/x", method="POST", name="t_api")
        _tools, bindings, _findings = convert_tools([("t", tool)])
        assert [b.kind for b in bindings] == [kind]
    for kind in KNOWN_TYPES - set(SUPPORTED):
        tools, bindings, findings = convert_tools([("t", {"type": kind})])
        assert tools == [] and findings[0].status == "unsupported"
