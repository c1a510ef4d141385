"""A call outlives its model session (sans-I/O): a lost socket is reconnected with the
conversation re-sent as text, the caller's audio waiting meanwhile; attempts are bounded; a
session nearing its time limit is replaced at a pause. The shell-level proof (a real socket
dropped, a new connection within 1.5 s) is in tests/test_bridge_e2e.py."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest

from shim.call import MAX_EARLY_FRAMES, Phase
from shim.call_effects import ConnectModel
from shim.model_link import RECONNECT_WINDOW_S, RETRY_DELAYS_S, ModelLink
from shim.openai_realtime import REPLAY_VERBATIM_CHARS, Conversation, OpenAIRealtime, Turn

from .test_call import MINIMAL, b64, ev, live_call, mark, media, sent, twilio

WAITS = dict(MINIMAL, firstMessageMode="assistant-waits-for-user")  # no greeting request in the way
PCMU = {"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}
WALL0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc).timestamp()  # test_call's injected wall clock


def kinds(rows) -> list[str]:
    return [r["kind"] for t, r in rows.inserts if t == "call_events"]


def connects(call) -> list[ConnectModel]:
    return [e for e in call.take_effects() if type(e) is ConnectModel]


def new_session(call, expires_at: float | None = None) -> list[dict]:
    """The shell opened a new socket: its session.created, then what the call sent."""
    call.on_model_text(ev("session.created", session={"expires_at": expires_at} if expires_at else {}))
    return sent(call)


def ready(call) -> list[dict]:
    call.on_model_text(ev("session.updated", session=PCMU["audio"] and PCMU))
    return sent(call)


def a_conversation(call) -> None:
    """Greeting heard in full, a caller turn, an answer cut off by the caller after 200 ms."""
    call.on_model_text(ev("response.created", response={"id": "r1", "metadata": {"purpose": "greeting"}}))
    call.on_model_text(ev("response.output_audio_transcript.delta", item_id="a1", delta="Hi, thanks for calling Acme."))
    call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\x10" * 1600)))
    call.on_model_text(ev("response.output_audio_transcript.done", item_id="a1", transcript="Hi, thanks for calling Acme."))
    call.on_model_text(ev("response.done", response={"id": "r1", "status": "completed"}))
    twilio(call, mark("1"))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="u1"))
    call.on_model_text(ev("conversation.item.input_audio_transcription.completed", item_id="u1", content_index=0,
                          transcript="When are you open on Saturday?"))
    call.on_model_text(ev("response.created", response={"id": "r2"}))
    call.on_model_text(ev("response.output_audio_transcript.delta", item_id="a2", delta="On Saturdays we are open from nine"))
    call.on_model_text(ev("response.output_audio.delta", response_id="r2", item_id="a2", delta=b64(b"\x10" * 3200)))
    # nothing of a2 confirmed played yet when the caller talks over it
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=1500, item_id="u2"))
    sent(call)


def test_a_lost_socket_reconnects_at_once_and_the_new_session_gets_config_and_conversation():
    call, rows, clock = live_call(WAITS)
    configured = sent(call)  # the first session's update is the model's whole configuration
    a_conversation(call)
    call.on_model_text(ev("response.done", response={"id": "r2", "status": "cancelled"}))
    call.on_model_closed(1006, "")
    assert call.end is None and call.phase is Phase.RESUMING
    (connect,) = connects(call)
    assert connect.delay_s == 0.0  # the first attempt at once
    assert kinds(rows)[-2:] == ["model_socket_closed", "model_reconnecting"]

    twilio(call, media(b"\x05" * 160, ts=5000))  # the caller talks through the gap: kept, in order
    twilio(call, media(b"\x06" * 160, ts=5020))
    assert sent(call) == []

    update, *items = new_session(call)
    assert update["type"] == "session.update"
    assert update["session"]["instructions"] == "Be brief. Caller: +15550001111"
    assert update["session"] == next(f["session"] for f in configured if f["type"] == "session.update")
    texts = [(i["item"]["role"], i["item"]["content"][0]["text"]) for i in items]
    assert texts == [
        ("assistant", "Hi, thanks for calling Acme."),
        ("user", "When are you open on Saturday?"),
        # a2 was cut off: the caller heard nothing of it, so the call deleted it; it is not replayed
    ]
    frames = ready(call)
    assert [f["type"] for f in frames] == ["input_audio_buffer.append", "input_audio_buffer.append"]
    assert [f["audio"] for f in frames] == [b64(b"\x05" * 160), b64(b"\x06" * 160)]
    assert call.phase is Phase.LIVE and kinds(rows)[-1] == "model_reconnected"
    twilio(call, media(b"\x07" * 160, ts=5040))
    assert sent(call) == [{"type": "input_audio_buffer.append", "audio": b64(b"\x07" * 160)}]


def test_the_words_heard_of_a_truncated_answer_are_what_is_replayed():
    call, rows, _ = live_call(WAITS)
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r2"}))
    call.on_model_text(ev("response.output_audio_transcript.delta", item_id="a2", delta="On Saturdays we are open from nine until one"))
    call.on_model_text(ev("response.output_audio.delta", response_id="r2", item_id="a2", delta=b64(b"\x10" * 1600)))
    call.on_model_text(ev("response.output_audio.delta", response_id="r2", item_id="a2", delta=b64(b"\x10" * 1600)))
    twilio(call, mark("1"))  # the first 200 ms were heard
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    truncate = [f for f in sent(call) if f["type"] == "conversation.item.truncate"]
    assert truncate and truncate[0]["audio_end_ms"] == 200
    call.on_model_closed(1006, "")
    items = new_session(call)[1:]
    assert [(i["item"]["role"], i["item"]["content"][0]["text"]) for i in items] == [("assistant", "On Saturdays we are")]


def test_a_response_dropped_by_the_loss_is_continued_and_its_turn_stored_interrupted():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r1"}))
    call.on_model_text(ev("response.output_audio_transcript.delta", item_id="a1", delta="Let me check the"))
    call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\x10" * 800)))
    call.on_model_closed(1011, "")
    assert call.end is None and call.phase is Phase.RESUMING
    new_session(call)
    clock.t += 0.4  # a short gap: no apology, but the answer must go on
    frames = ready(call)
    note, create = frames[0], frames[1]
    assert note["item"]["role"] == "system" and "Continue naturally" in note["item"]["content"][0]["text"]
    assert "line broke up" not in note["item"]["content"][0]["text"]
    assert create["type"] == "response.create" and create["response"]["metadata"]["purpose"] == "resume"
    turns = [r for r in rows.merged("utterances", ("call_sid", "seq")).values() if r.get("role") == "assistant"]
    assert turns[-1]["interrupted"] is True


def test_a_long_gap_is_acknowledged_to_the_caller():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_closed(1006, "")
    connects(call)
    clock.t += 2.5
    new_session(call)
    frames = ready(call)
    assert "line broke up" in frames[0]["item"]["content"][0]["text"]
    assert frames[1]["type"] == "response.create"


def test_requests_made_during_the_gap_wait_for_the_new_session():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call._request_response("Say hi", "tool-message")  # e.g. a tool's request-complete message
    (create,) = [f for f in sent(call) if f["type"] == "response.create"]
    call.on_model_closed(1006, "")  # ...in flight when the socket went
    call._request_response("Say bye", "goodbye")
    assert new_session(call)[0]["type"] == "session.update"
    assert [f for f in sent(call) if f["type"] == "response.create"] == []
    frames = ready(call)
    creates = [f["response"]["metadata"]["purpose"] for f in frames if f["type"] == "response.create"]
    assert creates == ["tool-message"]  # one at a time, in order: the goodbye waits for it
    call.on_model_text(ev("response.created", response={"id": "rx", "metadata": {"shim_id": frames[0]["event_id"]}}))
    call.on_model_text(ev("response.done", response={"id": "rx", "status": "completed"}))
    assert [f["response"]["metadata"]["purpose"] for f in sent(call) if f["type"] == "response.create"] == ["goodbye"]


def test_function_calls_and_results_are_replayed_as_pairs():
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
            "server": {"url": "https://tools.example/hook"}}
    assistant = dict(WAITS, model=dict(MINIMAL["model"], tools=[tool]))
    call, rows, clock = live_call(assistant)
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r1"}))
    call.on_model_text(ev("response.output_item.done", response_id="r1", output_index=0,
                          item={"id": "f1", "type": "function_call", "status": "completed", "call_id": "call_1",
                                "name": "lookup", "arguments": "{}"}))
    call.on_model_text(ev("response.done", response={"id": "r1", "status": "completed"}))
    call.take_effects()
    call.on_model_closed(1006, "")  # while the webhook runs
    from shim_tools.results import ToolOutcome

    call.on_tool_outcome(ToolOutcome("call_1", "ok", "open", None, None, None, 200))
    items = new_session(call)[1:]
    assert [i["item"]["type"] for i in items] == ["function_call", "function_call_output"]
    assert items[0]["item"]["call_id"] == items[1]["item"]["call_id"] == "call_1"
    assert items[1]["item"]["output"] == "open"


def test_a_close_that_is_not_worth_a_reconnect_ends_with_the_apology():
    for code in (1000, 1008, 4000):
        call, rows, _ = live_call()
        call.on_model_closed(code, "bye")
        assert call.end is not None and call.end.reason == "pipeline-error-openai-llm-failed"
        assert call.end.next_action["say"]


def test_attempts_are_bounded_then_the_apology():
    call, rows, clock = live_call()
    call.on_model_closed(1006, "")
    delays = [connects(call)[0].delay_s]
    while call.end is None:
        clock.t += delays[-1] + 0.2  # each attempt takes a little
        call.on_model_connect_failed(503, "HTTP 503")
        effects = connects(call)
        if effects:
            delays.append(effects[0].delay_s)
    assert call.end.reason == "pipeline-error-openai-llm-failed" and call.end.next_action["say"]
    assert 1 < len(delays) <= len(RETRY_DELAYS_S)
    for delay, base in zip(delays, RETRY_DELAYS_S):  # backing off, with jitter
        assert base / 2 <= delay <= base
    assert "model_reconnect_abandoned" in kinds(rows)
    assert kinds(rows).count("model_reconnecting") == len(delays)


def test_bad_credentials_on_a_reconnect_give_up_at_once():
    call, rows, clock = live_call()
    call.on_model_closed(1006, "")
    connects(call)
    call.on_model_connect_failed(401, "HTTP 401")
    assert call.end is not None and "model_reconnect_abandoned" in kinds(rows)


def test_a_socket_that_opens_but_never_becomes_a_session_is_given_up_in_bounded_time():
    call, rows, clock = live_call()
    call.on_model_closed(1006, "")
    connects(call)
    new_session(call)  # created, but session.updated never comes
    clock.t += RECONNECT_WINDOW_S + 0.5
    call.tick()
    assert call.end is not None and call.end.next_action["say"]


def test_max_duration_still_applies_during_a_reconnect():
    call, rows, clock = live_call(dict(MINIMAL, maxDurationSeconds=20))
    clock.t += 19.5
    call.on_model_closed(1006, "")
    clock.t += 1
    call.tick()
    assert call.end is not None and call.end.reason == "exceeded-max-duration"


def test_caller_audio_held_during_a_gap_is_bounded():
    call, rows, clock = live_call()
    sent(call)
    call.on_model_closed(1006, "")
    for i in range(MAX_EARLY_FRAMES + 50):
        twilio(call, media(bytes([i % 250]) * 160, ts=20 * i))
    new_session(call)
    appends = [f for f in ready(call) if f["type"] == "input_audio_buffer.append"]
    assert len(appends) == MAX_EARLY_FRAMES  # the newest are kept
    assert appends[-1]["audio"] == b64(bytes([(MAX_EARLY_FRAMES + 49) % 250]) * 160)


def test_session_expired_error_is_a_reconnect_and_bad_key_is_the_end():
    call, rows, _ = live_call()
    call.on_model_text(ev("error", error={"type": "invalid_request_error", "code": "session_expired", "message": "x"}))
    assert call.end is None and call.phase is Phase.RESUMING
    call, rows, _ = live_call()
    call.on_model_text(ev("error", error={"type": "invalid_request_error", "code": "invalid_api_key", "message": "x"}))
    assert call.end is not None


# --- the session's time limit ------------------------------------------------------------------


def rolled_call(lifetime_s: float):
    call, rows, clock = live_call(dict(WAITS, maxDurationSeconds=3600))
    # live_call's session announced no limit; a new one announces `lifetime_s`
    call.on_model_closed(1006, "")
    connects(call)
    new_session(call, expires_at=WALL0 + (clock.t - 1000.0) + lifetime_s)
    ready(call)
    return call, rows, clock


def test_rollover_waits_for_a_pause_then_swaps_the_session_invisibly():
    call, rows, clock = rolled_call(40.0)  # lead: 10 s before the end; forced 4 s before
    clock.t += 29
    call.tick()
    assert connects(call) == []  # not yet
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    clock.t += 2  # inside the lead, but the caller is speaking
    call.tick()
    assert connects(call) == []
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=1500, item_id="u1"))
    call.on_model_text(ev("conversation.item.input_audio_transcription.completed", item_id="u1", content_index=0, transcript="Thanks."))
    call.on_model_text(ev("response.created", response={"id": "r9"}))
    call.on_model_text(ev("response.output_audio.delta", response_id="r9", item_id="a9", delta=b64(b"\x10" * 160)))
    call.on_model_text(ev("response.output_audio_transcript.done", item_id="a9", transcript="You're welcome."))
    call.on_model_text(ev("response.done", response={"id": "r9", "status": "completed"}))
    call.tick()
    assert connects(call) == []  # the answer is still playing at Twilio
    twilio(call, mark("1"))
    call.tick()
    assert connects(call) == []  # the caller stopped less than a second ago: they may go on
    clock.t += 1.0
    call.tick()
    (connect,) = connects(call)
    assert connect.delay_s == 0 and call.phase is Phase.RESUMING and "model_rollover" in kinds(rows)
    frames = new_session(call, expires_at=WALL0 + (clock.t - 1000.0) + 40)
    texts = [f["item"]["content"][0]["text"] for f in frames if f["type"] == "conversation.item.create"]
    assert texts == ["Thanks.", "You're welcome."]
    frames = ready(call)
    assert not [f for f in frames if f["type"] == "response.create"]  # invisible: nothing is said
    assert call.phase is Phase.LIVE and kinds(rows)[-1] == "model_session_rolled_over"
    assert call.end is None


def test_rollover_is_forced_just_before_the_limit():
    call, rows, clock = rolled_call(40.0)
    call._request_response(None, "reply")
    call.on_model_text(ev("response.created", response={"id": "r1"}))  # a long answer, never a pause
    for _ in range(72):
        clock.t += 0.5
        call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\x10" * 80)))
        call.tick()
        if connects(call):
            break
    assert 36 - 0.5 <= clock.t - 1000.0 <= 36.5  # forced 4 s (lifetime / 10) before the end


def test_conversation_replay_condenses_a_long_call():
    conversation = Conversation()
    for i in range(400):
        conversation.add(Turn("user", f"question {i} " + "x" * 100))
        conversation.add(Turn("assistant", f"answer {i} " + "y" * 100))
    replay = conversation.replay()
    assert replay[0].role == "system" and replay[0].text.startswith("Earlier in this call (condensed):")
    verbatim = replay[1:]
    assert sum(len(t.text) for t in verbatim) <= REPLAY_VERBATIM_CHARS
    assert verbatim[-1].text.startswith("answer 399")
    assert len(replay[0].text) < 7000


def test_backend_between_sockets_only_updates_the_conversation():
    backend = OpenAIRealtime()
    sink = type("S", (), {"on_model_event": lambda s, e: None, "on_model_audio": lambda s, *a: None,
                          "on_model_event_rejected": lambda s, e: None})()
    backend.configure({"type": "realtime", "instructions": "x"})
    backend.feed(orjson.dumps({"type": "session.created", "session": {}}), sink)
    backend.out.clear()
    backend.disconnected()
    backend.add_message("system", "note")
    backend.cancel_response("r1")
    backend.create_response("q1", None, "reply")
    backend.delete_item("gone")
    assert backend.out == []
    backend.feed(orjson.dumps({"type": "session.created", "session": {}}), sink)
    types = [orjson.loads(f)["type"] for f in backend.out]
    assert types == ["session.update", "conversation.item.create"]


@pytest.mark.parametrize("code, recoverable", [(None, True), (1001, True), (1006, True), (1011, True), (1000, False), (4000, False)])
def test_which_closes_are_worth_a_reconnect(code, recoverable):
    assert ModelLink.recoverable_close(code) is recoverable


def test_a_new_sessions_input_timeline_starts_at_zero():
    """Turn timing (latency, utterance start/end) maps the model's input-audio time to Twilio's
    clock; a new session counts from 0 again, from where the call's audio had got to."""
    call, rows, clock = live_call(WAITS)
    for i in range(50):  # 1 s of audio on the first session
        twilio(call, media(b"\x01" * 160, ts=20 * i))
    call.on_model_closed(1006, "")
    for i in range(50, 60):  # 200 ms during the gap: flushed into the new session first
        twilio(call, media(b"\x01" * 160, ts=20 * i))
    new_session(call)
    ready(call)
    t0 = call._stream_t0
    assert call._input_time(0) == pytest.approx(t0 + 1.0)  # the new session's 0 is the call's 1 s
    assert call._input_time(150) == pytest.approx(t0 + 1.15)


