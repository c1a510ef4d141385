"""The call state machine, without sockets: frames and events in, frames, events and rows out."""

from __future__ import annotations

import base64
import random
import weakref
from datetime import datetime, timezone

import orjson
import pytest
import structlog

from shim import twilio_media as tw
from shim.assistant import AssistantNotFound, CallContext
from shim.call import SAY_EXACTLY, Call, Phase, heard_text
from shim.call_effects import ResolveAssistant, ToolRequest
from shim.translate import translate

MINIMAL = {
    "name": "Acme",
    "model": {"provider": "openai", "model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief. Caller: {{customer.number}}"}]},
    "firstMessage": "Hi, thanks for calling Acme.",
    "backgroundSound": "off",
    # the shim's barge-in gate is tested on its own below; elsewhere interruptions are immediate
    "stopSpeakingPlan": {"voiceSeconds": 0},
}


class Rows:
    def __init__(self):
        self.upserts: list[tuple[str, dict, tuple]] = []
        self.inserts: list[tuple[str, dict]] = []

    def upsert(self, table, row, *, keep_existing=()):
        self.upserts.append((table, dict(row), keep_existing))

    def insert(self, table, row):
        self.inserts.append((table, dict(row)))

    def merged(self, table, key):
        """The final state of each row as the database would hold it."""
        out: dict = {}
        for t, row, keep in self.upserts:
            if t != table:
                continue
            k = tuple(row[c] for c in key)
            cur = out.setdefault(k, {})
            for col, val in row.items():
                if val is None:
                    continue
                if col in keep and cur.get(col) is not None:
                    continue
                cur[col] = val
        return out


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start_frame(params=None) -> str:
    return orjson.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
        "start": {"accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                  "customParameters": params or {"assistant": "acme", "from": "+15550001111", "to": "+15550002222"}},
    }).decode()


def media(payload: bytes, ts: int = 0) -> str:
    return orjson.dumps({"event": "media", "streamSid": "MZ1", "media": {"track": "inbound", "chunk": "1", "timestamp": str(ts), "payload": b64(payload)}}).decode()


def mark(name: str) -> str:
    return orjson.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": name}}).decode()


def ev(type_, **kw) -> bytes:
    return orjson.dumps({"type": type_, **kw})


def make_call(assistant=MINIMAL, **setup_kw):
    rows, clock = Rows(), Clock()

    def resolve(start):
        if start.custom_parameters.get("assistant") == "missing":
            raise AssistantNotFound("assistant", "missing", "a file")
        ctx = CallContext(call_sid=start.call_sid, from_number=start.custom_parameters.get("from", ""),
                          to_number=start.custom_parameters.get("to", ""),
                          now=datetime(2026, 11, 21, tzinfo=timezone.utc))
        return translate("acme", assistant, ctx, model="gpt-realtime-2.1", **setup_kw)

    call = Call(rows, log=structlog.get_logger(), clock=clock,
                wall=lambda: datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc), rng=random.Random(7))
    _SHELL[call] = (resolve, [])
    return call, rows, clock


# What the I/O shell does with the core's effects, reduced to what these tests need: resolve
# the assistant on ResolveAssistant; keep the other effects for the test to look at.
_SHELL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shell_step(call) -> None:
    resolve, seen = _SHELL[call]
    for effect in call.take_effects():
        if type(effect) is ResolveAssistant:
            try:
                call.on_setup(resolve(effect.start))
            except AssistantNotFound as exc:
                call.on_setup_failed(exc)
        else:
            seen.append(effect)


def twilio(call, text) -> None:
    """A Twilio frame in, then the shell's turn."""
    call.on_twilio_text(text)
    shell_step(call)


def take(call, kind) -> list:
    """The effects of one kind the core asked for since the last look."""
    shell_step(call)
    seen = _SHELL[call][1]
    out = [e for e in seen if type(e) is kind]
    seen[:] = [e for e in seen if type(e) is not kind]
    return out


def live_call(assistant=MINIMAL):
    call, rows, clock = make_call(assistant)
    twilio(call, start_frame())
    call.on_model_text(ev("session.created", session={}))
    call.on_model_text(ev("session.updated", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}))
    return call, rows, clock


def sent(call) -> list[dict]:
    return [orjson.loads(m) for m in call.take_model_out()]


