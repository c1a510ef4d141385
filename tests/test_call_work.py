"""The shell's decisions as pure functions: assistant overrides, apiRequest, post-call work,
and the one Twilio signature check."""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
import pytest
from twilio.request_validator import RequestValidator

from shim import twilio_media as tw
from shim.assistant import AssistantNotFound
from shim.call_work import (
    analysis_row,
    api_answer,
    api_failure,
    api_request,
    choose_assistant,
    end_of_call_report,
    should_analyze,
    vapi_tool_name,
)
from shim.twilio_signature import TwilioSignatures
from shim_tools import envelope

SAVED = {"acme": {"name": "Acme", "firstMessage": "Hi", "model": {"messages": []}}}


def load(assistant_id):
    if assistant_id not in SAVED:
        raise AssistantNotFound("assistant", assistant_id, "a saved assistant")
    return SAVED[assistant_id]


def start(**params):
    return tw.Start(stream_sid="MZ1", call_sid="CA1", account_sid="AC1",
                    custom_parameters={"from": "+15550001111", "to": "+15550002222", **params})


def test_the_numbers_assistant_with_stream_parameters_as_variables():
    chosen = choose_assistant(start(assistant="acme", plan="gold", token="t"), None, load)
    assert chosen.assistant_id == "acme" and chosen.assistant == SAVED["acme"]
    assert chosen.context.from_number == "+15550001111" and chosen.context.to_number == "+15550002222"
    assert chosen.context.variables == {"plan": "gold", "token": "t"}


def test_assistant_request_overrides_replace_top_level_keys_and_add_variables():
    requested = {"assistantId": "acme", "assistantOverrides": {"firstMessage": "Hello {{name}}",
                                                               "variableValues": {"name": "Ada", "plan": "basic"}}}
    chosen = choose_assistant(start(assistant="@request", plan="gold"), requested, load)
    assert chosen.assistant["firstMessage"] == "Hello {{name}}" and chosen.assistant["name"] == "Acme"
    assert SAVED["acme"]["firstMessage"] == "Hi"  # the saved assistant is not modified
    # the stream's own parameters win over variableValues of the same name
    assert chosen.context.variables == {"name": "Ada", "plan": "gold"}


def test_assistant_request_with_an_inline_assistant():
    chosen = choose_assistant(start(), {"assistant": {"name": "Inline", "model": {}}}, load)
    assert chosen.assistant_id == "Inline" and chosen.assistant == {"name": "Inline", "model": {}}


def test_an_unknown_assistant_is_an_error():
    with pytest.raises(AssistantNotFound):
        choose_assistant(start(), {"assistantId": "nope"}, load)


TOOL = {"type": "apiRequest", "method": "GET", "url": "https://api.example.com/{{tenant}}/orders/{{order_id}}",
        "headers": {"type": "object", "properties": {"Authorization": {"type": "string", "value": "Bearer s3cret"}}},
        "timeoutSeconds": 7}


def test_api_request_fills_the_url_with_encoded_arguments_and_keeps_headers():
    spec = api_request(TOOL, {"order_id": "A 1/2"}, {"tenant": "acme"})
    assert spec.method == "GET" and spec.timeout_s == 7.0
    assert spec.url == "https://api.example.com/acme/orders/A%201%2F2"
    assert spec.headers == {"Authorization": "Bearer s3cret"} and spec.json == {"order_id": "A 1/2"}


def test_api_request_arguments_cannot_replace_the_calls_variables():
    # the model names a call variable: the call's own value is used, not the model's
    spec = api_request(TOOL, {"tenant": "evil.example/x", "order_id": "1"}, {"tenant": "acme"})
    assert spec.url == "https://api.example.com/acme/orders/1"


def test_api_request_answers():
    ok = api_answer("c1", 200, "x" * 30_000)
    assert ok.status == "ok" and len(ok.output) == 20_000
    assert api_answer("c1", 204, "").output == "Success."
    bad = api_answer("c1", 500, "boom")
    assert bad.status == "error" and bad.output == "Error: the request failed with HTTP 500." and bad.http_status == 500
    assert api_failure("c1", httpx.ReadTimeout("slow"), timed_out=True).status == "timeout"
    assert api_failure("c1", httpx.ConnectError("no"), timed_out=False).output == "Error: the request could not be made (ConnectError)."


def test_post_call_decisions():
    assert should_analyze(api_key="sk", hipaa=False)
    assert not should_analyze(api_key="sk", hipaa=True) and not should_analyze(api_key="", hipaa=False)
    assert analysis_row("CA1", {"summary": None, "structuredData": None}) is None
    assert analysis_row("CA1", {"summary": "Booked.", "successEvaluation": None}) == {
        "call_sid": "CA1", "summary": "Booked.", "analysis": {"summary": "Booked."}}
    info = envelope.CallInfo(call_sid="CA1", account_sid="AC1", assistant_id="acme", assistant={}, from_number="+1",
                             to_number="+2", started_at=datetime(2026, 1, 1, tzinfo=timezone.utc), variable_values={})
    report = end_of_call_report(info, ended_reason="customer-ended-call", ended_at=datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc),
                                messages=[], now_ms=0, recording_url=None, analysis={"summary": "Booked.", "structuredData": None})
    assert report["message"]["endedReason"] == "customer-ended-call"
    assert report["message"]["analysis"]["summary"] == "Booked."


def test_vapi_tool_name():
    assert vapi_tool_name({"function": {"name": "lookup"}}, "x") == "lookup"
    assert vapi_tool_name({"name": "saved"}, "x") == "saved" and vapi_tool_name({}, "x") == "x"


def test_one_signature_check_for_webhooks_and_the_stream_upgrade():
    signatures = TwilioSignatures("token")
    sign = RequestValidator("token").compute_signature
    url = "https://shim.example.com/twilio/voice"
    params = {"CallSid": "CA1", "To": "+1"}
    assert signatures.valid(url, params, sign(url, params))
    assert not signatures.valid(url, {**params, "To": "+2"}, sign(url, params))
    stream = "wss://shim.example.com/twilio/media"
    assert signatures.valid(stream, {}, sign(stream + "/", {}))  # Twilio may sign with a trailing slash
    assert not signatures.valid(stream, {}, None) and not TwilioSignatures("").valid(url, params, sign(url, params))
    token = signatures.stream_token("CA1")
    assert signatures.start_token_ok("CA1", token) and not signatures.start_token_ok("CA2", token)
    assert not signatures.start_token_ok("CA1", "ünïcode-token")  # caller input: refused, never an exception
    assert not TwilioSignatures("").start_token_ok("CA1", TwilioSignatures("").stream_token("CA1"))