def test_a_model_that_keeps_failing_is_given_up_after_a_few_losses():
    from shim.model_link import LOSS_WINDOW_S, MAX_LOSSES

    call, rows, clock = live_call(WAITS)
    for loss in range(MAX_LOSSES):
        call.on_model_closed(1011, "")
        if call.end is not None:
            break
        connects(call)
        new_session(call)
        ready(call)
        clock.t += 30
    assert loss == MAX_LOSSES - 1 and call.end is not None and call.end.next_action["say"]
    # spread out over a long call, the same number of losses is survived
    call, rows, clock = live_call(dict(WAITS, maxDurationSeconds=3600, silenceTimeoutSeconds=3600))
    for _ in range(MAX_LOSSES + 2):
        call.on_model_closed(1011, "")
        connects(call)
        new_session(call)
        ready(call)
        clock.t += LOSS_WINDOW_S / 2 + 1
        call.tick()
    assert call.end is None


def test_the_first_connection_is_retried_too_but_not_on_bad_credentials():
    from .test_call import make_call, start_frame

    call, rows, clock = make_call(WAITS)
    twilio(call, start_frame())
    connects(call)
    call.on_model_connect_failed(None, "ConnectionResetError: reset")
    (retry,) = connects(call)
    assert call.end is None and retry.delay_s == 0
    call.on_model_text(ev("session.created", session={}))
    call.on_model_text(ev("session.updated", session=PCMU))
    assert call.phase is Phase.LIVE

    for status, reason in ((401, "pipeline-error-openai-401-unauthorized"), (403, "pipeline-error-openai-403-model-access-denied")):
        call, rows, clock = make_call(WAITS)
        twilio(call, start_frame())
        call.on_model_connect_failed(status, f"HTTP {status}")
        assert call.end is not None and call.end.reason == reason and call.end.next_action["say"]

    call, rows, clock = make_call(WAITS)  # rate limited, every time: the 429 reason, after bounded retries
    twilio(call, start_frame())
    while call.end is None:
        clock.t += 0.5
        call.on_model_connect_failed(429, "HTTP 429")
        connects(call)
    assert call.end.reason == "pipeline-error-openai-429-rate-limit-reached"
    assert "model_reconnect_abandoned" in kinds(rows)


