"""A caller turn that ends while a response is active must still be answered.

The shim configures server VAD with `interrupt_response: false`, and then the server's own reply
to a finished turn "may fail to create a response if the model is already responding" (the
`create_response` docstring of the openai SDK's turn-detection types). So when a caller turn ends
while a response nobody cancelled is still running, the shim must ask for the reply itself once
that response is done; otherwise the caller's words get no answer.

Found by `shim parity run` at concurrency 20: the caller's second turn ("Nine works, book it.")
began while the first turn's tool webhook ran; the tool's answer started a response mid-turn, the
turn ended under it, and `book_appointment` was never called. These tests replay that exact event
sequence through the public API of `Call` only, so they run unchanged against a rewritten core.
"""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import structlog

from shim.assistant import CallContext
from shim.call import Call
from shim.call_effects import ToolRequest
from shim.translate import translate
from shim_tools.results import parse_tool_response
from tests.test_call import Rows  # the recording RecordSink the call tests share


def tool(name: str) -> dict:
    # request-start with empty content: no filler is spoken while the webhook runs (as in the parity scenario)
    return {"type": "function", "messages": [{"type": "request-start", "content": ""}],
            "function": {"name": name, "parameters": {"type": "object", "properties": {}}},
            "server": {"url": "https://tools.example.com/hook"}}


ASSISTANT = {
    "name": "Booker",
    "model": {"provider": "openai", "model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."}],
              "tools": [tool("check_availability"), tool("book_appointment")]},
    "firstMessage": "Hi.",
    "backgroundSound": "off",
}
PCMU = {"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}


def start_frame() -> str:
    return orjson.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
        "start": {"accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                  "customParameters": {"from": "+15550001111", "to": "+15550002222"}},
    }).decode()


def ev(type_: str, **kw) -> bytes:
    return orjson.dumps({"type": type_, **kw})


