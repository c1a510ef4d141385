"""The pure parts of moving numbers (shim/numbers.py): E.164, what migrate changes and records,
where a Voice URL points, and the sticky split."""

from __future__ import annotations

import logging

import pytest
import structlog

from shim.numbers import (
    VAPI_INBOUND_URL,
    NumberInputError,
    Route,
    VoiceSettings,
    answers_on_shim,
    check_e164,
    check_percent,
    plan_migrate,
    points_to,
    split_bucket,
)

PUBLIC = "https://shim.example.com"
VAPI = VoiceSettings(
    voice_url=VAPI_INBOUND_URL, voice_method="POST", voice_fallback_url="", voice_fallback_method="POST",
    status_callback="https://api.vapi.ai/twilio/call_status", status_callback_method="POST",
)


@pytest.mark.parametrize("number", ["+15551234567", "+442071838750", "+8613800138000"])
def test_e164_accepts(number):
    assert check_e164(number) == number


@pytest.mark.parametrize("number", ["5551234567", "+05551234567", "+1 555 123 4567", "+1555", "+1555123456789012", "", "tel:+15551234567"])
def test_e164_rejects_naming_the_value(number):
    with pytest.raises(NumberInputError, match="expected E.164"):
        check_e164(number)


@pytest.mark.parametrize("raw, ok", [("0", 0), ("30", 30), ("100", 100), ("101", None), ("-1", None), ("12.5", None), ("ten", None), (" 5", 5)])
def test_percent(raw, ok):
    if ok is None:
        with pytest.raises(NumberInputError, match="0 to 100"):
            check_percent(raw)
    else:
        assert check_percent(raw) == ok


def test_points_to():
    assert points_to(VAPI_INBOUND_URL, PUBLIC) == "vapi"
    assert points_to(PUBLIC + "/twilio/voice", PUBLIC + "/") == "shim"
    assert points_to("https://shim.example.com.evil.test/twilio/voice", PUBLIC) == "other"
    assert points_to("https://handler.twilio.com/twiml/EH123", PUBLIC) == "other"
    assert points_to(None, PUBLIC) == "other"


def test_first_migrate_records_current_settings_and_falls_back_to_them():
    plan = plan_migrate(current=VAPI, recorded=None, assistant_before=None, assistant_after="receptionist", public_url=PUBLIC)
    assert plan.previous == VAPI
    assert plan.target.to_json() == {
        "VoiceUrl": PUBLIC + "/twilio/voice", "VoiceMethod": "POST",
        "VoiceFallbackUrl": VAPI_INBOUND_URL, "VoiceFallbackMethod": "POST",
        "StatusCallback": PUBLIC + "/twilio/status", "StatusCallbackMethod": "POST",
    }
    assert set(plan.twilio_changes) == {"VoiceUrl", "VoiceFallbackUrl", "StatusCallback"}
    assert plan.changes_anything


def test_second_migrate_changes_nothing_and_keeps_the_first_record():
    first = plan_migrate(current=VAPI, recorded=None, assistant_before=None, assistant_after="a", public_url=PUBLIC)
    again = plan_migrate(current=first.target, recorded=first.previous, assistant_before="a", assistant_after="a", public_url=PUBLIC)
    assert again.previous == VAPI and not again.twilio_changes and not again.changes_anything
    other_assistant = plan_migrate(current=first.target, recorded=VAPI, assistant_before="a", assistant_after="b", public_url=PUBLIC)
    assert other_assistant.changes_anything and not other_assistant.twilio_changes


def test_migrate_repairs_drift_and_rerecords_a_number_moved_back_outside_the_shim():
    first = plan_migrate(current=VAPI, recorded=None, assistant_before=None, assistant_after="a", public_url=PUBLIC)
    drifted = VoiceSettings(**{**first.target.__dict__, "status_callback": ""})
    repair = plan_migrate(current=drifted, recorded=VAPI, assistant_before="a", assistant_after="a", public_url=PUBLIC)
    assert repair.previous == VAPI and set(repair.twilio_changes) == {"StatusCallback"}
    moved = VoiceSettings(voice_url="https://example.com/ivr", voice_method="GET")
    again = plan_migrate(current=moved, recorded=VAPI, assistant_before="a", assistant_after="a", public_url=PUBLIC)
    assert again.previous == moved and again.target.voice_fallback_url == "https://example.com/ivr"
    assert again.target.voice_fallback_method == "GET" and again.notes


