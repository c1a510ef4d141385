"""Tools and Vapi server messages through the real server: the customer's existing endpoints
(a stand-in that validates every body against vapi-server-sdk) serve shim calls unchanged."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import orjson

from shim.testing.fake_customer import FakeCustomer, delay, invalid_json, reply_results, status
from shim.testing.fake_openai_text import FakeOpenAIText
from shim.testing.fake_realtime import Script, calls
from shim.testing.twilio_caller import keep_line_open
from shim_tools.dtmf import detect_dtmf

from .harness import SHIM_NUMBER, running_shim
from .test_bridge_e2e import fetchrow

FIXTURES = Path(__file__).parent / "fixtures" / "vapi"
DENTAL = json.loads((FIXTURES / "dental_receptionist.assistant.json").read_text())
CHECK_AVAILABILITY = next(t for t in DENTAL["model"]["tools"] if t.get("function", {}).get("name") == "check_availability")
FIXTURE_RESPONSE = json.loads((FIXTURES / "tool_calls.dental_check_availability.response.json").read_text())
FIXTURE_REQUEST = json.loads((FIXTURES / "tool_calls.dental_check_availability.request.json").read_text())
ARGS = FIXTURE_REQUEST["message"]["toolCallList"][0]["function"]["arguments"]


def unmodified_dental_endpoint(message: dict):
    """The customer's endpoint as it is: it answers the reference response for the call it got."""
    body = copy.deepcopy(FIXTURE_RESPONSE)
    body["results"][0]["toolCallId"] = message["toolCallList"][0]["id"]
    return 200, body


def function_tool(name: str, url: str, **extra) -> dict:
    return {"type": "function", "function": {"name": name, "description": name, "parameters": {"type": "object", "properties": {}}},
            "server": {"url": url}, **extra}


def assistant(customer: FakeCustomer, tools: list[dict], **extra) -> dict:
    """The demo assistant with tools; the model speaks first with its own words (our script), so
    the scripted function call happens as soon as the call starts."""
    return {"firstMessageMode": "assistant-speaks-first-with-model-generated-message",
            "model": {"provider": "openai", "model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."}],
                      "tools": tools},
            "server": {"url": customer.url("/events"), "secret": "events-secret"}, **extra}


