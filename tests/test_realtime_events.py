"""Realtime GA server events -> typed events, and the OpenAI Realtime backend adapter."""

from __future__ import annotations

import orjson
import pytest

from shim import model_events as me
from shim import realtime_events as rt
from shim.openai_realtime import OpenAIRealtime, counter_ids


def ev(type_, **kw) -> bytes:
    return orjson.dumps({"type": type_, **kw})


class Sink:
    def __init__(self):
        self.audio: list[tuple[str, str, str]] = []
        self.events: list[me.ModelEvent] = []
        self.rejected: list[str] = []

    def on_model_audio(self, response_id, item_id, audio_b64):
        self.audio.append((response_id, item_id, audio_b64))

    def on_model_event(self, event):
        self.events.append(event)

    def on_model_event_rejected(self, error):
        self.rejected.append(str(error))


def test_parse_gives_typed_events():
    assert rt.parse(ev("input_audio_buffer.speech_started", audio_start_ms=120, item_id="u1")) == me.SpeechStarted("u1", 120)
    assert rt.parse(ev("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="u1")) == me.SpeechStopped("u1", 900)
    assert rt.parse(ev("conversation.item.input_audio_transcription.completed", item_id="u1", content_index=0,
                       transcript="hello")) == me.UserTranscript("u1", "hello")
    assert rt.parse(ev("response.created", response={"id": "r1", "metadata": {"shim_id": "shim_4", "purpose": "greeting"}})) \
        == me.ResponseStarted("r1", "shim_4", "greeting")
    assert rt.parse(ev("response.created", response={"id": "r2"})) == me.ResponseStarted("r2", None, None)
    assert rt.parse(ev("response.output_audio.delta", response_id="r1", item_id="i1", output_index=0, content_index=0,
                       delta="AAAA")) == me.AudioDelta("r1", "i1", "AAAA")
    assert rt.parse(ev("response.output_audio_transcript.done", response_id="r1", item_id="i1", output_index=0,
                       content_index=0, transcript="Hi.")) == me.TranscriptDone("i1", "Hi.")
    assert rt.parse(ev("response.output_item.done", response_id="r1", output_index=0, item={
        "id": "fc1", "type": "function_call", "status": "completed", "call_id": "c1", "name": "lookup",
        "arguments": '{"a": 1}'})) == me.FunctionCall("c1", "lookup", '{"a": 1}')
    assert rt.parse(ev("response.done", response={"id": "r1", "status": "failed", "status_details": {"error": {"code": "x"}}})) \
        == me.ResponseDone("r1", "failed", {"code": "x"})


def test_response_done_carries_the_billed_usage():
    usage = {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
             "input_token_details": {"text_tokens": 5, "audio_tokens": 15}}
    assert rt.parse(ev("response.done", response={"id": "r1", "status": "completed", "usage": usage})) \
        == me.ResponseDone("r1", "completed", None, usage)
    for odd in (None, "lots", [], {}):  # absent or not an object: no usage, the event still counts
        assert rt.parse(ev("response.done", response={"id": "r1", "status": "completed", "usage": odd})).usage is None


def test_a_cancelled_function_call_item_is_not_a_function_call():
    event = rt.parse(ev("response.output_item.done", item={"type": "function_call", "status": "incomplete",
                                                           "call_id": "c1", "name": "x", "arguments": "{}"}))
    assert event == me.Unhandled("response.output_item.done")


def test_unknown_event_types_are_typed_not_dropped():
    assert rt.parse(ev("rate_limits.updated", rate_limits=[])) == me.Unhandled("rate_limits.updated")


@pytest.mark.parametrize(("frame", "message"), [
    (b"not json", "frame is not JSON"),
    (b"[1]", "expected a JSON object"),
    (orjson.dumps({"no": "type"}), "type=None: expected a string"),
    (ev("response.done", response={"status": "completed"}), "response.done.response.id=None: expected a string"),
    (ev("response.created"), "response.created.response=None: expected an object"),
    (ev("input_audio_buffer.speech_started", item_id=7), "input_audio_buffer.speech_started.item_id=7: expected a string"),
    (ev("input_audio_buffer.speech_stopped", item_id="u", audio_end_ms="9"), "audio_end_ms='9': expected a number"),
    (ev("response.output_audio_transcript.done", item_id="i1"), "transcript=None: expected a string"),
])
def test_malformed_events_name_the_field_the_value_and_what_was_expected(frame, message):
    with pytest.raises(me.ModelProtocolError, match=message.replace("(", r"\(").replace("[", r"\[")):
        rt.parse(frame)


def test_errors_are_classified_for_the_call():
    busy = rt.parse(ev("error", error={"type": "invalid_request_error", "code": "conversation_already_has_active_response",
                                       "message": "busy", "event_id": "shim_3"}))
    assert busy == me.ModelError("conversation_already_has_active_response", "busy", None, "shim_3", busy=True)
    fatal = rt.parse(ev("error", error={"type": "invalid_request_error", "code": "session_expired", "message": "60 min"}))
    assert fatal.fatal and not fatal.busy


def test_adapter_audio_fast_path_and_session_handshake():
    backend, sink = OpenAIRealtime(counter_ids()), Sink()
    backend.configure({"type": "realtime"})
    assert backend.out == []  # the session does not exist yet
    backend.feed(ev("session.created", session={}), sink)
    (update,) = [orjson.loads(f) for f in backend.out]
    assert update == {"type": "session.update", "event_id": "shim_1", "session": {"type": "realtime"}}
    backend.feed(ev("session.updated", session={"audio": {"input": {"format": {"type": "audio/pcmu"}},
                                                          "output": {"format": {"type": "audio/pcmu"}}}}), sink)
    backend.feed(ev("response.output_audio.delta", response_id="r1", item_id="i1", output_index=0, content_index=0,
                    delta="AAAA"), sink)
    assert sink.events == [me.SessionReady()] and sink.audio == [("r1", "i1", "AAAA")]


def test_adapter_rejects_a_session_that_is_not_mulaw():
    backend, sink = OpenAIRealtime(), Sink()
    backend.feed(ev("session.updated", session={"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                                          "output": {"format": {"type": "audio/pcmu"}}}}), sink)
    (rejected,) = sink.events
    assert type(rejected) is me.SessionRejected and rejected.formats == ["audio/pcm", "audio/pcmu"]


def test_adapter_swallows_a_late_cancel_and_reports_malformed_frames():
    backend, sink = OpenAIRealtime(), Sink()
    backend.feed(ev("error", error={"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "x"}), sink)
    backend.feed(ev("response.output_audio.delta", response_id="r1", item_id=None, delta="AAAA"), sink)
    assert sink.events == [] and sink.audio == []
    assert sink.rejected == ["response.output_audio.delta.item_id=None: expected a string"]


def test_adapter_commands_are_realtime_client_events_with_injected_ids():
    backend = OpenAIRealtime(counter_ids("e"))
    backend.feed(ev("session.created", session={}), Sink())  # the socket's session exists
    backend.append_audio("AAAA")
    backend.create_response("req_1", "Say hi", "greeting")
    backend.cancel_response("r1")
    backend.truncate_item("i1", 250)
    backend.delete_item("i2")
    backend.add_message("system", "note")
    backend.send_tool_result("c1", "ok")
    frames = [orjson.loads(f) for f in backend.out]
    assert frames == [
        {"type": "input_audio_buffer.append", "audio": "AAAA"},
        {"type": "response.create", "event_id": "req_1",
         "response": {"instructions": "Say hi", "metadata": {"purpose": "greeting", "shim_id": "req_1"}}},
        {"type": "response.cancel", "event_id": "e1", "response_id": "r1"},
        {"type": "conversation.item.truncate", "event_id": "e2", "item_id": "i1", "content_index": 0, "audio_end_ms": 250},
        {"type": "conversation.item.delete", "event_id": "e3", "item_id": "i2"},
        {"type": "conversation.item.create", "event_id": "e4",
         "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "note"}]}},
        {"type": "conversation.item.create", "event_id": "e5",
         "item": {"type": "function_call_output", "call_id": "c1", "output": "ok"}},
    ]
    url, headers = backend.connect_target("ws://h/v1/realtime", "gpt-realtime", "sk-1")
    assert url == "ws://h/v1/realtime?model=gpt-realtime" and headers == {"Authorization": "Bearer sk-1"}