def test_replaced_sessions_are_counted_in_metrics():
    from shim.metrics import ShimMetrics

    call, rows, clock = live_call(WAITS)
    metrics = call.metrics = ShimMetrics(lambda: [])
    call.on_model_closed(1006, "")
    new_session(call)
    ready(call)
    call.on_model_closed(1011, "")
    call.on_model_connect_failed(401, "HTTP 401")
    value = metrics.registry.get_sample_value
    assert value("shim_model_sessions_replaced_total", {"outcome": "reconnected"}) == 1
    assert value("shim_model_sessions_replaced_total", {"outcome": "abandoned"}) == 1


def test_a_number_with_a_fallback_destination_transfers_instead_of_hanging_up():
    from shim.call_effects import ResolveAssistant

    from .test_call import _SHELL, make_call, start_frame

    call, rows, clock = make_call(WAITS)
    call.on_twilio_text(start_frame())
    (resolve_effect,) = [e for e in call.take_effects() if type(e) is ResolveAssistant]
    resolve = _SHELL[call][0]
    call.on_setup(resolve(resolve_effect.start), {"type": "number", "number": "+15557654321"})
    call.on_model_text(ev("session.created", session={}))
    call.on_model_text(ev("session.updated", session=PCMU))
    call.on_model_closed(1006, "")
    while call.end is None:
        clock.t += 1
        call.on_model_connect_failed(503, "HTTP 503")
    assert call.end.reason == "pipeline-error-openai-llm-failed"
    assert call.end.next_action["verb"] == "dial" and call.end.next_action["number"] == "+15557654321"
    assert "transfer" in call.end.next_action["say"]
    assert rows.merged("calls", ["call_sid"])[("CA1",)]["transfer"]["number"] == "+15557654321"