def test_start_requests_model_and_session_update_carries_assistant():
    call, rows, _ = make_call()
    twilio(call, start_frame())
    assert call.phase is Phase.CONFIGURING  # the shell now opens the model socket
    call.on_model_text(ev("session.created", session={}))
    (update,) = sent(call)
    session = update["session"]
    assert update["type"] == "session.update"
    assert session["type"] == "realtime"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert session["instructions"] == "Be brief. Caller: +15550001111"
    assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 400  # Vapi default waitSeconds
    assert session["audio"]["input"]["transcription"]["model"]
    call_row = rows.merged("calls", ["call_sid"])[("CA1",)]
    assert call_row["assistant_id"] == "acme" and call_row["from_number"] == "+15550001111"


def test_caller_audio_waits_for_session_updated_then_flows_in_order():
    call, rows, _ = make_call()
    twilio(call, start_frame())
    twilio(call, media(b"\x01" * 160))
    twilio(call, media(b"\x02" * 160))
    assert call.take_model_out() == []
    call.on_model_text(ev("session.created", session={}))
    call.take_model_out()
    call.on_model_text(ev("session.updated", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}))
    out = sent(call)
    assert out[0]["type"] == "response.create"  # the greeting goes first
    assert '"Hi, thanks for calling Acme."' in out[0]["response"]["instructions"]
    appends = [e["audio"] for e in out if e["type"] == "input_audio_buffer.append"]
    assert appends == [b64(b"\x01" * 160), b64(b"\x02" * 160)]
    twilio(call, media(b"\x03" * 160))
    assert sent(call) == [{"type": "input_audio_buffer.append", "audio": b64(b"\x03" * 160)}]


def test_pcm_session_is_refused_not_relayed():
    call, rows, _ = make_call()
    twilio(call, start_frame())
    call.on_model_text(ev("session.updated", session={"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}, "output": {"format": {"type": "audio/pcmu"}}}}))
    assert call.end is not None and call.end.reason.startswith("pipeline-error-openai")
    assert call.end.next_action["verb"] == "hangup" and call.end.next_action["say"]


def test_model_audio_passes_through_with_a_mark_after_each_chunk():
    call, rows, _ = live_call()
    call.take_model_out()
    call.on_model_text(ev("response.created", response={"id": "resp_1"}))
    chunks = [bytes([i]) * 800 for i in range(3)]
    for c in chunks:
        call.on_model_text(ev("response.output_audio.delta", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, delta=b64(c)))
    frames = [orjson.loads(f) for f in call.take_twilio_out()]
    assert [f["event"] for f in frames] == ["media", "mark"] * 3
    assert [base64.b64decode(f["media"]["payload"]) for f in frames[::2]] == chunks
    assert all(f["streamSid"] == "MZ1" for f in frames)
    assert len({f["mark"]["name"] for f in frames[1::2]}) == 3


def _speak(call, item="item_1", resp="resp_1", chunks=5, size=800, metadata=None):
    call.on_model_text(ev("response.created", response={"id": resp, "metadata": metadata}))
    for i in range(chunks):
        call.on_model_text(ev("response.output_audio_transcript.delta", response_id=resp, item_id=item, output_index=0, content_index=0, delta="word " * 4))
        call.on_model_text(ev("response.output_audio.delta", response_id=resp, item_id=item, output_index=0, content_index=0, delta=b64(b"\x10" * size)))
    return [orjson.loads(f)["mark"]["name"] for f in call.take_twilio_out() if '"mark"' in f]


def test_barge_in_truncates_at_what_marks_confirm_played():
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user"))
    call.take_model_out()
    marks = _speak(call)  # 5 x 100 ms
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    for name in marks[:2]:  # 200 ms played
        twilio(call, mark(name))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=900, item_id="item_u1"))
    out = sent(call)
    assert {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 200}.items() <= out[0].items()
    assert [orjson.loads(f)["event"] for f in call.take_twilio_out()] == ["clear"]
    # marks echoed because of the clear do not count as played
    for name in marks[2:]:
        twilio(call, mark(name))
    utter = rows.merged("utterances", ["call_sid", "seq"])
    assistant = next(u for u in utter.values() if u.get("role") == "assistant")
    assert assistant["interrupted"] is True and assistant["heard_ms"] == 200
    assert assistant["full_text"] == "word " * 20
    assert assistant["text"] == ("word " * 8).strip()  # 2/5 of the words


def test_barge_in_before_any_audio_played_cancels_and_deletes_instead_of_truncating():
    call, rows, _ = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user"))
    call.take_model_out()
    _speak(call, chunks=2)
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=100, item_id="item_u1"))
    types = [e["type"] for e in sent(call)]
    assert "conversation.item.truncate" not in types
    assert types == ["response.cancel", "conversation.item.delete"]
    # late deltas of the cancelled response are not played
    call.take_twilio_out()
    call.on_model_text(ev("response.output_audio.delta", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, delta=b64(b"\x10" * 80)))
    call.on_model_text(ev("response.output_audio.delta", response_id="resp_1", item_id="item_2", output_index=0, content_index=0, delta=b64(b"\x10" * 80)))
    assert call.take_twilio_out() == []