def outputs(session) -> list[dict]:
    return [e["item"] for e in session.received if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"]


def after(session, event_type: str, anchor_index: int) -> list[dict]:
    return [e for e in session.received[anchor_index:] if e["type"] == event_type]


async def test_an_unmodified_vapi_tool_endpoint_serves_the_call(tmp_path, db_dsn):
    async with FakeCustomer() as customer, FakeOpenAIText(api_key="sk-test-0123456789", reply=lambda body: "The caller booked a cleaning.") as text_model:
        customer.on("/dental/tools", unmodified_dental_endpoint)
        tool = copy.deepcopy(CHECK_AVAILABILITY)
        tool["server"] = {"url": customer.url("/dental/tools?team=dental"), "secret": "tool-secret", "headers": {"X-Team": "dental"}}
        script = Script(replies=[calls(("check_availability", ARGS)), "Tuesday at ten works."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, [tool]),
                                openai_base_url=text_model.base_url) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            (request,) = await customer.wait_for("tool-calls", timeout=10)
            await session.wait_sent("response.done", count=3, timeout=10)  # the call, the filler, the answer
            await keep_line_open(caller, caller.wait_until_played(timeout=15))
            await caller.stop()
            (report,) = await customer.wait_for("end-of-call-report", timeout=15)
            await run.drain()
    assert customer.validation_errors == [] and run.fake.validation_errors == []
    # the same envelope Vapi sends, to the same URL, with the same secret and headers
    assert request.path == "/dental/tools" and request.headers["x-vapi-secret"] == "tool-secret"
    assert request.headers["x-team"] == "dental" and request.headers["content-type"] == "application/json"
    message = request.body["message"]
    assert message["toolCallList"][0]["function"] == {"name": "check_availability", "arguments": ARGS}
    assert message["toolCalls"] == message["toolCallList"]
    assert message["call"]["phoneCallProviderId"] == caller.call_sid and message["customer"]["number"] == "+15550001111"
    assert message["phoneNumber"]["number"] == SHIM_NUMBER and message["phoneNumber"]["provider"] == "twilio"
    # the model got the result, then exactly one response.create
    (output,) = outputs(session)
    assert output["output"] == FIXTURE_RESPONSE["results"][0]["result"]
    index = next(i for i, e in enumerate(session.received) if e.get("item", {}).get("type") == "function_call_output")
    creates = after(session, "response.create", index)
    assert len(creates) == 1 and "instructions" not in creates[0].get("response", {})
    row = await fetchrow(db_dsn, "SELECT * FROM tool_calls WHERE call_sid = $1", caller.call_sid)
    assert row["name"] == "check_availability" and row["status"] == "ok" and row["latency_ms"] >= 0
    assert row["url"] == customer.url("/dental/tools")  # no query string stored
    assert orjson.loads(row["arguments"]) == ARGS
    # the end-of-call report, after hang-up, with the analysis
    report_message = report.body["message"]
    assert report.headers["x-vapi-secret"] == "events-secret"
    assert report_message["endedReason"] == "customer-ended-call"
    assert report_message["summary"] == "The caller booked a cleaning."
    assert "Tuesday at ten works." in report_message["transcript"]
    statuses = [r.body["message"]["status"] for r in customer.matching("status-update")]
    assert statuses == ["in-progress", "ended"]
    call = await fetchrow(db_dsn, "SELECT summary FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["summary"] == "The caller booked a cleaning."
    deliveries = await fetchrow(db_dsn, "SELECT count(*) AS n, bool_and(status = 'ok') AS ok FROM webhook_deliveries WHERE call_sid = $1", caller.call_sid)
    assert deliveries["n"] >= 4 and deliveries["ok"]


async def test_failures_become_outputs_the_model_can_speak_and_the_bot_never_goes_silent(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        customer.on("/slow", delay(2.5, reply_results(lambda name, args: "too late")))
        customer.on("/broken", status(500))
        customer.on("/garbled", invalid_json())
        customer.on("/ok", reply_results(lambda name, args: {"open": True}))
        tools = [
            function_tool("slow", customer.url("/slow"), server={"url": customer.url("/slow"), "timeoutSeconds": 1}),
            function_tool("broken", customer.url("/broken")),
            function_tool("garbled", customer.url("/garbled")),
            function_tool("ok", customer.url("/ok")),
        ]
        script = Script(replies=[calls(("slow", {}), ("broken", {}), ("garbled", {}), ("ok", {})), "Sorry about that."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, tools)) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await keep_line_open(caller, session.wait_for("response.create", count=3, timeout=10))
            await caller.stop()
            await run.drain()
    by_call = {fc["call_id"]: fc["name"] for fc in session.function_calls}
    got = {by_call[o["call_id"]]: o["output"] for o in outputs(session)}
    assert got == {
        "slow": "No result returned.",  # server.timeoutSeconds honoured
        "broken": "Error: the tool failed with HTTP status 500.",
        "garbled": "No result returned.",
        "ok": '{"open":true}',
    }
    first_output = next(i for i, e in enumerate(session.received) if e.get("item", {}).get("type") == "function_call_output")
    creates = after(session, "response.create", first_output)
    assert len(creates) == 1 and "instructions" not in creates[0].get("response", {})  # one, after all outputs
    assert len(customer.matching("/slow")) == 1  # no retry for tool calls
    rows = await fetchrow(db_dsn, "SELECT array_agg(status ORDER BY name) AS s FROM tool_calls WHERE call_sid = $1", caller.call_sid)
    assert sorted(rows["s"]) == ["error", "error", "ok", "timeout"]


async def test_slow_tools_say_their_messages_while_the_webhook_runs(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        customer.on("/slow", delay(1.6, reply_results(lambda name, args: "found it")))
        tool = function_tool("lookup", customer.url("/slow"), messages=[
            {"type": "request-start", "content": "Let me check that."},
            {"type": "request-response-delayed", "content": "Still checking.", "timingMilliseconds": 800},
        ])
        silent = function_tool("quiet", customer.url("/slow"), messages=[{"type": "request-start", "content": ""}])
        script = Script(replies=[calls(("lookup", {})), "Here it is.", calls(("quiet", {})), "Done."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, [tool, silent])) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await keep_line_open(caller, session.wait_sent("response.done", count=4, timeout=10))
            await caller.stop()
    said = [e.get("response", {}).get("instructions", "") for e in session.events_of("response.create")]
    assert any(s.endswith('"Let me check that."') for s in said)
    assert any(s.endswith('"Still checking."') for s in said)
    # the filler was spoken before the result reached the model, the answer after it
    texts = [e["response"]["output"][0]["content"][0]["transcript"] for e in session.sent
             if e["type"] == "response.done" and e["response"]["output"] and e["response"]["output"][0]["type"] == "message"]
    assert texts[:3] == ["Let me check that.", "Still checking.", "Here it is."]


async def test_async_tools_answer_at_once_and_fire_the_webhook(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        customer.on("/log", delay(1.0, reply_results(lambda name, args: "logged")))
        tool = function_tool("log_lead", customer.url("/log"), **{"async": True})
        script = Script(replies=[calls(("log_lead", {"name": "Ann"})), "Noted."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, [tool])) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await session.wait_for("response.create", count=2, timeout=10)
            (output,) = outputs(session)
            assert output["output"] == "Success."
            await customer.wait_for("/log", timeout=5)
            await caller.stop()
    assert customer.validation_errors == []


async def test_end_call_says_goodbye_then_hangs_up_through_the_connect_action(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        script = Script(replies=[calls(("endCall", {}))], audio_ms_per_char=15)
        overrides = assistant(customer, [{"type": "endCall"}], endCallMessage="Thanks for calling, goodbye!")
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=overrides) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await keep_line_open(caller, caller.wait_closed(timeout=15))
            ended = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid})
            await customer.wait_for("end-of-call-report", timeout=10)
            await run.drain()
    goodbye = next(bytes(a) for item_id, a in session.audio_out.items())
    assert bytes(caller.played_audio).endswith(goodbye)  # heard in full before the hang-up
    assert "<Hangup" in ended.text and "<Dial" not in ended.text
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "assistant-ended-call"
    assert customer.validation_errors == []


async def test_transfer_dials_the_destination_from_any_instance(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        transfer = {"type": "transferCall", "destinations": [
            {"type": "number", "number": "+15557654321", "callerId": "{{phoneNumber.number}}", "description": "front desk"}]}
        script = Script(replies=[calls(("transferCall", {"destination": "+15557654321"}))], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, [transfer])) as run:
            caller = await run.place_call()
            await keep_line_open(caller, caller.wait_closed(timeout=15))
            run.shim.endings.clear()  # as if Twilio's action request reached another instance
            ended = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid, "To": SHIM_NUMBER})
    assert '<Dial answerOnBridge="true" callerId="+15550002222" timeout="60"><Number>+15557654321</Number></Dial>' in ended.text
    call = await fetchrow(db_dsn, "SELECT ended_reason, transfer FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "assistant-forwarded-call"
    assert orjson.loads(call["transfer"])["number"] == "+15557654321"
    assert len(caller.played_audio) > 0  # "Transferring the call now" was heard first


async def test_a_transfer_without_destinations_asks_the_server(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        customer.on("/events", lambda message: (200, {"destination": {"type": "sip", "sipUri": "sip:desk@example.com"}})
                    if message.get("type") == "transfer-destination-request" else (200, {}))
        script = Script(replies=[calls(("transferCall", {}))], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, [{"type": "transferCall", "destinations": []}])) as run:
            caller = await run.place_call()
            await keep_line_open(caller, caller.wait_closed(timeout=15))
            ended = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid, "To": SHIM_NUMBER})
    assert customer.matching("transfer-destination-request") and customer.validation_errors == []
    assert "<Sip>sip:desk@example.com</Sip>" in ended.text