# --- what a review found (each a regression test) -------------------------------------------------


def loud(n: int = 160) -> bytes:
    """μ-law bytes of a loud tone (well above the barge-in gate's loudness)."""
    import audioop

    pcm = b"".join(int(8000 * (1 if (i // 8) % 2 else -1)).to_bytes(2, "little", signed=True) for i in range(n))
    return audioop.lin2ulaw(pcm, 2)


def test_lost_again_before_the_new_session_is_ready_sends_nothing_early_or_twice():
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
            "server": {"url": "https://tools.example/hook"}}
    call, rows, clock = live_call(dict(WAITS, model=dict(MINIMAL["model"], tools=[tool])))
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r1"}))
    call.on_model_text(ev("response.output_item.done", response_id="r1", output_index=0, item={
        "id": "f1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "lookup", "arguments": "{}"}))
    call.on_model_text(ev("response.done", response={"id": "r1", "status": "completed"}))
    call.on_model_closed(1006, "")
    new_session(call)  # created (the replay went out)...
    call.on_model_closed(1006, "")  # ...and lost again before session.updated
    from shim_tools.results import ToolOutcome

    call.on_tool_outcome(ToolOutcome("call_1", "ok", "open", None, None, None, 200))
    assert sent(call) == []  # nothing for a socket that does not exist
    frames = new_session(call)
    outputs = [f for f in frames if f["type"] == "conversation.item.create" and f["item"]["type"] == "function_call_output"]
    calls = [f for f in frames if f["type"] == "conversation.item.create" and f["item"]["type"] == "function_call"]
    assert len(outputs) == len(calls) == 1 and frames.index(calls[0]) < frames.index(outputs[0])


def test_what_the_caller_said_during_the_gap_comes_first_and_is_answered_not_talked_over():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r1"}))
    call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\x10" * 800)))
    call.on_model_closed(1011, "")
    for i in range(20):  # 400 ms of voice while the model is away
        twilio(call, media(loud(), ts=20 * i))
    new_session(call)
    clock.t += 3  # a long gap, and a cut-off answer: but the caller spoke, so neither is mentioned
    frames = ready(call)
    assert [f["type"] for f in frames] == ["input_audio_buffer.append"] * 20


def test_a_caller_turn_cut_by_the_loss_mid_utterance_is_sent_again_from_its_start():
    call, rows, clock = live_call(WAITS)
    for i in range(80):  # silence, then the caller starts at 1 s; the server notices 600 ms later
        twilio(call, media(loud() if i >= 50 else b"\xff" * 160, ts=20 * i))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=1000, item_id="u1"))
    for i in range(80, 100):
        twilio(call, media(loud(), ts=20 * i))
    sent(call)
    call.on_model_closed(1006, "")
    new_session(call)
    appends = [f for f in ready(call) if f["type"] == "input_audio_buffer.append"]
    assert len(appends) == 65  # from 300 ms before the onset (the server's prefix padding) to the loss
    assert appends[15]["audio"] == b64(loud())


def test_a_transcribed_turn_the_lost_session_never_answered_is_answered_by_the_new_one():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="u1"))
    call.on_model_text(ev("conversation.item.input_audio_transcription.completed", item_id="u1", content_index=0,
                          transcript="Are you open today?"))
    call.on_model_closed(1006, "")
    items = new_session(call)[1:]
    assert [i["item"]["content"][0]["text"] for i in items] == ["Are you open today?"]
    frames = ready(call)
    assert [f["response"]["metadata"]["purpose"] for f in frames if f["type"] == "response.create"] == ["reply"]


def test_noise_judged_before_the_loss_does_not_cancel_a_real_reply_after_it():
    call, rows, clock = live_call(dict(WAITS, stopSpeakingPlan={"voiceSeconds": 0.5}))
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r1"}))
    call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\x10" * 8000)))
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="n1"))
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=300, item_id="n1"))  # a cough
    call.on_model_closed(1006, "")
    new_session(call)
    ready(call)
    call.on_model_text(ev("response.created", response={"id": "r2"}))  # the server answers a real turn
    assert not [f for f in sent(call) if f["type"] == "response.cancel"]


