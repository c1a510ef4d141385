"""Vapi assistant JSON -> Realtime session + call policy + findings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vapi.core.pydantic_utilities import parse_obj_as
from vapi.types import Assistant

from shim.assistant import AssistantError, CallContext
from shim.testing.fake_realtime import CLIENT, find_extras
from shim.translate import FIELDS, translate

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "vapi"  # copies of ../shared/reference/vapi-fixtures
OWN = Path(__file__).parent / "fixtures"
CTX = CallContext(call_sid="CA123", from_number="+15550001111", to_number="+15550002222",
                  variables={"vip": "yes"}, now=datetime(2026, 3, 2, 17, 5, tzinfo=timezone.utc))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def saved_tools() -> dict:
    return {t["id"]: t for t in load(FIXTURES / "luna_trattoria.tools.json")}


def assert_valid_session(session: dict) -> None:
    """The session validates as a GA session.update with no unknown keys."""
    event = CLIENT.validate_python({"type": "session.update", "session": session})
    assert find_extras(event) == []
    # what the real API rejects although the SDK type allows it
    assert "temperature" not in json.dumps(session)
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}


ASSISTANT_FILES = sorted(FIXTURES.glob("*.assistant.json")) + sorted(OWN.glob("*.assistant.json"))


@pytest.mark.parametrize("path", ASSISTANT_FILES, ids=lambda p: p.name)
def test_every_fixture_translates_to_a_valid_session(path):
    assistant = load(path)
    parse_obj_as(Assistant, assistant)  # the input is valid Vapi JSON
    setup = translate(path.stem, assistant, CTX, model="gpt-realtime-2.1", saved_tools=saved_tools())
    assert_valid_session(setup.session)
    assert setup.findings  # every export has something to report
    for finding in setup.findings:
        assert finding.status in ("mapped", "approximated", "unsupported")


def every_field():
    return translate("every-field", load(OWN / "every_field.assistant.json"), CTX, model="gpt-realtime-2.1")


def test_every_field_fixture_does_what_vapi_did():
    setup = every_field()
    s, p = setup.session, setup.policy
    assert s["instructions"] == (
        "You are the after-hours line of Northwind HVAC. Today is Monday. Caller: +15550001111. "
        "Line: +15550002222. Call CA123. The caller is a VIP."
    )
    assert p.few_shot == (("user", "Is this the emergency line?"),
                          ("assistant", "Yes, this line handles urgent heating and cooling problems."))
    assert s["max_output_tokens"] == 2400
    assert s["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "cedar", "speed": 1.1}
    assert s["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe", "language": "en", "prompt": "Northwind, furnace"}
    assert s["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 600
    assert s["audio"]["input"]["noise_reduction"] == {"type": "near_field"}
    assert [t["name"] for t in s["tools"]] == ["check_technician", "transferCall", "endCall", "dtmf"]
    assert s["tools"][1]["parameters"]["properties"]["destination"]["enum"] == ["+15551230000"]
    assert setup.greeting.text == "Northwind after-hours line, how can I help?" and setup.greeting.interruptible
    assert p.barge_in_voice_ms == 400  # numWords 1 wins over voiceSeconds, as on Vapi
    assert p.end_call_phrases == ("goodbye", "have a good night")
    assert p.end_call_message == "Thanks for calling Northwind. Goodbye."
    assert (p.max_duration_s, p.silence_timeout_s) == (900, 45)
    assert p.background_sound == "office" and p.recording and not p.hipaa
    by_path = {f.path: f.status for f in setup.findings}
    assert by_path["model.temperature"] == "unsupported"
    assert by_path["stopSpeakingPlan.numWords"] == "approximated"
    assert by_path["voice.stability"] == "unsupported"
    assert by_path["startSpeakingPlan.transcriptionEndpointingPlan"] == "unsupported"


def test_vapi_defaults_apply_to_absent_fields():
    setup = translate("min", load(FIXTURES / "minimal.assistant.json"), CTX, model="gpt-realtime-2.1")
    p = setup.policy
    assert (p.max_duration_s, p.silence_timeout_s) == (600, 30)
    assert p.background_sound == "office" and p.recording
    assert p.barge_in_voice_ms == 200
    assert setup.greeting.mode == "assistant-speaks-first" and not setup.greeting.interruptible
    assert setup.session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 400
    assert "max_output_tokens" not in setup.session  # Vapi's 250 text tokens would cut audio short
    assert setup.voice == "marin"


@pytest.mark.parametrize(
    "change,path,expected",
    [
        ({"firstMessage": 5}, "firstMessage", "str"),
        ({"firstMessageMode": "talk-first"}, "firstMessageMode", "assistant-speaks-first"),
        ({"maxDurationSeconds": "600"}, "maxDurationSeconds", "int or float"),
        ({"maxDurationSeconds": 5}, "maxDurationSeconds", "10 to 43200"),
        ({"startSpeakingPlan": {"waitSeconds": 9}}, "startSpeakingPlan.waitSeconds", "0 to 5"),
        ({"endCallPhrases": ["bye", 3]}, "endCallPhrases[1]", "a string"),
        ({"backgroundSound": "jungle"}, "backgroundSound", "URL"),
        ({"model": {"messages": [{"role": "narrator", "content": "x"}]}}, "model.messages[0].role", "system"),
        ({"model": {"tools": [{"type": "teleport"}]}}, "model.tools[0].type", "a Vapi tool type"),
        ({"model": {"toolIds": ["nope"]}}, "model.toolIds[0]", "saved tool"),
    ],
)
def test_invalid_input_names_the_field_the_value_and_what_was_expected(change, path, expected):
    assistant = {**load(FIXTURES / "minimal.assistant.json"), **change}
    with pytest.raises(AssistantError) as err:
        translate("bad", assistant, CTX, model="gpt-realtime-2.1")
    assert err.value.path == path
    assert expected in str(err.value)


def test_unknown_fields_are_findings_not_silence():
    assistant = {**load(FIXTURES / "minimal.assistant.json"), "sparkleMode": True}
    setup = translate("x", assistant, CTX, model="gpt-realtime-2.1")
    assert any(f.path == "sparkleMode" and f.status == "unsupported" for f in setup.findings)


def test_smart_endpointing_becomes_semantic_vad_with_a_justified_eagerness():
    base = load(FIXTURES / "minimal.assistant.json")
    for plan, eagerness in [({"provider": "livekit", "waitFunction": "200 + 8000 * x"}, "low"),
                            ({"provider": "livekit", "waitFunction": "100 + 1900 * x"}, "high"),
                            ({"provider": "vapi"}, "auto")]:
        setup = translate("x", {**base, "startSpeakingPlan": {"smartEndpointingPlan": plan}}, CTX, model="m")
        td = setup.session["audio"]["input"]["turn_detection"]
        assert td["type"] == "semantic_vad" and td["eagerness"] == eagerness
        assert_valid_session(setup.session)


def test_voice_map_is_overridable():
    base = load(FIXTURES / "minimal.assistant.json")
    assistant = {**base, "voice": {"provider": "11labs", "voiceId": "sarah"}}
    assert translate("x", assistant, CTX, model="m").voice == "marin"
    assert translate("x", assistant, CTX, model="m", voice_overrides={"Sarah": "coral"}).voice == "coral"
    assistant = {**base, "voice": {"provider": "openai", "voiceId": "nova"}}
    assert translate("x", assistant, CTX, model="m").voice == "shimmer"  # nova is not a Realtime voice


def test_readme_field_table_matches_the_translator():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- fields:start -->")[1].split("<!-- fields:end -->")[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (.+?) \|$", block, re.M)
    assert [(path, status) for path, status, _ in rows] == [(f.path, f.status) for f in FIELDS]


# --- the CLI ---------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "shim.cli", "translate", *args], capture_output=True, text=True)


def test_cli_prints_the_session_and_findings():
    out = run_cli(str(FIXTURES / "luna_trattoria.assistant.json"), "--tools", str(FIXTURES / "luna_trattoria.tools.json"),
                  "--var", "restaurant=Luna")
    assert out.returncode == 0, out.stderr
    session = json.loads(out.stdout)
    assert_valid_session(session)
    assert len(session["tools"]) == 4
    assert "unsupported" in out.stderr and "model.temperature" in out.stderr


@pytest.mark.parametrize(
    "content,message",
    [("not json", "not JSON"), ('{"firstMessage": 1}', "firstMessage: got 1, expected str"),
     ('{"model": {"toolIds": ["t1"]}}', "model.toolIds[0]")],
)
def test_cli_refuses_invalid_input_with_a_clear_error(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_text(content)
    out = run_cli(str(path))
    assert out.returncode != 0 and out.stdout == ""
    assert message in out.stderr


# --- robustness ------------------------------------------------------------------------------

optional = {
    "firstMessage": st.text(max_size=40),
    "firstMessageMode": st.sampled_from(["assistant-speaks-first", "assistant-waits-for-user",
                                         "assistant-speaks-first-with-model-generated-message"]),
    "firstMessageInterruptionsEnabled": st.booleans(),
    "voice": st.fixed_dictionaries({"provider": st.sampled_from(["11labs", "openai", "azure", "cartesia"]),
                                    "voiceId": st.text(max_size=12)}),
    "endCallPhrases": st.lists(st.text(max_size=10), max_size=3),
    "maxDurationSeconds": st.integers(10, 43200),
    "silenceTimeoutSeconds": st.integers(10, 3600),
    "backgroundSound": st.sampled_from(["off", "office", "https://example.com/a.wav"]),
    "startSpeakingPlan": st.fixed_dictionaries({"waitSeconds": st.floats(0, 5)}),
    "stopSpeakingPlan": st.fixed_dictionaries({"numWords": st.integers(0, 10), "voiceSeconds": st.floats(0, 0.5)}),
    "transcriber": st.fixed_dictionaries({"provider": st.just("deepgram"), "language": st.sampled_from(["en", "en-US", "multi", "es"])}),
    "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    "hipaaEnabled": st.booleans(),
    "endCallMessage": st.text(max_size=20),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=optional), st.text(max_size=60))
def test_odd_but_valid_assistants_never_raise_and_stay_valid(fields, prompt):
    assistant = {"model": {"provider": "openai", "model": "gpt-4o",
                           "messages": [{"role": "system", "content": prompt.replace("{", "(").replace("%", "")}]},
                 **fields}
    setup = translate("x", assistant, CTX, model="gpt-realtime-2.1")
    assert_valid_session(setup.session)


def test_a_tool_or_server_url_that_is_not_http_is_reported_when_the_assistant_is_read():
    assistant = load(FIXTURES / "minimal.assistant.json")
    assistant["server"] = {"url": "ftp://user:secret@hooks.example/vapi"}
    assistant["model"]["tools"] = [
        {"type": "function", "function": {"name": "lookup"}, "server": {"url": "file:///etc/passwd"}},
        {"type": "function", "function": {"name": "fine"}, "server": {"url": "https://hooks.example/ok"}},
    ]
    setup = translate("min", assistant, CTX, model="gpt-realtime-2.1")
    bad = {f.path: f.detail for f in setup.findings if "only http(s)" in f.detail}
    assert set(bad) == {"server.url", "model.tools[0].server.url"}
    assert all("secret" not in detail for detail in bad.values())  # only the scheme is named


def test_a_parsed_template_is_reused_but_every_call_gets_its_own_values():
    """Templates are parsed once per text (shim.assistant._parsed), rendered per call: two calls
    of one assistant never see each other's values, and a bad template fails every time."""
    from shim.assistant import _parsed, render

    template = "Caller {{customer.number}} at {{ now }}"
    first = render(template, {"customer": {"number": "+15550001111"}, "now": "9:00"}, "firstMessage")
    hits = _parsed.cache_info().hits
    second = render(template, {"customer": {"number": "+15550002222"}, "now": "9:01"}, "firstMessage")
    assert (first, second) == ("Caller +15550001111 at 9:00", "Caller +15550002222 at 9:01")
    assert _parsed.cache_info().hits == hits + 1
    assert render("Plain text, no tags", {}, "firstMessage") == "Plain text, no tags"
    for _ in range(2):
        with pytest.raises(AssistantError, match="firstMessage"):
            render("Hello {{ customer.number ", {}, "firstMessage")