async def test_dtmf_both_ways(tmp_path, db_dsn):
    async with FakeCustomer() as customer:
        script = Script(replies=[calls(("dtmf", {"keys": "12#"})), "Pressed.", "Got your entry."], audio_ms_per_char=15)
        overrides = assistant(customer, [{"type": "dtmf"}], keypadInputPlan={"enabled": True, "delimiters": "#"})
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=overrides) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await keep_line_open(caller, session.wait_sent("response.done", count=2, timeout=10))
            await keep_line_open(caller, caller.wait_until_played(timeout=10))
            for digit in "42#":
                await caller.send_dtmf(digit)
            await keep_line_open(caller, session.wait_for("response.create", count=3, timeout=10))
            await caller.stop()
    assert detect_dtmf(bytes(caller.received_audio)).startswith("12#")  # the far end heard the tones
    entries = [e["item"]["content"][0]["text"] for e in session.events_of("conversation.item.create") if e["item"].get("role") == "user"]
    assert entries == ["User's Keypad Entry: 42"]


async def test_assistant_request_picks_the_assistant_or_refuses_the_call(tmp_path, db_dsn):
    import asyncpg

    async with FakeCustomer() as customer:
        answers = iter([
            {"assistantId": "demo", "assistantOverrides": {"variableValues": {"caller_name": "Ann"}}},
            {"error": "We are closed today."},
            {"assistant": {"name": "Inline", "model": {"provider": "openai", "model": "gpt-4o", "messages": [{"role": "system", "content": "Inline prompt for {{caller_name}}."}]},
                           "firstMessage": "Hello from inline."}, "assistantOverrides": {"variableValues": {"caller_name": "Bo"}}},
        ])
        customer.on("/route", lambda message: (200, next(answers) if message.get("type") == "assistant-request" else {}))
        async with running_shim(tmp_path, db_dsn, Script(audio_ms_per_char=15), default_assistant="") as run:
            conn = await asyncpg.connect(db_dsn)
            await conn.execute("INSERT INTO numbers (number, server_url) VALUES ($1, $2)", SHIM_NUMBER, customer.url("/route"))
            await conn.close()
            first = await run.place_call()
            refused = await run.voice_webhook("CA" + "e" * 32)
            inline = await run.place_call()
            await asyncio.sleep(0.5)
            await first.stop()
            await inline.stop()
            await run.drain()
    assert customer.validation_errors == [] and len(customer.matching("assistant-request")) == 3
    assert first.custom_parameters["assistant"] == "@request"
    assert "<Say>We are closed today.</Say>" in refused.text and "<Hangup" in refused.text
    sessions = run.fake.sessions
    assert sessions[1].events_of("session.update")[0]["session"]["instructions"] == "Inline prompt for Bo."
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", "CA" + "e" * 32)
    assert call["ended_reason"] == "assistant-request-returned-error"