def test_replay_keeps_a_function_result_with_its_call_and_caps_huge_items():
    conversation = Conversation()
    for i in range(300):
        conversation.add(Turn("user", f"question {i} " + "x" * 80))
    conversation.add(Turn("function_call", "{}", call_id="c1", name="book"))
    conversation.add(Turn("function_call_output", "y" * 1_000_000, call_id="c1"))
    conversation.add(Turn("assistant", "Your booking is confirmed."))
    replay = conversation.replay()
    roles = [t.role for t in replay]
    assert roles[-3:] == ["function_call", "function_call_output", "assistant"]
    assert len(replay[-2].text) < 5000 and replay[-2].text.endswith("(cut)")
    assert any(t.role == "user" for t in replay)  # one big item does not condense everything before it


def test_a_cut_off_answers_replayed_words_are_those_its_audio_could_hold():
    conversation = Conversation()
    turn = conversation.assistant("a1")
    turn.parts.append("On Saturdays we are open from nine in the morning until one in the afternoon.")
    conversation.audio_bytes["a1"] = 8 * 1000  # 1 s of audio generated before the loss
    assert conversation.text_of("a1", turn) == "On Saturdays we"  # ~16 characters a second, whole words


def test_the_cut_off_answer_goes_on_before_requests_queued_during_the_gap():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_text(ev("response.created", response={"id": "r1"}))
    call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\x10" * 800)))
    call.on_model_closed(1006, "")
    call._request_response("Say exactly: one moment", "tool-message")
    new_session(call)
    creates = [f["response"]["metadata"]["purpose"] for f in ready(call) if f["type"] == "response.create"]
    assert creates == ["resume"]  # first; the tool message waits its turn