def test_speech_with_nothing_playing_is_not_a_barge_in():
    call, rows, _ = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user"))
    call.take_model_out()
    marks = _speak(call, chunks=1)
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    twilio(call, mark(marks[0]))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=900, item_id="item_u1"))
    assert sent(call) == [] and call.take_twilio_out() == []


def greeting_metadata(call):
    (create,) = [e for e in sent(call) if e["type"] == "response.create"]
    return create["response"]["metadata"]  # the server echoes it in response.created


def test_greeting_is_not_cut_off_by_default_but_is_when_enabled():
    call, _, _ = live_call()
    _speak(call, resp="resp_g", item="item_g", metadata=greeting_metadata(call))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=100, item_id="item_u1"))
    assert sent(call) == [] and call.take_twilio_out() == []

    call, _, _ = live_call(dict(MINIMAL, firstMessageInterruptionsEnabled=True))
    _speak(call, resp="resp_g", item="item_g", metadata=greeting_metadata(call))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=100, item_id="item_u1"))
    assert [orjson.loads(f)["event"] for f in call.take_twilio_out()] == ["clear"]


def test_transcripts_are_ordered_by_speech_not_arrival_and_latency_recorded():
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user"))
    call.take_model_out()
    t0 = clock.t  # Twilio's stream time 0
    # a 100 ms gap in Twilio's stream clock after 1 s: audio time and stream time diverge there
    for i in range(175):
        twilio(call, media(b"\xff" * 160, ts=i * 20 + (100 if i >= 50 else 0)))
    clock.t = t0 + 1.5
    # audio_start_ms includes 300 ms of prefix padding: the voice began at audio 1300 ms
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=1000, item_id="item_u1"))
    clock.t = t0 + 3.5
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=3300, item_id="item_u1"))
    clock.t = t0 + 3.6
    _speak(call, chunks=1)
    # the caller's transcript arrives after the reply started
    call.on_model_text(ev("conversation.item.input_audio_transcription.completed", item_id="item_u1", content_index=0, transcript="What time do you open?"))
    call.on_model_text(ev("response.output_audio_transcript.done", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, transcript="We open at nine."))
    utter = sorted(rows.merged("utterances", ["call_sid", "seq"]).values(), key=lambda u: u["started_at"])
    assert [(u["role"], u["text"]) for u in utter] == [("user", "What time do you open?"), ("assistant", "We open at nine.")]
    # end of speech = audio 3300 ms - 400 ms silence window = stream time 3.0 s; reply at 3.6 s
    assert utter[1]["latency_ms"] == 600
    assert utter[0]["started_at"] == datetime(2026, 11, 21, 12, 0, 1, 400000, tzinfo=timezone.utc)


def test_stop_ends_call_once_with_first_reason():
    call, rows, _ = live_call()
    twilio(call, orjson.dumps({"event": "stop", "streamSid": "MZ1", "stop": {}}).decode())
    call.on_twilio_closed()
    assert call.end.reason == "customer-ended-call"
    ends = [r for t, r, keep in rows.upserts if t == "calls" and "ended_reason" in r]
    assert len(ends) == 1 and ends[0]["ended_at"] is not None


def test_unknown_assistant_ends_with_apology():
    call, rows, _ = make_call()
    twilio(call, start_frame({"assistant": "missing"}))
    assert call.phase is Phase.ENDED
    assert call.end.reason == "assistant-not-found" and call.end.next_action["say"]


def test_model_socket_closed_for_good_ends_call_and_is_recorded():
    call, rows, _ = live_call()
    call.on_model_closed(1008, "policy violation")  # not a close worth a reconnect
    assert call.end.reason == "pipeline-error-openai-llm-failed"
    assert call.end.next_action["say"]  # the spoken apology, never silence
    assert any(t == "call_events" and r["kind"] == "model_socket_closed" for t, r in rows.inserts)


def test_recoverable_model_error_keeps_the_call():
    call, rows, _ = live_call()
    call.on_model_text(ev("error", error={"type": "invalid_request_error", "code": "conversation_already_has_active_response", "message": "x"}))
    assert call.end is None
    assert any(r["kind"] == "model_error" for t, r in rows.inserts)


