"""shim_tools.envelope (Vapi's server-message JSON), shim_tools.results (reading tool answers, spoken tool
messages) and the FakeCustomer stand-in. Every built object is validated against vapi-server-sdk
3.0.0 (models looked up once through fake_customer's cache; the SDK import itself takes seconds)."""

from __future__ import annotations

import copy
import json
import random
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from shim.testing.fake_customer import (
    FakeCustomer, _model, _stringify_arguments, delay, invalid_json, reply_error, reply_results, respond, status,
    validate_server_message,
)
from shim_tools.envelope import (
    CallInfo, Message, ToolCallRequest, artifact, assistant_request, call_object, customer_object,
    end_of_call_report, hang_message, iso_ms, phone_number_id, phone_number_object, sanitized_assistant,
    status_update_message, tool_call_object, tool_calls_message, transcript_message, transfer_destination_request,
    vapi_call_id, with_static_parameters,
)
from shim_tools.results import (
    ASYNC_RESULT, DEFAULT_FILLERS, NO_RESULT, async_outcome, delayed_messages, parse_tool_response, pick_message,
    tool_message,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vapi"
ASSISTANT = json.loads((FIXTURES / "dental_receptionist.assistant.json").read_text())
TC_REQUEST = json.loads((FIXTURES / "tool_calls.dental_check_availability.request.json").read_text())
TC_RESPONSE_RAW = (FIXTURES / "tool_calls.dental_check_availability.response.json").read_bytes()
EOCR = json.loads((FIXTURES / "end_of_call_report.dental.json").read_text())

CHECK_AVAILABILITY = ASSISTANT["model"]["tools"][0]
BOOK = ASSISTANT["model"]["tools"][1]
STARTED = datetime(2026, 2, 17, 15, 3, 41, 512000, tzinfo=timezone.utc)
ENDED = datetime(2026, 2, 17, 15, 4, 34, 822000, tzinfo=timezone.utc)

INFO = CallInfo(
    call_sid="CA5e0f1d2c3b4a59687766554433221100",
    account_sid="AC0123456789abcdef0123456789abcdef",
    assistant_id=ASSISTANT["id"],
    assistant=ASSISTANT,
    from_number="+15125550143",
    to_number="+15125550100",
    started_at=STARTED,
    variable_values={"patientFirstName": "Dana"},
    phone_number_name="Brightside main line",
)


def _to_message(m: dict) -> Message:
    """A fixture artifact message as the shim's Message."""
    role = m["role"]
    if role == "tool_calls":
        return Message(role, m["message"], m["time"], m["secondsFromStart"], tool_calls=m["toolCalls"])
    if role == "tool_call_result":
        return Message(role, "", m["time"], m["secondsFromStart"], name=m["name"], result=m["result"],
                       tool_call_id=m["toolCallId"])
    return Message(role, m["message"], m["time"], m["secondsFromStart"], m.get("endTime"))


TC_MESSAGES = [_to_message(m) for m in TC_REQUEST["message"]["artifact"]["messages"]]
EOCR_MESSAGES = [_to_message(m) for m in EOCR["message"]["artifact"]["messages"]]
_FX_CALL = TC_REQUEST["message"]["toolCallList"][0]
DENTAL_CALL = ToolCallRequest(_FX_CALL["id"], _FX_CALL["function"]["name"], _FX_CALL["function"]["arguments"],
                              CHECK_AVAILABILITY)


def _validate(model_name: str, data: dict) -> None:
    _model(model_name).model_validate(data)


def _shape_diff(ours, theirs, path="", out=None, skip=()):
    """(missing, extra, type mismatches) between two JSON trees: keys, nesting and value types
    (numbers alike; None matches anything, it is a nullable slot)."""
    out = out if out is not None else {"missing": set(), "extra": set(), "types": set()}
    if path in skip:
        return out
    if ours is None or theirs is None:
        return out
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in theirs.keys() - ours.keys():
            out["missing"].add(f"{path}.{k}".lstrip("."))
        for k in ours.keys() - theirs.keys():
            out["extra"].add(f"{path}.{k}".lstrip("."))
        for k in ours.keys() & theirs.keys():
            _shape_diff(ours[k], theirs[k], f"{path}.{k}".lstrip("."), out, skip)
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _shape_diff(a, b, f"{path}[{i}]", out, skip)
        return out
    kind = lambda v: "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__  # noqa: E731
    if kind(ours) != kind(theirs):
        out["types"].add(f"{path}: {kind(ours)} vs {kind(theirs)}")
    return out


# --- ids, objects ----------------------------------------------------------------------------------


def test_ids_are_stable_uuids():
    a, b = vapi_call_id("CA1"), vapi_call_id("CA1")
    assert a == b and a != vapi_call_id("CA2") and len(a) == 36
    assert phone_number_id("+15125550100") == phone_number_id("+15125550100") != phone_number_id("+15125550101")
    assert phone_number_id("CA1") != vapi_call_id("CA1")
    assert iso_ms(STARTED) == "2026-02-17T15:03:41.512Z"
    assert iso_ms(1771340632942) == "2026-02-17T15:03:52.942Z"


def test_objects_validate_against_their_sdk_models():
    call = call_object(INFO, now_ms=1771340632942)
    _validate("Call", call)
    assert call["phoneCallProviderId"] == INFO.call_sid == call["transport"]["callSid"]
    assert call["orgId"] == ASSISTANT["orgId"]
    assert call["assistantOverrides"] == {"variableValues": {"patientFirstName": "Dana"}}
    ended = call_object(INFO, status="ended", ended_at=ENDED, ended_reason="customer-ended-call", cost=0.5)
    _validate("Call", ended)
    assert (ended["endedAt"], ended["endedReason"], ended["cost"]) == ("2026-02-17T15:04:34.822Z", "customer-ended-call", 0.5)

    phone = phone_number_object(INFO)
    _validate("TwilioPhoneNumber", phone)
    assert phone["id"] == call["phoneNumberId"] and phone["twilioAccountSid"] == INFO.account_sid
    assert not {"twilioAuthToken", "twilioApiSecret", "twilioApiKey"} & phone.keys()
    _validate("CreateCustomerDto", customer_object(INFO))

    art = artifact(EOCR_MESSAGES)
    _validate("Artifact", art)
    assert art["messages"] == EOCR["message"]["artifact"]["messages"]
    assert art["transcript"] == EOCR["message"]["artifact"]["transcript"]

    wire = tool_call_object(DENTAL_CALL)
    assert isinstance(wire["function"]["arguments"], dict)      # live shape: an object
    sdk = copy.deepcopy(wire)
    _stringify_arguments([sdk])                                  # the SDK's typing: a string
    _validate("ToolCall", sdk)


def test_org_id_without_export_org_is_stable_per_account():
    bare = CallInfo("CA9", "AC9", "", {}, "+1", "+2", STARTED)
    assert call_object(bare)["orgId"] == call_object(CallInfo("CA8", "AC9", "", {}, "+3", "+4", STARTED))["orgId"]
    assert "assistantId" not in call_object(bare) and "assistantOverrides" not in call_object(bare)


def test_assistant_is_sent_without_export_metadata_or_secrets():
    secret_assistant = copy.deepcopy(ASSISTANT)
    secret_assistant["server"]["secret"] = "s3cret"
    secret_assistant["serverUrlSecret"] = "legacy"
    secret_assistant["credentials"] = [{"provider": "11labs", "apiKey": "k"}]
    secret_assistant["model"]["tools"][0]["server"]["secret"] = "tool-secret"
    before = copy.deepcopy(secret_assistant)
    out = sanitized_assistant(secret_assistant)
    assert secret_assistant == before                           # input untouched
    assert out == TC_REQUEST["message"]["assistant"]             # exactly what the fixture carries
    assert "s3cret" not in json.dumps(out) and "tool-secret" not in json.dumps(out)
    assert out["server"]["headers"] == {"X-Clinic-Id": "bfd-austin-01"}   # customer headers are kept

    info = CallInfo(INFO.call_sid, INFO.account_sid, INFO.assistant_id, secret_assistant, INFO.from_number,
                    INFO.to_number, STARTED)
    tool = secret_assistant["model"]["tools"][0]
    body = tool_calls_message(info, [ToolCallRequest("c1", "check_availability", {}, tool)], [], 1)
    assert "secret" not in json.dumps(body).lower()
    assert validate_server_message(body) == []


def test_static_parameters_merge_over_model_arguments():
    render = lambda s: s.replace("{{ customer.number }}", "+15125550143")  # noqa: E731
    args = with_static_parameters(BOOK, {"slotId": "s1", "clinicId": "model-said"}, render)
    assert args == {"slotId": "s1", "clinicId": "bfd-austin-01", "callerPhone": "+15125550143"}
    assert with_static_parameters(CHECK_AVAILABILITY, {"a": 1}) == {"a": 1}


# --- the fixtures, round trip ----------------------------------------------------------------------


def test_dental_tool_calls_round_trip_matches_the_fixture():
    body = tool_calls_message(INFO, [DENTAL_CALL], TC_MESSAGES, TC_REQUEST["message"]["timestamp"])
    ours, theirs = body["message"], TC_REQUEST["message"]
    assert list(ours) == list(theirs)                           # same keys, same order
    for key in ("timestamp", "type", "toolCalls", "toolCallList", "toolWithToolCallList", "artifact",
                "customer", "assistant"):
        assert ours[key] == theirs[key], key
    diff = _shape_diff(ours, theirs)
    # Only Vapi knows its monitor URLs and the number's own server (assistant-request) URL.
    assert diff == {"missing": {"call.monitor", "phoneNumber.server"}, "extra": set(), "types": set()}
    for key in ("phoneCallProviderId", "startedAt", "type", "status", "phoneCallProvider", "phoneCallTransport",
                "assistantId", "assistantOverrides", "customer", "transport"):
        assert ours["call"][key] == theirs["call"][key], key
    assert ours["call"]["id"] == vapi_call_id(INFO.call_sid)
    assert validate_server_message(body) == []
    assert validate_server_message(TC_REQUEST) == []            # the fixture passes the same checks


def test_dental_end_of_call_report_matches_the_fixture():
    fx = EOCR["message"]
    body = end_of_call_report(
        INFO, ended_reason="assistant-ended-call", ended_at=ENDED, messages=EOCR_MESSAGES, now_ms=fx["timestamp"],
        recording_url=fx["recordingUrl"], analysis=fx["analysis"], cost=fx["cost"])
    ours = body["message"]
    assert validate_server_message(body) == []
    assert validate_server_message(EOCR) == []
    for key in ("timestamp", "type", "endedReason", "startedAt", "endedAt", "cost", "analysis", "customer",
                "assistant", "durationMs", "durationSeconds", "durationMinutes", "summary", "transcript", "messages",
                "recordingUrl"):
        assert ours[key] == fx[key], key
    for key in ("messages", "transcript", "recordingUrl", "variableValues"):
        assert ours["artifact"][key] == fx["artifact"][key], key
    assert ours["call"]["status"] == "ended" and ours["call"]["endedAt"] == fx["endedAt"]
    # Vapi keeps tool fillers out of the model's history and logs built-ins' results there; the
    # shim's OpenAI view is the plain projection of `messages` — same shape per role.
    role_keys = lambda ms: {m["role"]: frozenset(m) for m in ms}  # noqa: E731
    assert role_keys(ours["artifact"]["messagesOpenAIFormatted"]) == role_keys(fx["artifact"]["messagesOpenAIFormatted"])
    diff = _shape_diff(ours, fx, skip={"artifact.messagesOpenAIFormatted"})
    unknowable = {"costs", "artifact.logUrl", "artifact.recording.mono", "call.monitor", "phoneNumber.server"}
    breakdown = {f"costBreakdown.{k}" for k in fx["costBreakdown"] if k != "total"}
    assert diff == {"missing": unknowable | breakdown, "extra": set(), "types": set()}
    assert ours["costBreakdown"] == {"total": fx["cost"]}


def test_end_of_call_report_without_optional_parts():
    body = end_of_call_report(INFO, ended_reason="customer-ended-call", ended_at=STARTED + timedelta(seconds=90),
                              messages=[], now_ms=1)
    msg = body["message"]
    assert validate_server_message(body) == []
    assert msg["analysis"] == {} and msg["summary"] == "" and msg["transcript"] == "" and msg["messages"] == []
    assert (msg["durationMs"], msg["durationSeconds"], msg["durationMinutes"]) == (90000, 90.0, 1.5)
    assert not {"cost", "costBreakdown", "recordingUrl", "stereoRecordingUrl"} & msg.keys()
    assert "recording" not in msg["artifact"] and "cost" not in msg["call"]


def test_every_builder_validates():
    bare = CallInfo("CA0", "AC0", "", {}, "+15125550143", "+15125550100", STARTED)
    bodies = [
        tool_calls_message(INFO, [DENTAL_CALL, ToolCallRequest("call_2", "book_appointment", {"slotId": "x"}, BOOK)],
                           TC_MESSAGES, 10),
        status_update_message(INFO, "in-progress", TC_MESSAGES, 11),
        status_update_message(INFO, "forwarding", TC_MESSAGES, 12,
                              destination={"type": "number", "number": "+15125550199"}),
        status_update_message(INFO, "ended", EOCR_MESSAGES, 13, ended_reason="customer-ended-call"),
        transcript_message(INFO, "assistant", "Hello there.", 14),
        transcript_message(INFO, "user", "Hi.", 15),
        hang_message(INFO, 16),
        transfer_destination_request(INFO, TC_MESSAGES, 17),
        assistant_request(bare, 18),
        assistant_request(INFO, 19),
        end_of_call_report(INFO, ended_reason="silence-timed-out", ended_at=ENDED, messages=EOCR_MESSAGES, now_ms=20,
                           analysis={"summary": "x", "structuredData": {"a": 1}, "successEvaluation": False}),
    ]
    for body in bodies:
        assert validate_server_message(body) == [], body["message"]["type"]
    ended = bodies[3]["message"]
    assert ended["endedReason"] == "customer-ended-call" and ended["call"]["status"] == "ended"
    assert "endedAt" in ended["call"]
    forwarding = bodies[2]["message"]
    assert forwarding["destination"]["number"] == "+15125550199" and forwarding["transcript"].startswith("AI: ")
    assert bodies[4]["message"]["transcriptType"] == "final"
    assert "assistant" not in bodies[8]["message"] and bodies[8]["message"]["call"]["status"] == "ringing"
    assert bodies[8]["message"]["phoneNumber"]["assistantId"] is None
    assert bodies[10]["message"]["analysis"]["successEvaluation"] == "false"
    assert [c["id"] for c in bodies[0]["message"]["toolCallList"]] == [DENTAL_CALL.id, "call_2"]
    assert [w["toolCall"]["id"] for w in bodies[0]["message"]["toolWithToolCallList"]] == [DENTAL_CALL.id, "call_2"]
    with pytest.raises(ValueError):
        transcript_message(INFO, "bot", "x", 1)


def test_artifact_tool_call_arguments_are_strings():
    msgs = [Message("tool_calls", "", 5, 0.1, tool_calls=[{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": {"é": 1}}}]),
            Message("tool_call_result", time_ms=6, seconds_from_start=0.2, name="f", result=NO_RESULT, tool_call_id="c")]
    art = artifact(msgs)
    assert art["messages"][0]["toolCalls"][0]["function"]["arguments"] == '{"é":1}'
    assert art["messagesOpenAIFormatted"] == [
        {"role": "assistant", "content": "", "tool_calls": art["messages"][0]["toolCalls"]},
        {"role": "tool", "tool_call_id": "c", "content": NO_RESULT}]
    assert art["transcript"] == ""


# --- parse_tool_response ---------------------------------------------------------------------------


def _one(http_status=200, body=b"", ids=("c1",), **kw):
    out = parse_tool_response(list(ids), http_status=http_status, body=body, **kw)
    assert set(out) == set(ids)
    return out if len(ids) > 1 else out[ids[0]]


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def test_response_fixture_parses_to_its_result():
    out = parse_tool_response([DENTAL_CALL.id], http_status=200, body=TC_RESPONSE_RAW)
    expected = json.loads(TC_RESPONSE_RAW)["results"][0]["result"]
    o = out[DENTAL_CALL.id]
    assert (o.status, o.output, o.result, o.error, o.message, o.http_status) == ("ok", expected, expected, None, None, 200)


def test_result_string_and_object():
    o = _one(body=_json({"results": [{"toolCallId": "c1", "result": "done"}]}))
    assert (o.status, o.output) == ("ok", "done")
    o = _one(body=_json({"results": [{"toolCallId": "c1", "result": {"a": [1, "é"], "b": None}}]}))
    assert o.output == '{"a":[1,"é"],"b":null}' and "\n" not in o.output and o.status == "ok"
    o = _one(body=_json({"results": [{"toolCallId": "c1", "result": 42}]}), http_status=201)
    assert (o.status, o.output, o.http_status) == ("ok", "42", 201)
    o = _one(body=_json({"results": [{"toolCallId": "c1", "result": ""}]}))
    assert (o.status, o.result, o.output) == ("ok", "", NO_RESULT)


def test_error_and_message():
    o = _one(body=_json({"results": [{"toolCallId": "c1", "error": "Slot taken",
                                      "message": {"type": "request-failed", "content": "That slot is gone."}}]}))
    assert (o.status, o.output, o.error, o.result) == ("error", "Error: Slot taken", "Slot taken", None)
    assert o.message == {"type": "request-failed", "content": "That slot is gone."}
    o = _one(body=_json({"results": [{"toolCallId": "c1", "result": "ok", "error": None,
                                      "message": {"type": "request-complete", "content": "Booked!"}}]}))
    assert (o.status, o.output, o.message["content"]) == ("ok", "ok", "Booked!")


def test_top_level_error_fails_every_call():
    out = _one(body=_json({"error": "Clinic closed"}), ids=("a", "b"))
    assert {o.output for o in out.values()} == {"Error: Clinic closed"}
    assert {o.status for o in out.values()} == {"error"}


@pytest.mark.parametrize("body", [
    _json({"results": [{"toolCallId": "other", "result": "x"}]}),   # unmatched id
    _json({"results": []}),
    _json({"ok": True}),                                             # missing results
    _json({"results": "nope"}),
    _json(["not", "an", "object"]),
    b'{"results": [ not json',                                      # invalid JSON
    b"",
    _json({"results": [{"toolCallId": "c1"}]}),                      # neither result nor error
    _json({"results": [{"id": "c1", "result": "x"}]}),               # wrong key: Vapi needs toolCallId
])
def test_unusable_answers_give_no_result(body):
    o = _one(body=body)
    assert (o.status, o.output, o.result) == ("error", NO_RESULT, None)
    assert o.error


@pytest.mark.parametrize("code", [500, 404, 302, 400])
def test_non_2xx(code):
    o = _one(http_status=code, body=_json({"results": [{"toolCallId": "c1", "result": "ignored"}]}))
    assert (o.status, o.http_status) == ("error", code)
    assert o.output == f"Error: the tool failed with HTTP status {code}."


def test_timeout_and_connection_error():
    o = _one(http_status=None, body=None, timed_out=True)
    assert (o.status, o.output) == ("timeout", NO_RESULT)
    o = _one(http_status=None, body=None, transport_error="ConnectError: connection refused")
    assert (o.status, o.output) == ("error", NO_RESULT) and "connection refused" in o.error


def test_several_results_in_any_order_and_partial():
    body = _json({"results": [{"toolCallId": "b", "result": "B"}, {"toolCallId": "a", "result": "A"},
                              {"toolCallId": "a", "result": "duplicate, ignored"}]})
    out = _one(body=body, ids=("a", "b"))
    assert (out["a"].output, out["b"].output) == ("A", "B")
    out = _one(body=_json({"results": [{"toolCallId": "b", "error": "no"}]}), ids=("a", "b", "c"))
    assert out["a"].output == NO_RESULT and out["c"].output == NO_RESULT and out["b"].output == "Error: no"


def test_async_outcome():
    o = async_outcome("c9")
    assert (o.call_id, o.status, o.output, o.result, o.error) == ("c9", "async", ASYNC_RESULT, None, None)


# --- spoken tool messages --------------------------------------------------------------------------

CONDITIONAL = {
    "type": "function", "function": {"name": "lookup"},
    "messages": [
        {"type": "request-start", "content": "Checking the weather in Paris.",
         "conditions": [{"param": "city", "operator": "eq", "value": "Paris"}]},
        {"type": "request-start", "content": "Big order, one moment.",
         "conditions": [{"param": "qty", "operator": "gte", "value": "10"},
                        {"param": "rush", "operator": "eq", "value": "true"}]},
        {"type": "request-start", "content": "Let me look that up."},
        {"type": "request-complete", "content": "Done!", "role": "assistant", "endCallAfterSpokenEnabled": True},
        {"type": "request-complete", "content": "", "conditions": [{"param": "quiet", "operator": "neq", "value": "no"}]},
        {"type": "request-response-delayed", "content": "Still on it.", "timingMilliseconds": 3000},
        {"type": "request-response-delayed", "content": "Almost there.", "timingMilliseconds": 8000},
        {"type": "request-response-delayed", "content": "Nearly done.", "timingMilliseconds": 8000},
        {"type": "request-response-delayed", "content": "", "timingMilliseconds": 12000},
        {"type": "request-response-delayed", "content": "Lower tier.", "timingMilliseconds": 3000,
         "conditions": [{"param": "qty", "operator": "lt", "value": "3"}]},
        {"type": "something-new", "content": "Sorry, that failed."},
    ],
}


def test_tool_message_conditions():
    rng = random.Random(1)
    assert tool_message(CONDITIONAL, "request-start", {"city": "Paris"}, rng=rng) == "Checking the weather in Paris."
    assert tool_message(CONDITIONAL, "request-start", {"city": "Oslo"}, rng=rng) == "Let me look that up."
    assert tool_message(CONDITIONAL, "request-start", {"qty": 12, "rush": True}, rng=rng) == "Big order, one moment."
    assert tool_message(CONDITIONAL, "request-start", {"qty": 9, "rush": True}, rng=rng) == "Let me look that up."
    assert tool_message(CONDITIONAL, "request-start", {"qty": "10", "rush": "true"}, rng=rng) == "Big order, one moment."
    # neq with a missing param holds -> the silent request-complete is chosen over the plain one
    assert tool_message(CONDITIONAL, "request-complete", {}, rng=rng) is None
    assert tool_message(CONDITIONAL, "request-complete", {"quiet": "no"}, rng=rng) == "Done!"
    assert pick_message(CONDITIONAL, "request-complete", {"quiet": "no"})["endCallAfterSpokenEnabled"] is True
    # an unknown message type counts as request-failed
    assert tool_message(CONDITIONAL, "request-failed", {}, rng=rng) == "Sorry, that failed."


def test_tool_message_variants_and_languages():
    tool = {"type": "function", "messages": [
        {"type": "request-start", "content": "A"}, {"type": "request-start", "content": "B"},
        {"type": "request-complete", "content": "ignored",
         "contents": [{"type": "text", "text": "Hecho.", "language": "es"},
                      {"type": "text", "text": "Done.", "language": "en"}]}]}
    seen = {tool_message(tool, "request-start", {}, rng=random.Random(seed)) for seed in range(30)}
    assert seen == {"A", "B"}
    assert tool_message(tool, "request-start", {}, rng=random.Random(7)) == tool_message(
        tool, "request-start", {}, rng=random.Random(7))
    assert tool_message(tool, "request-complete", {}, language="en-US") == "Done."
    assert tool_message(tool, "request-complete", {}) == "Hecho."            # contents win, first variant
    assert tool_message(tool, "request-failed", {}) is None                  # none configured: the model responds


def test_tool_message_defaults_empty_and_async():
    plain = {"type": "function", "function": {"name": "f"}}
    assert tool_message(plain, "request-start", {}, rng=random.Random(3)) in DEFAULT_FILLERS
    assert {tool_message(plain, "request-start", {}, rng=random.Random(s)) for s in range(60)} == set(DEFAULT_FILLERS)
    assert tool_message(plain, "request-response-delayed", {}) is None
    silent = {"type": "function", "messages": [{"type": "request-start", "content": ""}]}
    assert tool_message(silent, "request-start", {}) is None
    assert tool_message({"type": "endCall"}, "request-start", {}) is None    # built-ins have their own speech
    assert tool_message(CHECK_AVAILABILITY, "request-start", {}) == "Let me check the schedule for you."
    assert tool_message(CHECK_AVAILABILITY, "request-failed", {}).startswith("I'm having trouble")
    asynchronous = dict(CHECK_AVAILABILITY, **{"async": True},
                        messages=CHECK_AVAILABILITY["messages"] + [{"type": "request-complete", "content": "Sent."}])
    for kind in ("request-start", "request-response-delayed", "request-failed"):
        assert tool_message(asynchronous, kind, {}) is None
    assert tool_message(asynchronous, "request-complete", {}) == "Sent."
    assert delayed_messages(asynchronous, {}) == []
    with pytest.raises(ValueError):
        tool_message(plain, "request-done", {})


def test_delayed_messages_are_staged():
    stages = delayed_messages(CONDITIONAL, {"qty": 5}, rng=random.Random(2))
    assert [t for t, _ in stages] == [3000, 8000]                          # 12000 is silent
    assert stages[0] == (3000, "Still on it.") and stages[1][1] in {"Almost there.", "Nearly done."}
    assert delayed_messages(CONDITIONAL, {"qty": 1})[0] == (3000, "Lower tier.")
    assert delayed_messages(CHECK_AVAILABILITY, {}) == [(4000, "Still looking, thanks for your patience.")]
    assert tool_message(CHECK_AVAILABILITY, "request-response-delayed", {}) == "Still looking, thanks for your patience."


# --- FakeCustomer ----------------------------------------------------------------------------------


async def test_fake_customer_round_trip_with_a_real_client():
    async with FakeCustomer() as customer:
        customer.on("/vapi/tools", reply_results(lambda name, args: {"available": True, "date": args["preferredDate"]}))
        body = tool_calls_message(INFO, [DENTAL_CALL], TC_MESSAGES, 1)
        async with httpx.AsyncClient() as client:
            r = await client.post(customer.url("/vapi/tools"), json=body, headers={"X-Vapi-Secret": "shh"})
            other = await client.post(customer.url("/vapi/events"), json=hang_message(INFO, 2))
        [got] = await customer.wait_for("/vapi/tools", 1, timeout=2)
        assert got.headers["x-vapi-secret"] == "shh" and got.message_type == "tool-calls"
        assert got.body == body and got.status == 200
        assert (other.status_code, other.json()) == (200, {})
        assert [r.message_type for r in await customer.wait_for("hang", 1)] == ["hang"]
        assert customer.validation_errors == [] and customer.handler_errors == []
        reply = r.json()
        sdk_reply = copy.deepcopy(reply)
        for item in sdk_reply["results"]:
            item["result"] = json.dumps(item["result"])
        _validate("ServerMessageResponseToolCalls", sdk_reply)
        out = parse_tool_response([DENTAL_CALL.id], http_status=r.status_code, body=r.content)
        assert out[DENTAL_CALL.id].output == '{"available":true,"date":"2026-02-24"}'


async def test_fake_customer_catches_invalid_bodies():
    async with FakeCustomer() as customer:
        bad = tool_calls_message(INFO, [DENTAL_CALL], TC_MESSAGES, 1)
        del bad["message"]["toolCallList"]
        leaky = copy.deepcopy(TC_REQUEST)
        leaky["message"]["assistant"]["server"]["secret"] = "s3cret"
        stringy = copy.deepcopy(TC_REQUEST)
        for c in stringy["message"]["toolCallList"]:
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
        async with httpx.AsyncClient() as client:
            await client.post(customer.url("/a"), json=bad)
            await client.post(customer.url("/b"), json=leaky)
            await client.post(customer.url("/c"), json=stringy)
            await client.post(customer.url("/d"), json={"message": {"type": "no-such-type"}})
            await client.post(customer.url("/e"), content=b"not json")
        errors = customer.validation_errors
        assert any(e.startswith("/a") and "toolCallList" in e for e in errors)
        assert any(e.startswith("/b") and "secret" in e for e in errors)
        assert any(e.startswith("/c") and "object" in e for e in errors)
        assert any(e.startswith("/d") for e in errors) and any(e.startswith("/e") for e in errors)
        assert [bool(r.errors) for r in customer.received] == [True] * 5


async def test_fake_customer_failure_modes():
    async with FakeCustomer() as customer:
        customer.on("/slow", delay(0.5, reply_results(lambda name, args: "late")))
        customer.on("/500", status(500))
        customer.on("/404", status(404))
        customer.on("/garbage", invalid_json())
        customer.on("/closed", reply_error("Clinic closed"))
        customer.on("/boom", respond(200, {"results": [{"toolCallId": "x"}]}))

        def broken(tool_name, args):
            raise RuntimeError("db down")

        customer.on("/raises", reply_results(broken))
        body = tool_calls_message(INFO, [DENTAL_CALL], TC_MESSAGES, 1)
        ids = [DENTAL_CALL.id]
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(customer.url("/slow"), json=body, timeout=0.1)
            assert parse_tool_response(ids, http_status=None, body=None, timed_out=True)[ids[0]].status == "timeout"
            outputs = {}
            for path in ("/500", "/404", "/garbage", "/closed", "/boom", "/raises"):
                r = await client.post(customer.url(path), json=body)
                outputs[path] = parse_tool_response(ids, http_status=r.status_code, body=r.content)[ids[0]].output
        assert outputs == {
            "/500": "Error: the tool failed with HTTP status 500.",
            "/404": "Error: the tool failed with HTTP status 404.",
            "/garbage": NO_RESULT,
            "/closed": "Error: Clinic closed",
            "/boom": NO_RESULT,
            "/raises": "Error: db down",
        }
        with pytest.raises(TimeoutError):
            await customer.wait_for("/never", 1, timeout=0.05)
        assert customer.validation_errors == []


async def test_connection_error_outcome():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                                  # nothing listens there now
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.TransportError) as exc:
            await client.post(f"http://127.0.0.1:{port}/t", json={})
    o = parse_tool_response(["c1"], http_status=None, body=None, transport_error=repr(exc.value))["c1"]
    assert (o.status, o.output) == ("error", NO_RESULT)


def test_no_credential_of_any_tool_or_server_leaves_in_a_webhook_body():
    """A body sent to one tool's server carries no other tool's Authorization, no server.headers
    credential, no query token and no user:password, anywhere (assistant, toolWithToolCallList)."""
    leaky = copy.deepcopy(ASSISTANT)
    leaky["server"]["headers"] = {"X-Clinic-Id": "bfd-austin-01", "Authorization": "Bearer ASSISTANT-BEARER",
                                  "X-Api-Key": "ASSISTANT-APIKEY"}
    leaky["server"]["url"] = "https://hooks.example.com/vapi?token=URL-QUERY-TOKEN#frag"
    leaky["serverUrl"] = "https://user:URL-PASSWORD@hooks.example.com/legacy"
    other = leaky["model"]["tools"][1]
    other.setdefault("server", {})["headers"] = {"Authorization": "Bearer OTHER-TOOL-BEARER", "Cookie": "OTHER-COOKIE"}
    other["server"]["url"] = "https://book.example.com/hook?api_key=OTHER-QUERY-KEY"
    leaky["model"]["tools"][0].setdefault("server", {})["headers"] = {"X-Auth-Token": "THIS-TOOL-TOKEN"}
    leaky["metadata"] = {"token": "META-TOKEN", "openaiApiKey": "META-APIKEY", "password": "META-PASSWORD"}
    info = CallInfo(INFO.call_sid, INFO.account_sid, INFO.assistant_id, leaky, INFO.from_number, INFO.to_number, STARTED)
    bodies = [
        tool_calls_message(info, [ToolCallRequest("c1", "check_availability", {}, leaky["model"]["tools"][0])], [], 1),
        status_update_message(info, "in-progress", [], 1),
        end_of_call_report(info, ended_reason="customer-ended-call", ended_at=ENDED, messages=[], now_ms=2),
    ]
    for body in bodies:
        text = json.dumps(body)
        for secret in ("ASSISTANT-BEARER", "ASSISTANT-APIKEY", "URL-QUERY-TOKEN", "URL-PASSWORD", "OTHER-TOOL-BEARER",
                       "OTHER-COOKIE", "OTHER-QUERY-KEY", "THIS-TOOL-TOKEN", "META-TOKEN", "META-APIKEY", "META-PASSWORD"):
            assert secret not in text, (secret, body["message"]["type"])
        assert validate_server_message(body) == []
    assistant = bodies[0]["message"]["assistant"]
    assert assistant["server"]["headers"] == {"X-Clinic-Id": "bfd-austin-01"}  # harmless headers still echoed
    assert assistant["server"]["url"] == "https://hooks.example.com/vapi"