def test_a_pending_goodbye_is_not_hung_up_during_the_gap():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call._end_after_playback("assistant-ended-call", say_first="Goodbye!")
    call.on_model_closed(1006, "")
    for _ in range(14):  # 7 s: past the goodbye's own deadline (text length + 5 s)
        clock.t += 0.5
        call.tick()
    assert call.end is None
    new_session(call)
    frames = ready(call)
    assert [f["response"]["metadata"]["purpose"] for f in frames if f["type"] == "response.create"] == ["goodbye"]


def test_a_reconnect_note_is_for_that_session_only():
    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_closed(1006, "")
    clock.t += 3
    new_session(call)
    assert any(f["type"] == "conversation.item.create" for f in ready(call))  # the note about the gap
    call.on_model_closed(1006, "")
    items = [f for f in new_session(call) if f["type"] == "conversation.item.create"]
    assert items == []  # not replayed into the next session


def test_the_model_socket_opens_while_the_assistant_is_resolved():
    """start → session.update is max(connect, resolve), not their sum: the socket is asked for
    with the assistant, and a session.created that comes first waits for the configuration."""
    from shim.call_effects import ResolveAssistant

    from .test_call import _SHELL, make_call, start_frame

    call, rows, clock = make_call(WAITS)
    call.on_twilio_text(start_frame())
    effects = call.take_effects()
    # the connect first: its handshake goes out before a resolution on the event loop runs
    assert [type(e) for e in effects] == [ConnectModel, ResolveAssistant]
    call.on_model_text(ev("session.created", session={}))  # the socket won the race
    assert sent(call) == []  # nothing to configure yet
    call.on_setup(_SHELL[call][0](effects[1].start))
    (update,) = sent(call)
    assert update["type"] == "session.update" and update["session"]["instructions"].startswith("Be brief.")
    assert not [e for e in call.take_effects() if type(e) is ConnectModel]  # one socket, not two