def test_max_duration_and_silence_timeout():
    call, _, clock = live_call(dict(MINIMAL, maxDurationSeconds=60, silenceTimeoutSeconds=600))
    clock.t += 59
    call.tick()
    assert call.end is None
    clock.t += 1
    call.tick()
    assert call.end.reason == "exceeded-max-duration"

    call, _, clock = live_call(dict(MINIMAL, silenceTimeoutSeconds=10, firstMessageMode="assistant-waits-for-user"))
    clock.t += 9
    call.tick()
    assert call.end is None
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u"))
    clock.t += 9
    call.tick()
    assert call.end is None
    clock.t += 1.5
    call.tick()
    assert call.end.reason == "silence-timed-out"


def test_malformed_twilio_frames_are_rejected_without_ending_the_call():
    call, _, _ = live_call()
    call.take_model_out()
    for bad in ("not json", "[]", '{"event":"media","media":{}}', '{"event":"start","start":{"streamSid":"x\\"y","callSid":"c"}}'):
        twilio(call, bad)
    assert call.end is None
    assert call.take_model_out() == []  # nothing of them reached the model
    twilio(call, media(b"\x01" * 160))  # and the call goes on
    assert [e["type"] for e in sent(call)] == ["input_audio_buffer.append"]


def test_malformed_model_events_are_rejected_without_ending_the_call():
    call, _, _ = live_call(WAIT)
    call.take_model_out()
    for bad in (b"not json", b"[]", ev("response.output_audio.delta", response_id="r1", item_id=None, delta="AAAA"),
                ev("response.done", response={"status": "completed"})):
        call.on_model_text(bad)
    assert call.end is None
    assert call.take_twilio_out() == [] and call.take_model_out() == []  # nothing reached the caller or the model


@pytest.mark.parametrize(
    "text,heard,total,expected",
    [("hello there friend", 0, 100, ""), ("hello there friend", 100, 100, "hello there friend"),
     ("hello there friend", 50, 100, "hello"), ("hello there friend", 70, 100, "hello there")],
)
def test_heard_text(text, heard, total, expected):
    assert heard_text(text, heard, total) == expected


def test_b64_length_without_decoding():
    for n in range(0, 20):
        assert tw.b64_decoded_len(b64(b"x" * n)) == n


# --- behaviours from the assistant's configuration ------------------------------------------

LOUD = bytes([0x10]) * 160  # a loud μ-law frame (about -8 dBFS)
QUIET = bytes([0x7E]) * 160  # near silence


def _gated_call(voice_seconds=0.2):
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user", stopSpeakingPlan={"voiceSeconds": voice_seconds}))
    call.take_model_out()
    _speak(call, chunks=10)
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    call.take_model_out()
    return call, rows, clock


def test_short_noise_does_not_cut_the_assistant_off_and_its_reply_is_dropped():
    call, rows, clock = _gated_call()
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="item_noise"))
    for _ in range(5):  # 100 ms of voice, under the 200 ms gate
        twilio(call, media(LOUD))
    for _ in range(5):
        twilio(call, media(QUIET))
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=600, item_id="item_noise"))
    assert [e["type"] for e in sent(call) if e["type"] != "input_audio_buffer.append"] == []
    assert call.take_twilio_out() == []  # no clear
    call.on_model_text(ev("response.created", response={"id": "resp_noise"}))
    assert [e["type"] for e in sent(call)] == ["response.cancel", "conversation.item.delete"]
    call.on_model_text(ev("response.output_audio.delta", response_id="resp_noise", item_id="item_x", output_index=0, content_index=0, delta=b64(b"\x10" * 80)))
    assert call.take_twilio_out() == []


def test_sustained_speech_cuts_the_assistant_off_after_voice_seconds():
    call, rows, clock = _gated_call()
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="item_u"))
    for _ in range(9):
        twilio(call, media(LOUD))
    assert call.take_twilio_out() == []  # 180 ms: not yet
    twilio(call, media(LOUD))
    assert [orjson.loads(f)["event"] for f in call.take_twilio_out()] == ["clear"]
    types = [e["type"] for e in sent(call) if e["type"] != "input_audio_buffer.append"]
    assert types == ["conversation.item.delete"]  # nothing was played yet in this test


def test_end_call_phrase_hangs_up_once_the_goodbye_was_heard():
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user", endCallPhrases=["Goodbye"]))
    call.take_model_out()
    marks = _speak(call, chunks=3)
    call.on_model_text(ev("response.output_audio_transcript.done", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, transcript="Thanks for calling, goodbye!"))
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    for name in marks[:-1]:
        twilio(call, mark(name))
    assert call.end is None  # the last chunk is still playing
    twilio(call, mark(marks[-1]))
    assert call.end.reason == "assistant-said-end-call-phrase"