class Model:
    """The Realtime side of one call: feeds server events to `Call`, reads what it sent."""

    def __init__(self, assistant: dict = ASSISTANT):
        self.now = 1000.0
        self.call = Call(Rows(), log=structlog.get_logger(), clock=lambda: self.now,
                         wall=lambda: datetime(2026, 12, 2, 11, 0, tzinfo=timezone.utc))
        self.call.on_twilio_text(start_frame())
        ctx = CallContext(call_sid="CA1", from_number="+15550001111", to_number="+15550002222",
                          now=datetime(2026, 12, 2, tzinfo=timezone.utc))
        self.call.on_setup(translate("booker", assistant, ctx, model="gpt-realtime-2.1"))
        self.send("session.created", session={})
        self.send("session.updated", session=PCMU)

    def send(self, type_: str, **kw) -> None:
        self.call.on_model_text(ev(type_, **kw))

    def out(self) -> list[dict]:
        return [orjson.loads(m) for m in self.call.take_model_out()]

    def tool_requests(self) -> list[ToolRequest]:
        """The webhooks the call asked its shell to run since the last look (its effects)."""
        return [e for e in self.call.take_effects() if type(e) is ToolRequest]

    def creates(self) -> list[dict]:
        return [e for e in self.out() if e["type"] == "response.create"]

    def respond(self, resp: str, *, metadata: dict | None = None, speak: str = "", call: tuple[str, str] | None = None,
                done: bool = True) -> None:
        """A response as the server streams it: created, audio and/or one function call, done."""
        self.send("response.created", response={"id": resp, "status": "in_progress", "metadata": metadata})
        if speak:
            item = "item_" + resp
            self.send("response.output_audio_transcript.delta", response_id=resp, item_id=item, output_index=0,
                      content_index=0, delta=speak)
            self.send("response.output_audio.delta", response_id=resp, item_id=item, output_index=0, content_index=0,
                      delta="/w==" * 40)
            self.send("response.output_audio_transcript.done", response_id=resp, item_id=item, output_index=0,
                      content_index=0, transcript=speak)
        if call is not None:
            name, call_id = call
            self.send("response.output_item.done", response_id=resp, output_index=0,
                      item={"id": "fc_" + call_id, "type": "function_call", "status": "completed", "call_id": call_id,
                            "name": name, "arguments": "{}"})
        if done:
            self.done(resp)

    def done(self, resp: str) -> None:
        self.send("response.done", response={"id": resp, "status": "completed"})

    def caller_turn(self, item: str, start_ms: int, *, end_ms: int | None = None) -> None:
        self.send("input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=item)
        if end_ms is not None:
            self.caller_stops(item, end_ms)

    def caller_stops(self, item: str, end_ms: int) -> None:
        self.send("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item)
        self.send("input_audio_buffer.committed", item_id=item, previous_item_id=None)

    def tool_answers(self, call_id: str) -> None:
        body = orjson.dumps({"results": [{"toolCallId": call_id, "result": "ok"}]})
        self.call.on_tool_outcome(parse_tool_response([call_id], http_status=200, body=body)[call_id])


def greeted() -> Model:
    model = Model()
    (greeting,) = model.creates()
    model.respond("resp_greeting", metadata=greeting["response"]["metadata"], speak="Hi.")
    return model


def test_a_turn_that_ends_under_the_tool_answer_is_answered_after_it():
    """The failing parity run, event for event (session of call CAf506c9…, concurrency 20)."""
    model = greeted()
    # Turn 1; the server answers it by itself with a function call.
    model.caller_turn("item_turn1", 0, end_ms=760)
    model.respond("resp_vad1", call=("check_availability", "call_check"))
    [request] = model.tool_requests()
    assert request.call_id == "call_check"
    assert model.creates() == []  # no filler: the webhook runs in silence
    # Turn 2 starts while the webhook runs: nothing is playing, an ordinary turn.
    model.caller_turn("item_turn2", 900)
    # The webhook answers mid-turn: the output, then our response.create (nothing is active).
    model.tool_answers("call_check")
    out = model.out()
    assert [e["type"] for e in out] == ["conversation.item.create", "response.create"]
    answer = out[1]
    model.respond("resp_answer", metadata=answer["response"]["metadata"], speak="Free at nine.", done=False)
    # Turn 2 ends while our answer is generating: the server's own reply for it cannot start.
    model.caller_stops("item_turn2", 1900)
    assert model.creates() == []  # not while a response is active: it would be refused
    model.done("resp_answer")
    # ... so the shim asks for it once the answer is done: the caller's turn is not lost.
    [reply] = model.creates()
    model.respond("resp_reply", metadata=reply["response"]["metadata"], call=("book_appointment", "call_book"))
    assert [r.binding.realtime_name for r in model.tool_requests()] == ["book_appointment"]


def test_a_turn_that_ends_during_the_uninterruptible_greeting_is_answered_after_it():
    model = Model()
    (greeting,) = model.creates()
    model.respond("resp_greeting", metadata=greeting["response"]["metadata"], speak="Hi.", done=False)
    model.caller_turn("item_turn1", 0, end_ms=700)  # firstMessageInterruptionsEnabled defaults to false
    assert model.creates() == []
    model.done("resp_greeting")
    [reply] = model.creates()
    assert reply["response"]["metadata"]["purpose"] == "reply"


def test_a_turn_that_ends_with_nothing_active_is_left_to_the_server():
    """The server replies by itself (create_response): a request of ours would be a second reply."""
    model = greeted()
    model.caller_turn("item_turn1", 0, end_ms=760)
    model.respond("resp_vad1", speak="Sure.")
    assert model.creates() == []


def test_a_turn_that_barged_in_is_left_to_the_server():
    """The caller cut the assistant off: that response is cancelled, so the server's own reply starts."""
    model = Model(dict(ASSISTANT, firstMessageMode="assistant-waits-for-user", stopSpeakingPlan={"voiceSeconds": 0}))
    model.caller_turn("item_turn1", 0, end_ms=760)
    model.respond("resp_vad1", speak="Sure, let me tell you all about it.", done=False)
    model.caller_turn("item_turn2", 1500)
    assert "response.cancel" in [e["type"] for e in model.out()]
    model.caller_stops("item_turn2", 2500)
    model.send("response.done", response={"id": "resp_vad1", "status": "cancelled"})
    assert model.creates() == []