def test_a_model_refused_while_the_assistant_loads_still_transfers_to_the_fallback():
    from shim.call_effects import ResolveAssistant

    from .test_call import _SHELL, make_call, start_frame

    call, rows, clock = make_call(WAITS)
    call.on_twilio_text(start_frame())
    (resolve_effect,) = [e for e in call.take_effects() if type(e) is ResolveAssistant]
    call.on_model_connect_failed(401, "HTTP 401")  # the early connect loses before the set-up is in
    assert call.end is None
    call.on_setup(_SHELL[call][0](resolve_effect.start), {"type": "number", "number": "+15557654321"})
    assert call.end.reason == "pipeline-error-openai-401-unauthorized"
    assert call.end.next_action["verb"] == "dial" and call.end.next_action["number"] == "+15557654321"


def test_a_turn_longer_than_what_can_be_held_keeps_its_newest_audio_and_the_gap():
    from shim.call import MAX_EARLY_FRAMES

    call, rows, clock = live_call(WAITS)
    sent(call)
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    for i in range(750):  # a 15 s turn, still going when the socket drops
        twilio(call, media(bytes([i % 250]) * 160, ts=20 * i))
    call.on_model_closed(1006, "")
    for i in range(750, 760):  # 200 ms during the gap
        twilio(call, media(bytes([i % 250]) * 160, ts=20 * i))
    new_session(call)
    appends = [f["audio"] for f in ready(call) if f["type"] == "input_audio_buffer.append"]
    assert len(appends) == MAX_EARLY_FRAMES
    assert appends[-1] == b64(bytes([759 % 250]) * 160)  # nothing after the loss is missing
    assert appends[-11] == b64(bytes([749 % 250]) * 160)  # nor the turn's last frame before it