def test_end_call_phrase_wait_is_bounded():
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user", endCallPhrases=["bye"]))
    call.take_model_out()
    _speak(call, chunks=3)
    call.on_model_text(ev("response.output_audio_transcript.done", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, transcript="ok bye"))
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    clock.t += 5.0
    call.tick()
    assert call.end is None
    clock.t += 1.0  # 300 ms of audio + 5 s grace, and Twilio never echoed the marks
    call.tick()
    assert call.end.reason == "assistant-said-end-call-phrase"


def test_end_call_tool_says_end_call_message_then_hangs_up():
    assistant = dict(MINIMAL, firstMessageMode="assistant-waits-for-user", endCallFunctionEnabled=True, endCallMessage="Bye now.")
    call, rows, clock = live_call(assistant)
    session_tools = call.setup.session["tools"]
    assert [t["name"] for t in session_tools] == ["endCall"]
    call.take_model_out()
    call.on_model_text(ev("response.created", response={"id": "resp_1"}))
    call.on_model_text(ev("response.output_item.done", response_id="resp_1", output_index=0,
                          item={"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "endCall", "arguments": "{}"}))
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    out = sent(call)
    assert out[0]["item"] == {"type": "function_call_output", "call_id": "call_1", "output": "Ending the call."}
    assert out[1]["type"] == "response.create" and out[1]["response"]["instructions"].endswith('"Bye now."')
    assert call.end is None
    marks = _speak(call, item="item_bye", resp="resp_bye", chunks=2, metadata=out[1]["response"]["metadata"])
    call.on_model_text(ev("response.done", response={"id": "resp_bye", "status": "completed"}))
    for name in marks:
        twilio(call, mark(name))
    assert call.end.reason == "assistant-ended-call"
    tool = rows.merged("tool_calls", ["call_sid", "seq"])[("CA1", 1)]
    assert tool["name"] == "endCall" and tool["status"] == "ok"


def test_webhook_tools_filler_then_every_output_then_one_response():
    from shim_tools.results import DEFAULT_FILLERS, parse_tool_response

    assistant = dict(MINIMAL, firstMessageMode="assistant-waits-for-user",
                     model=dict(MINIMAL["model"], tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]))
    call, rows, clock = live_call(assistant)
    call.take_model_out()
    call.on_model_text(ev("response.created", response={"id": "resp_1"}))
    for i in (1, 2):
        call.on_model_text(ev("response.output_item.done", response_id="resp_1", output_index=i,
                              item={"id": f"fc_{i}", "type": "function_call", "status": "completed", "call_id": f"call_{i}", "name": "lookup", "arguments": "{\"q\": 1}"}))
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed"}))
    requests = take(call, ToolRequest)
    assert [(r.call_id, r.arguments) for r in requests] == [("call_1", {"q": 1}), ("call_2", {"q": 1})]
    (filler,) = sent(call)  # Vapi's default filler while the webhook runs
    assert filler["type"] == "response.create"
    # the call's rng is seeded (random.Random(7)): its first pick among Vapi's default fillers
    assert "Just a sec" in DEFAULT_FILLERS
    assert filler["response"]["instructions"] == SAY_EXACTLY.format(text="Just a sec")
    call.on_model_text(ev("response.created", response={"id": "resp_filler", "metadata": filler["response"]["metadata"]}))
    body = b'{"results": [{"toolCallId": "call_1", "result": "found"}, {"toolCallId": "call_2", "error": "nope"}]}'
    outcomes = parse_tool_response(["call_1", "call_2"], http_status=200, body=body)
    call.on_tool_outcome(outcomes["call_1"])
    call.on_tool_outcome(outcomes["call_2"])
    out = sent(call)
    assert [e["item"]["output"] for e in out] == ["found", "Error: nope"]  # the response waits for the filler
    call.on_model_text(ev("response.done", response={"id": "resp_filler", "status": "completed"}))
    assert [e["type"] for e in sent(call)] == ["response.create"]
    tools = rows.merged("tool_calls", ["call_sid", "seq"])
    assert [(t["call_id"], t["status"]) for t in tools.values()] == [("call_1", "ok"), ("call_2", "error")]


def test_hipaa_stores_no_transcript_text():
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user", compliancePlan={"hipaaEnabled": True}))
    call.take_model_out()
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    call.on_model_text(ev("conversation.item.input_audio_transcription.completed", item_id="u1", content_index=0, transcript="my ssn is 123"))
    _speak(call, chunks=1)
    call.on_model_text(ev("response.output_audio_transcript.done", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, transcript="noted"))
    utter = rows.merged("utterances", ["call_sid", "seq"])
    assert utter and all(u.get("text") is None and u.get("full_text") is None for u in utter.values())


def test_few_shot_messages_become_items_before_the_greeting():
    assistant = dict(MINIMAL, model=dict(MINIMAL["model"], messages=MINIMAL["model"]["messages"] + [
        {"role": "user", "content": "Do you open Sundays?"}, {"role": "assistant", "content": "No, we are closed on Sundays."}]))
    call, rows, clock = make_call(assistant)
    twilio(call, start_frame())
    call.on_model_text(ev("session.created", session={}))
    call.take_model_out()
    call.on_model_text(ev("session.updated", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}))
    out = sent(call)
    assert [(e["type"], e.get("item", {}).get("role")) for e in out] == [
        ("conversation.item.create", "user"), ("conversation.item.create", "assistant"), ("response.create", None)]
    assert out[1]["item"]["content"] == [{"type": "output_text", "text": "No, we are closed on Sundays."}]


class FakeMixer:
    def mix_b64(self, voice_b64):
        return b64(bytes(b ^ 0x01 for b in base64.b64decode(voice_b64)))


def test_background_mixer_changes_samples_not_length_or_marks():
    call, rows, clock = live_call(dict(MINIMAL, firstMessageMode="assistant-waits-for-user"))
    call.on_background_ready(FakeMixer())
    call.take_model_out()
    call.on_model_text(ev("response.created", response={"id": "resp_1"}))
    call.on_model_text(ev("response.output_audio.delta", response_id="resp_1", item_id="item_1", output_index=0, content_index=0, delta=b64(b"\x10" * 800)))
    media_frame, mark_frame = (orjson.loads(f) for f in call.take_twilio_out())
    assert base64.b64decode(media_frame["media"]["payload"]) == b"\x11" * 800
    twilio(call, mark(mark_frame["mark"]["name"]))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    truncate = next(e for e in sent(call) if e["type"] == "conversation.item.truncate")
    assert truncate["audio_end_ms"] == 100  # all 800 bytes were played: the mark counted them


# --- regressions from review: the response queue, tool batches and goodbyes under races --------

WAIT = dict(MINIMAL, firstMessageMode="assistant-waits-for-user")
TOOLS = dict(WAIT, model=dict(MINIMAL["model"], tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]))