def test_migrate_refuses_what_it_could_not_undo():
    with pytest.raises(NumberInputError, match="no previous settings were recorded"):
        plan_migrate(current=VoiceSettings(voice_url=PUBLIC + "/twilio/voice"), recorded=None, assistant_before=None,
                     assistant_after="a", public_url=PUBLIC, number="+15551234567")
    with pytest.raises(NumberInputError, match="TwiML App AP1"):
        plan_migrate(current=VAPI, recorded=None, assistant_before=None, assistant_after="a", public_url=PUBLIC,
                     voice_application_sid="AP1", number="+15551234567")


def test_none_and_empty_are_the_same_setting_and_methods_ignore_case():
    a = VoiceSettings(voice_url=None, voice_method="post")
    b = VoiceSettings(voice_url="", voice_method="POST")
    assert a.differences(b) == {}
    assert VoiceSettings.from_json(VAPI.to_json()) == VAPI
    assert VoiceSettings(voice_url=None, voice_method="").update_params() == {
        "voice_url": "", "voice_fallback_url": "", "status_callback": ""}  # clear URLs; leave empty methods alone
    with pytest.raises(ValueError, match="unknown keys"):
        VoiceSettings.from_json({"VoiceUrl": "x", "SmsUrl": "y"})


def test_split_is_sticky_monotone_and_near_its_percentage():
    number = "+15551234567"
    callers = [f"+1415{n:07d}" for n in range(5000)]
    on_shim_30 = {c for c in callers if answers_on_shim(number, c, 30)}
    assert 0.27 < len(on_shim_30) / len(callers) < 0.33
    assert on_shim_30 == {c for c in callers if answers_on_shim(number, c, 30)}  # sticky
    on_shim_10 = {c for c in callers if answers_on_shim(number, c, 10)}
    assert on_shim_10 < on_shim_30  # raising the share only moves callers onto the shim
    assert all(answers_on_shim(number, c, 100) for c in callers[:50])
    assert not any(answers_on_shim(number, c, 0) for c in callers[:50])
    # the same caller may land on different sides of different numbers
    assert {split_bucket("+15550000001", c) for c in callers[:20]} != {split_bucket("+15550000002", c) for c in callers[:20]}


def test_route_without_a_redirect_target_keeps_every_caller():
    assert Route("+15551234567", "a", split_percent=0).on_shim("+14155550000")
    route = Route.from_row({"number": "+15551234567", "assistant_id": "a", "server_url": None, "split_percent": 0,
                            "previous_settings": '{"VoiceUrl": "https://api.vapi.ai/twilio/inbound_call", "VoiceMethod": "post"}'})
    assert not route.on_shim("+14155550000") and route.redirect_method == "POST"
    assert Route.from_json(route.to_json()) == route


@pytest.mark.parametrize("assistant, message", [
    ("../assistants/demo", "expected an assistant id"),  # a file exists there, but the voice webhook refuses such an id
    ("nobody", "nobody.json"),
])
def test_set_refuses_an_assistant_the_voice_webhook_would_not_answer_with(monkeypatch, capsys, tmp_path, assistant, message):
    import shutil
    from pathlib import Path

    from shim.cli import main

    assistants = tmp_path / "assistants"
    assistants.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "assistants" / "demo.json", assistants / "demo.json")
    monkeypatch.setenv("SHIM_ASSISTANTS_DIR", str(assistants))
    monkeypatch.setenv("SHIM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DATABASE_URL", "postgresql://shim@127.0.0.1:9/shim")  # never reached: the check comes first
    handlers = list(logging.getLogger().handlers)
    try:
        code = main(["numbers", "set", "+15550001111", "--assistant", assistant])
    finally:  # the CLI configures logging for its process: leave the test process as it was
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = handlers
    err = capsys.readouterr().err
    assert code == 2 and message in err and repr(assistant) in err


def test_redact_url_hides_only_the_password():
    from shim.numbers import redact_url

    assert redact_url("https://ivr:s3cret@ivr.example.com/answer?x=1") == "https://ivr:***@ivr.example.com/answer?x=1"
    assert redact_url("https://ivr@ivr.example.com/answer") == "https://ivr@ivr.example.com/answer"
    assert redact_url(VAPI_INBOUND_URL) == VAPI_INBOUND_URL
    assert redact_url("") == "" and redact_url(None) is None


def test_migrate_says_when_a_status_callback_of_the_customers_own_stops_getting_events():
    crm = VoiceSettings(**{**VAPI.__dict__, "status_callback": "https://crm:pw@crm.example.com/twilio-status"})
    plan = plan_migrate(current=crm, recorded=None, assistant_before=None, assistant_after="a", public_url=PUBLIC)
    assert [n for n in plan.notes if "StatusCallback https://crm:***@crm.example.com/twilio-status" in n and "rollback" in n]
    vapi_only = plan_migrate(current=VAPI, recorded=None, assistant_before=None, assistant_after="a", public_url=PUBLIC)
    assert not vapi_only.notes