def test_no_turn_in_flight_keeps_only_the_last_1_5_s_of_recent_audio():
    from shim.call import RECENT_IDLE_FRAMES

    call, rows, clock = live_call(WAITS)
    for i in range(300):
        twilio(call, media(b"\xff" * 160, ts=20 * i))
    assert len(call._recent_audio) == RECENT_IDLE_FRAMES


def test_the_ring_holds_a_whole_turn_then_shrinks_back_to_1_5_s_once_answered():
    from shim.call import RECENT_IDLE_FRAMES

    call, rows, clock = live_call(WAITS)
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u1"))
    for i in range(300):  # a 6 s turn: all of it is kept, to be sent again if the model is lost
        twilio(call, media(bytes([i % 250]) * 160, ts=20 * i))
    assert len(call._recent_audio) == 300
    call.on_model_text(ev("input_audio_buffer.speech_stopped", audio_end_ms=6000, item_id="u1"))
    twilio(call, media(b"\x01" * 160, ts=6000))
    assert len(call._recent_audio) == 301  # waiting for the reply: still in flight
    call.on_model_text(ev("response.output_audio.delta", response_id="r1", item_id="a1", delta=b64(b"\xff" * 800)))
    assert len(call._recent_audio) == RECENT_IDLE_FRAMES  # answered: the newest 1.5 s only
    assert call._recent_audio[-1][1] == b64(b"\x01" * 160).encode()


def test_a_turn_sent_again_is_kept_whole_if_the_next_session_is_lost_too():
    call, rows, clock = live_call(WAITS)
    for i in range(200):  # the caller starts at 1 s and talks for 3 s (more than the idle ring holds)
        twilio(call, media(loud() if i >= 50 else b"\xff" * 160, ts=20 * i))
        if i == 80:
            call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=1000, item_id="u1"))
    sent(call)
    call.on_model_closed(1006, "")
    new_session(call)
    first = [f for f in ready(call) if f["type"] == "input_audio_buffer.append"]
    assert len(first) == 165  # from 300 ms before the onset to the loss
    # the new session hears the turn again in what was re-sent (its timeline starts at 0) ...
    call.on_model_text(ev("input_audio_buffer.speech_started", audio_start_ms=300, item_id="u1b"))
    call.on_model_closed(1006, "")  # ... and is lost too, before it answered
    new_session(call)
    again = [f for f in ready(call) if f["type"] == "input_audio_buffer.append"]
    assert again == first