def fc(resp, call_id, name="lookup", args="{}"):
    return ev("response.output_item.done", response_id=resp, output_index=0,
              item={"id": "fc_" + call_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name, "arguments": args})


def ok(call_id):
    from shim_tools.results import parse_tool_response

    return parse_tool_response([call_id], http_status=200, body=orjson.dumps({"results": [{"toolCallId": call_id, "result": "x"}]}))[call_id]


def creates(events):
    return [e for e in events if e["type"] == "response.create"]


def tool_turn(call, resp, *call_ids, names=None):
    call.on_model_text(ev("response.created", response={"id": resp}))
    for i, call_id in enumerate(call_ids):
        call.on_model_text(fc(resp, call_id, name=(names or {}).get(call_id, "lookup")))
    call.on_model_text(ev("response.done", response={"id": resp, "status": "completed"}))
    take(call, ToolRequest)
    return sent(call)


def test_talking_over_the_transfer_message_does_not_cancel_the_transfer():
    assistant = dict(WAIT, model=dict(MINIMAL["model"], tools=[{"type": "transferCall", "destinations": [{"type": "number", "number": "+15551234567"}]}]))
    call, rows, clock = live_call(assistant)
    call.take_model_out()
    out = tool_turn(call, "r1", "c1", names={"c1": "transferCall"})
    (say,) = creates(out)
    _speak(call, item="i_bye", resp="r_bye", chunks=5, metadata=say["response"]["metadata"])
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    call.on_model_text(ev("response.done", response={"id": "r_bye", "status": "cancelled"}))
    clock.t += 10
    call.tick()
    assert call.end is not None and call.end.next_action["verb"] == "dial"


def test_the_servers_own_reply_to_noise_is_cancelled_but_our_tool_answer_is_not():
    call, rows, clock = live_call(dict(TOOLS, stopSpeakingPlan={"voiceSeconds": 0.2}))
    call.take_model_out()
    (filler,) = creates(tool_turn(call, "r1", "c1"))
    _speak(call, item="i_fill", resp="r_fill", chunks=3, metadata=filler["response"]["metadata"])
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u_ok"))
    twilio(call, media(QUIET))
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=400, item_id="u_ok"))
    call.on_model_text(ev("response.done", response={"id": "r_fill", "status": "completed"}))
    sent(call)
    call.on_tool_outcome(ok("c1"))
    (answer,) = creates(sent(call))
    call.on_model_text(ev("response.created", response={"id": "r_answer", "metadata": answer["response"]["metadata"]}))
    assert "response.cancel" not in [e["type"] for e in sent(call)]


def test_our_request_survives_the_server_starting_its_own_response_first():
    call, rows, clock = live_call(TOOLS)
    call.take_model_out()
    (filler,) = creates(tool_turn(call, "r1", "c1"))
    call.on_model_text(ev("response.created", response={"id": "r_vad"}))  # the caller spoke
    call.on_model_text(ev("error", error={"type": "invalid_request_error", "code": "conversation_already_has_active_response",
                                          "message": "busy", "event_id": filler["event_id"]}))
    call.on_model_text(ev("response.done", response={"id": "r_vad", "status": "completed"}))
    assert [e["event_id"] for e in creates(sent(call))] == [filler["event_id"]]


def test_a_refused_request_does_not_block_the_ones_behind_it():
    call, rows, clock = live_call(TOOLS)
    call.take_model_out()
    (filler,) = creates(tool_turn(call, "r1", "c1"))
    call.on_model_text(ev("error", error={"type": "server_error", "code": "server_error", "message": "x", "event_id": filler["event_id"]}))
    call.on_tool_outcome(ok("c1"))
    assert len(creates(sent(call))) == 1


def test_tools_called_while_earlier_ones_run_are_all_answered():
    call, rows, clock = live_call(TOOLS)
    call.take_model_out()
    tool_turn(call, "r1", "c1")
    tool_turn(call, "r2", "c2")  # the server's own response, while c1's webhook runs
    call.on_tool_outcome(ok("c1"))
    call.on_tool_outcome(ok("c2"))
    out = sent(call)
    assert [e["item"]["call_id"] for e in out if e.get("item", {}).get("type") == "function_call_output"] == ["c1", "c2"]


def test_a_webhook_that_never_answers_is_answered_for_it():
    call, rows, clock = live_call(TOOLS)
    call.take_model_out()
    tool_turn(call, "r1", "c1")
    clock.t += 26  # default server.timeoutSeconds 20 + 5 s backstop
    call.tick()
    outputs = [e["item"] for e in sent(call) if e.get("item", {}).get("type") == "function_call_output"]
    assert outputs == [{"type": "function_call_output", "call_id": "c1", "output": "No result returned."}]


def test_a_refused_session_update_ends_the_call_instead_of_dead_air():
    call, rows, clock = make_call(WAIT)
    twilio(call, start_frame())
    call.on_model_text(ev("session.created", session={}))
    call.on_model_text(ev("error", error={"type": "invalid_request_error", "code": "invalid_value", "message": "bad voice",
                                          "param": "session.audio.output.voice"}))
    assert call.end is not None and call.end.next_action["say"]


def test_a_model_session_that_never_gets_ready_ends_the_call():
    call, rows, clock = make_call(WAIT)
    twilio(call, start_frame())
    clock.t += 16
    call.tick()
    assert call.end is not None and call.end.reason.startswith("pipeline-error")


def test_a_goodbye_queued_behind_a_filler_is_heard_before_the_hang_up():
    call, rows, clock = live_call(dict(TOOLS, endCallFunctionEnabled=True, endCallMessage="Bye now."))
    call.take_model_out()
    (filler,) = creates(tool_turn(call, "r1", "c1", "c2", names={"c2": "endCall"}))
    call.on_tool_outcome(ok("c1"))  # a fast webhook: the goodbye waits behind the filler
    marks = _speak(call, item="i_fill", resp="r_fill", chunks=2, metadata=filler["response"]["metadata"])
    call.on_model_text(ev("response.done", response={"id": "r_fill", "status": "completed"}))
    (goodbye,) = creates(sent(call))
    for name in marks:
        twilio(call, mark(name))
    assert call.end is None
    bye_marks = _speak(call, item="i_bye", resp="r_bye", chunks=2, metadata=goodbye["response"]["metadata"])
    call.on_model_text(ev("response.done", response={"id": "r_bye", "status": "completed"}))
    for name in bye_marks:
        twilio(call, mark(name))
    assert call.end.reason == "assistant-ended-call"


def test_a_long_call_keeps_only_what_may_still_be_interrupted():
    call, rows, clock = live_call(WAIT)
    call.take_model_out()
    for turn in range(50):
        marks = _speak(call, item=f"i{turn}", resp=f"r{turn}", chunks=2)
        call.on_model_text(ev("response.output_audio_transcript.done", response_id=f"r{turn}", item_id=f"i{turn}",
                              output_index=0, content_index=0, transcript="word " * 8))
        call.on_model_text(ev("response.done", response={"id": f"r{turn}", "status": "completed"}))
        for name in marks:
            twilio(call, mark(name))
    utter = rows.merged("utterances", ["call_sid", "seq"])
    assert len(utter) == 50 and all(u["heard_ms"] == 200 and u["text"] for u in utter.values())
    # every item was generated, heard and recorded for good, then forgotten: ending the call
    # has none left to write again, and nothing to cut off
    written = len(rows.upserts)
    twilio(call, orjson.dumps({"event": "stop", "streamSid": "MZ1"}).decode())
    assert call.end.reason == "customer-ended-call"
    assert [t for t, *_ in rows.upserts[written:]] == ["calls"]
    assert call.take_model_out() == [] and call.take_twilio_out() == []


def test_unknown_model_events_are_logged_once_per_kind_and_change_nothing():
    from structlog.testing import capture_logs

    call, rows, clock = live_call(WAIT)
    call.take_model_out()
    with capture_logs() as logs:
        for _ in range(3):
            call.on_model_text(ev("rate_limits.updated", rate_limits=[]))
        call.on_model_text(ev("conversation.item.added", item={}))
    assert [(e["event"], e["kind"]) for e in logs if e["event"] == "model_event_unhandled"] == [
        ("model_event_unhandled", "rate_limits.updated"), ("model_event_unhandled", "conversation.item.added")]
    assert call.end is None and call.take_model_out() == [] and call.take_twilio_out() == []


def test_hot_path_frames_are_exactly_twilio_media_and_mark():
    call, rows, clock = live_call(WAIT)
    call.on_model_text(ev("response.created", response={"id": "resp_1"}))
    call.on_model_text(ev("response.output_audio.delta", response_id="resp_1", item_id="item_1", output_index=0,
                          content_index=0, delta=b64(b"\x10" * 160)))
    media_out, mark_out = call.take_twilio_out()
    assert media_out == tw.media_frame("MZ1", b64(b"\x10" * 160))
    assert mark_out == tw.mark_frame("MZ1", orjson.loads(mark_out)["mark"]["name"])


def test_billed_usage_heard_end_and_http_status_are_stored():
    """response.done's usage becomes a model_usage row (calls.cost_usd); an assistant turn heard
    to the end gets ended_at = its start + the audio heard; a tool call keeps the HTTP status."""
    from datetime import timedelta

    from shim_tools.results import parse_tool_response

    assistant = dict(MINIMAL, firstMessageMode="assistant-waits-for-user",
                     model=dict(MINIMAL["model"], tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]))
    call, rows, clock = live_call(assistant)
    names = _speak(call, chunks=2, size=800)  # 200 ms of voice
    for name in names:
        twilio(call, mark(name))
    usage = {"total_tokens": 40, "input_tokens": 30, "output_tokens": 10}
    call.on_model_text(ev("response.done", response={"id": "resp_1", "status": "completed", "usage": usage}))
    (row,) = [r for t, r, _ in rows.upserts if t == "model_usage"]
    assert (row["call_sid"], row["response_id"], row["usage"]) == ("CA1", "resp_1", usage)
    turn = next(r for r in rows.merged("utterances", ("call_sid", "seq")).values() if r.get("role") == "assistant")
    assert turn["heard_ms"] == 200 and turn["ended_at"] - turn["started_at"] == timedelta(milliseconds=200)
    call.on_model_text(ev("response.created", response={"id": "resp_2"}))
    call.on_model_text(ev("response.output_item.done", response_id="resp_2", output_index=0, item={
        "id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "lookup", "arguments": "{}"}))
    call.on_model_text(ev("response.done", response={"id": "resp_2", "status": "completed"}))
    take(call, ToolRequest)
    call.on_tool_outcome(parse_tool_response(["call_1"], http_status=502, body=b"bad gateway")["call_1"])
    (tool,) = rows.merged("tool_calls", ["call_sid", "seq"]).values()
    assert tool["http_status"] == 502 and [r for t, r, _ in rows.upserts if t == "model_usage"] == [row]
