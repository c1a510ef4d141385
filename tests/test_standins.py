"""The local stand-ins must be faithful: these tests fail if they drift from the real protocols."""

from __future__ import annotations

import asyncio
import base64
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

from shim.testing import CALLER_INTERRUPT_TEXT, CALLER_QUESTION_TEXT, load_asset
from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.twilio_caller import TwilioCaller, incoming_call_params, post_twilio_webhook, sign

PCMU_SESSION = {
    "type": "realtime",
    "audio": {
        "input": {"format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-4o-mini-transcribe"}},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
    },
}
REPLY = "We are open from nine to one on Saturdays."


class RealtimeClient:
    """The smallest possible Realtime client: send events, read until a type shows up."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(event).decode())

    async def until(self, type_: str, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                event = orjson.loads(await self.ws.recv())
                self.events.append(event)
                if event["type"] == type_:
                    return event

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    async def append(self, ulaw: bytes, frame: int = 160) -> None:
        for i in range(0, len(ulaw), frame):
            chunk = base64.b64encode(ulaw[i : i + frame]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with FakeRealtime(Script(replies=[REPLY], user_transcripts=[CALLER_QUESTION_TEXT], generation_speed=0)) as f:
        yield f


async def open_client(fake: FakeRealtime, session: dict[str, Any] | None = None) -> RealtimeClient:
    client = RealtimeClient(await connect(fake.url + "?model=gpt-realtime-2.1", proxy=None))
    created = await client.until("session.created")
    assert created["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    if session is not None:
        await client.send({"type": "session.update", "session": session})
        await client.until("session.updated")
    return client


# ---- fake Realtime: validation ---------------------------------------------------------------


async def test_session_created_is_realistic(fake: FakeRealtime) -> None:
    client = await open_client(fake)
    session = client.events[0]["session"]
    assert session["id"].startswith("sess_") and session["object"] == "realtime.session"
    assert session["model"] == "gpt-realtime-2.1" and session["audio"]["output"]["voice"] == "alloy"
    assert (await fake.wait_for_session()).model == "gpt-realtime-2.1"
    assert fake.validation_errors == []
    await client.ws.close()


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        ({"type": "realtime", "input_audio_format": "g711_ulaw"}, "unknown_parameter", "session.input_audio_format"),
        ({"type": "realtime", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
        ({"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu", "rate": 8000}}}},
         "unknown_parameter", "session.audio.output.format.rate"),
        ({"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm"}}}},
         "missing_required_parameter", "session.audio.output.format.rate"),
        ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "missing_required_parameter", "session.type"),
        ({"type": "realtime", "audio": {"input": {"format": {"type": "g711_ulaw"}}}}, "invalid_value", None),
        ({"type": "realtime", "audio": {"input": {"format": None}}}, "invalid_type", "session.audio.input.format"),
        ({"type": "transcription"}, "invalid_value", "session.type"),
    ],
)
async def test_invalid_session_update_is_reported_and_answered(
    fake: FakeRealtime, session: dict[str, Any], code: str, param: str | None
) -> None:
    client = await open_client(fake)
    await client.send({"type": "session.update", "event_id": "evt_bad", "session": session})
    error = (await client.until("error"))["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code
    assert error["event_id"] == "evt_bad"
    if param is not None:
        assert error["param"] == param
    assert len(fake.validation_errors) == 1 and fake.validation_errors[0].startswith("client session.update")
    assert "session.updated" not in client.types()
    assert fake.sessions[0].session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    await client.ws.close()


async def test_session_update_merges(fake: FakeRealtime) -> None:
    client = await open_client(fake)
    await client.send(
        {
            "type": "session.update",
            "session": {**PCMU_SESSION, "instructions": "Be brief.",
                        "audio": {**PCMU_SESSION["audio"], "input": {**PCMU_SESSION["audio"]["input"],
                                                                     "turn_detection": {"type": "server_vad",
                                                                                        "silence_duration_ms": 400}}}},
        }
    )
    updated = (await client.until("session.updated"))["session"]
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"}  # replaced, no stale "rate"
    assert updated["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.0}
    td = updated["audio"]["input"]["turn_detection"]
    assert td["silence_duration_ms"] == 400 and td["prefix_padding_ms"] == 300 and td["create_response"] is True
    assert updated["instructions"] == "Be brief." and updated["tool_choice"] == "auto"  # untouched field kept

    # Only the fields present change; an explicit null clears.
    await client.send({"type": "session.update",
                       "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    updated = (await client.until("session.updated"))["session"]
    assert updated["audio"]["input"]["turn_detection"] is None
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"} and updated["instructions"] == "Be brief."
    assert fake.sessions[0].session == updated
    assert fake.validation_errors == []
    await client.ws.close()


async def test_handshake_requires_api_key() -> None:
    async with FakeRealtime(Script(require_api_key="sk-test")) as fake:
        with pytest.raises(InvalidStatus) as refused:
            await connect(fake.url + "?model=gpt-realtime", additional_headers={"Authorization": "Bearer nope"})
        assert refused.value.response.status_code == 401
        async with connect(fake.url + "?model=gpt-realtime", additional_headers={"Authorization": "Bearer sk-test"}):
            session = await fake.wait_for_session()
        assert session.headers["authorization"] == "Bearer sk-test"
        assert fake.connections_attempted == 2 and len(fake.sessions) == 1


# ---- fake Realtime: behaviour ---------------------------------------------------------------

AGENT_TURN = [
    "response.created",
    "rate_limits.updated",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio_transcript.delta",
    "response.output_audio.delta",
    "conversation.item.input_audio_transcription.completed",  # the caller transcript trails the reply
]
AGENT_TURN_END = [
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


async def test_vad_turn_produces_response_audio(fake: FakeRealtime) -> None:
    client = await open_client(fake, PCMU_SESSION)
    speech = load_asset("caller_question") + b"\xff" * 8 * 600
    await client.append(speech)
    done = await client.until("response.done")

    types = client.types()
    start = types.index("input_audio_buffer.speech_started")
    assert types[start : start + 6] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.delta",
    ]
    assert types[start + 6 : start + 14] == AGENT_TURN
    assert types[-6:] == AGENT_TURN_END
    middle = types[start + 14 : -6]
    assert set(middle) == {"response.output_audio_transcript.delta", "response.output_audio.delta"}

    stopped = client.of("input_audio_buffer.speech_stopped")[0]
    assert 3000 < stopped["audio_end_ms"] < 3700
    transcript = client.of("conversation.item.input_audio_transcription.completed")[0]
    assert transcript["transcript"] == CALLER_QUESTION_TEXT and transcript["item_id"] == stopped["item_id"]

    session = fake.sessions[0]
    assert bytes(session.audio_in) == speech
    item_id = client.of("response.output_item.added")[0]["item"]["id"]
    collected = b"".join(base64.b64decode(e["delta"]) for e in client.of("response.output_audio.delta"))
    assert collected == bytes(session.audio_out[item_id])
    assert len(collected) == round(len(REPLY) * 55.0 * 8)  # mu-law 8 kHz: 8 bytes per ms
    assert all(len(base64.b64decode(e["delta"])) <= 800 for e in client.of("response.output_audio.delta"))
    assert "".join(e["delta"] for e in client.of("response.output_audio_transcript.delta")) == REPLY
    response = done["response"]
    assert response["status"] == "completed" and response["output"][0]["content"][0]["transcript"] == REPLY
    assert session.sent == client.events
    assert fake.validation_errors == []
    await client.ws.close()


async def test_response_create_cancel_and_errors() -> None:
    script = Script(replies=["x" * 60], generation_speed=4.0)  # 3.3 s of audio, generated in ~0.8 s
    async with FakeRealtime(script) as fake:
        client = await open_client(fake, PCMU_SESSION)
        await client.send({"type": "response.cancel", "event_id": "c0"})
        error = (await client.until("error"))["error"]
        assert (error["code"], error["event_id"]) == ("response_cancel_not_active", "c0")

        await client.send({"type": "response.create"})
        await client.until("response.output_audio.delta")
        await client.send({"type": "response.create", "event_id": "c1"})
        error = (await client.until("error"))["error"]
        assert (error["code"], error["event_id"]) == ("conversation_already_has_active_response", "c1")

        await client.send({"type": "response.cancel"})
        done = (await client.until("response.done"))["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert client.of("response.output_item.done")[0]["item"]["status"] == "incomplete"
        assert "response.output_audio.done" in client.types()
        item_id = done["output"][0]["id"]
        assert 0 < len(fake.sessions[0].audio_out[item_id]) < 60 * 55 * 8  # stopped early
        assert len(client.of("response.created")) == 1

        # A word-for-word greeting: the last double-quoted string after "say"/"exactly".
        await client.send({"type": "response.create", "response": {
            "instructions": 'Greet the caller. Say exactly: “Thanks for calling Acme Dental, how can I help?”'}})
        done = (await client.until("response.done"))["response"]
        assert done["output"][0]["content"][0]["transcript"] == "Thanks for calling Acme Dental, how can I help?"
        assert fake.validation_errors == []
        await client.ws.close()


async def test_barge_in_cancels_the_active_response() -> None:
    async with FakeRealtime(Script(replies=["y" * 80], generation_speed=2.0)) as fake:
        client = await open_client(fake, PCMU_SESSION)
        await client.send({"type": "response.create"})
        await client.until("response.output_audio.delta")
        await client.append(load_asset("caller_interrupt")[:1600])  # 200 ms of speech
        await client.until("input_audio_buffer.speech_started")
        done = (await client.until("response.done"))["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
        assert fake.validation_errors == []
        await client.ws.close()


async def test_truncate_checks_the_item_audio(fake: FakeRealtime) -> None:
    client = await open_client(fake, PCMU_SESSION)
    await client.send({"type": "response.create"})
    done = (await client.until("response.done"))["response"]
    item_id = done["output"][0]["id"]
    duration_ms = len(REPLY) * 55  # 2310 ms

    await client.send({"type": "conversation.item.truncate", "event_id": "t1", "item_id": item_id,
                       "content_index": 0, "audio_end_ms": duration_ms + 500})
    error = (await client.until("error"))["error"]
    assert error["event_id"] == "t1"
    assert error["message"] == f"Audio content of {duration_ms}ms is already shorter than {duration_ms + 500}ms"

    await client.send({"type": "conversation.item.truncate", "item_id": "item_unknown", "content_index": 0,
                       "audio_end_ms": 10})
    await client.until("error")

    await client.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                       "audio_end_ms": 1200})
    truncated = await client.until("conversation.item.truncated")
    assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 1200)
    assert [t["audio_end_ms"] for t in fake.sessions[0].truncations] == [duration_ms + 500, 10, 1200]
    assert fake.validation_errors == []  # state errors are not protocol violations
    await client.ws.close()


async def test_items_buffer_and_commit(fake: FakeRealtime) -> None:
    client = await open_client(fake, {"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "(caller connected)"}]}})
    added = await client.until("conversation.item.added")
    item_id = added["item"]["id"]
    assert (await client.until("conversation.item.done"))["item"]["id"] == item_id
    await client.send({"type": "conversation.item.delete", "item_id": item_id})
    assert (await client.until("conversation.item.deleted"))["item_id"] == item_id

    await client.append(b"\xff" * 400)  # 50 ms of pcm24k-interpreted bytes is ~8 ms: too little
    await client.send({"type": "input_audio_buffer.commit", "event_id": "k1"})
    error = (await client.until("error"))["error"]
    assert (error["code"], error["event_id"]) == ("input_audio_buffer_commit_empty", "k1")
    await client.send({"type": "input_audio_buffer.clear"})
    await client.until("input_audio_buffer.cleared")
    assert "input_audio_buffer.speech_started" not in client.types()  # turn_detection is off
    assert fake.validation_errors == []
    await client.ws.close()


async def test_concurrent_sessions_do_not_share_state() -> None:
    script = Script(replies=["First reply.", "Second reply."],
                    user_transcripts=[CALLER_QUESTION_TEXT, CALLER_INTERRUPT_TEXT], generation_speed=0)
    async with FakeRealtime(script) as fake:

        async def call(asset: str, voice: str) -> RealtimeClient:
            session = {**PCMU_SESSION, "audio": {**PCMU_SESSION["audio"],
                                                 "output": {"format": {"type": "audio/pcmu"}, "voice": voice}}}
            client = await open_client(fake, session)
            await client.append(load_asset(asset) + b"\xff" * 8 * 600)
            await client.until("response.done")
            return client

        a, b = await asyncio.gather(call("caller_question", "marin"), call("caller_interrupt", "cedar"))
        for client in (a, b):  # each session starts its own script from the top
            assert client.of("response.output_audio_transcript.done")[0]["transcript"] == "First reply."
            assert client.of("conversation.item.input_audio_transcription.completed")[0]["transcript"] == \
                CALLER_QUESTION_TEXT
        by_voice = {s.session["audio"]["output"]["voice"]: s for s in fake.sessions}
        assert bytes(by_voice["marin"].audio_in) == load_asset("caller_question") + b"\xff" * 4800
        assert bytes(by_voice["cedar"].audio_in) == load_asset("caller_interrupt") + b"\xff" * 4800
        assert not set(by_voice["marin"].audio_out) & set(by_voice["cedar"].audio_out)
        assert fake.validation_errors == []
        await asyncio.gather(a.ws.close(), b.ws.close())


async def test_drop_after_responses_and_fault_injection() -> None:
    async with FakeRealtime(Script(generation_speed=0, drop_after_responses=1)) as fake:
        client = await open_client(fake, PCMU_SESSION)
        session = fake.sessions[0]
        await session.send({"type": "error", "error": {"type": "server_error", "code": None,
                                                        "message": "The server had an error", "event_id": None}})
        await client.until("error")
        await session.send({"type": "response.audio.delta"}, validate=False)  # beta name, deliberately
        await client.until("response.audio.delta")
        await client.send({"type": "response.create"})
        await client.until("response.done")
        await asyncio.wait_for(session.closed.wait(), 5)
        await client.ws.wait_closed()
        assert client.ws.close_code == 1011
        assert fake.validation_errors == []


async def test_beta_protocol_is_refused(fake: FakeRealtime) -> None:
    async with connect(fake.url + "?model=gpt-realtime", additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        error = orjson.loads(await ws.recv())
        assert error["type"] == "error" and error["error"]["code"] == "beta_api_shape_disabled"
        await ws.wait_closed()
        assert ws.close_code == 4000
    assert fake.validation_errors == ["handshake: OpenAI-Beta header (beta protocol)"]


async def test_text_response_and_item_retrieve(fake: FakeRealtime) -> None:
    client = await open_client(fake, PCMU_SESSION)
    await client.send({"type": "response.create", "response": {"output_modalities": ["text"],
                                                                "conversation": "auto", "metadata": {"k": "v"}}})
    done = (await client.until("response.done"))["response"]
    assert done["metadata"] == {"k": "v"} and done["output"][0]["content"] == [{"type": "output_text", "text": REPLY}]
    assert "".join(e["delta"] for e in client.of("response.output_text.delta")) == REPLY
    assert not client.of("response.output_audio.delta") and fake.sessions[0].audio_out == {}
    await client.send({"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]})
    assert (await client.until("conversation.item.retrieved"))["item"]["role"] == "assistant"
    assert fake.validation_errors == []
    await client.ws.close()


# ---- simulated Twilio caller ----------------------------------------------------------------


class StubMediaServer:
    """A scripted stand-in for the shim's media endpoint: records what the caller sends and runs
    `behaviour(ws, start_message)` once the stream started."""

    def __init__(self, behaviour: Any, auth_token: str = "secret"):
        self.behaviour = behaviour
        self.auth_token = auth_token
        self.messages: list[dict[str, Any]] = []
        self.signature: str | None = None
        self.url = ""
        self.done = asyncio.Event()

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.signature = request.headers.get("X-Twilio-Signature")
        if not RequestValidator(self.auth_token).validate(self.url, {}, self.signature or ""):
            return connection.respond(403, "bad signature\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        async def read() -> None:
            async for raw in ws:
                self.messages.append(orjson.loads(raw))

        reader = asyncio.create_task(read())
        while len(self.messages) < 2:
            await asyncio.sleep(0.005)
        try:
            await self.behaviour(ws, self.messages[1])
        finally:
            self.done.set()
            await ws.close()
            await reader

    async def __aenter__(self) -> StubMediaServer:
        self._server = await serve(self.handler, "127.0.0.1", 0, process_request=self.process_request)
        self.url = f"ws://127.0.0.1:{next(iter(self._server.sockets)).getsockname()[1]}/twilio/media"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


def media(sid: str, audio: bytes, **extra: Any) -> str:
    return orjson.dumps({"event": "media", "streamSid": sid, "media": {"payload": base64.b64encode(audio).decode()},
                         **extra}).decode()


def mark(sid: str, name: str) -> str:
    return orjson.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}}).decode()


async def test_caller_speaks_twilio(tmp_path: Path) -> None:
    async def behaviour(ws: ServerConnection, start: dict[str, Any]) -> None:
        await asyncio.sleep(0.3)

    async with StubMediaServer(behaviour) as stub:
        caller = TwilioCaller(stub.url, "secret", custom_parameters={"token": "abc"})
        await caller.connect()
        await caller.send_audio(load_asset("caller_interrupt")[:800], realtime=False)
        await caller.send_silence(40)
        await caller.send_dtmf("5")
        await caller.stop()
        await asyncio.wait_for(stub.done.wait(), 5)

    assert stub.signature == sign("secret", stub.url)
    connected, start, *rest = stub.messages
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["sequenceNumber"] == "1" and start["streamSid"] == caller.stream_sid
    assert start["start"]["customParameters"] == {"token": "abc"} and start["start"]["tracks"] == ["inbound"]
    assert start["start"]["callSid"].startswith("CA") and len(start["start"]["accountSid"]) == 34
    medias = [m for m in rest if m["event"] == "media"]
    assert [m["media"]["timestamp"] for m in medias][:6] == ["0", "20", "40", "60", "80", "100"]
    assert [m["media"]["chunk"] for m in medias] == [str(i) for i in range(1, 8)]
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in medias)
    assert [m["sequenceNumber"] for m in rest] == [str(i) for i in range(2, 2 + len(rest))]
    assert [m["event"] for m in rest[-2:]] == ["dtmf", "stop"]
    assert rest[-2]["dtmf"] == {"track": "inbound_track", "digit": "5"}

    with pytest.raises(InvalidStatus):
        async with StubMediaServer(behaviour) as stub:
            await TwilioCaller(stub.url, "secret", custom_parameters={}, signature="wrong").connect()


async def test_caller_playback_marks_and_clear(tmp_path: Path) -> None:
    speech = load_asset("caller_question")

    async def behaviour(ws: ServerConnection, start: dict[str, Any]) -> None:
        sid = start["streamSid"]
        await ws.send(mark(sid, "idle"))  # nothing buffered: echoed at once
        for i in range(0, 3200, 400):  # 400 ms in 50 ms messages
            await ws.send(media(sid, speech[i : i + 400]))
        await ws.send(mark(sid, "m400"))
        await asyncio.sleep(0.6)  # all played by now: the buffer ran dry
        await ws.send(media(sid, speech[:8000]))  # 1 s
        await ws.send(mark(sid, "m1400"))
        await asyncio.sleep(0.1)
        await ws.send(orjson.dumps({"event": "clear", "streamSid": sid}).decode())
        await asyncio.sleep(0.05)

    async with StubMediaServer(behaviour) as stub:
        caller = TwilioCaller(stub.url, "secret", custom_parameters={})
        await caller.connect()
        await caller.send_audio(speech[:1600])  # the caller talks over the first 200 ms
        await asyncio.wait_for(stub.done.wait(), 5)
        await caller.wait_until_played()
        await caller.close()

    echoes = [m for m in stub.messages if m["event"] == "mark"]
    assert [m["mark"]["name"] for m in echoes] == ["idle", "m400", "m1400"] == caller.marks_sent_back
    assert all(m["streamSid"] == caller.stream_sid and m["sequenceNumber"].isdigit() for m in echoes)
    assert caller.clears == 1 and caller.protocol_errors == []
    assert caller.received_audio == speech[:3200] + speech[:8000]
    # 400 ms played, then ~100 ms of the next second before `clear` discarded the rest.
    assert 3200 + 500 <= len(caller.played_audio) <= 3200 + 1400
    assert caller.played_audio == (speech[:3200] + speech[:8000])[: len(caller.played_audio)]

    # Both channels share the stream clock: the caller spoke over the first 400 ms of playback,
    # and the second reply starts ~600 ms after the first one did.
    caller_track, assistant_track = caller.timeline()
    assert len(caller_track) == len(assistant_track)
    assert caller_track[:1600] == speech[:1600]
    first = assistant_track.index(speech[:3200])
    second = assistant_track.index(speech[:400], first + 3200)
    assert first < 400 and 0.55 <= (second - first) / 8000 <= 0.8
    path = tmp_path / "call.wav"
    caller.write_wav(path)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        assert w.getnframes() == len(caller_track)


async def test_caller_mark_timing() -> None:
    """A mark queued behind 400 ms of audio is echoed once that audio played; clear echoes at once."""
    seen: dict[str, float] = {}

    async def behaviour(ws: ServerConnection, start: dict[str, Any]) -> None:
        sid, loop = start["streamSid"], asyncio.get_running_loop()
        await ws.send(media(sid, b"\x7f" * 3200))
        await ws.send(mark(sid, "after-400ms"))
        seen["queued"] = loop.time()
        await ws.send(media(sid, b"\x7f" * 8000))
        await ws.send(mark(sid, "after-1400ms"))
        while not any(m.get("event") == "mark" for m in stub.messages):
            await asyncio.sleep(0.002)
        seen["echo1"] = loop.time()
        await asyncio.sleep(0.2)
        seen["clear"] = loop.time()
        await ws.send(orjson.dumps({"event": "clear", "streamSid": sid}).decode())
        while sum(m.get("event") == "mark" for m in stub.messages) < 2:
            await asyncio.sleep(0.002)
        seen["echo2"] = loop.time()

    async with StubMediaServer(behaviour) as stub:
        async with TwilioCaller(stub.url, "secret", custom_parameters={}) as caller:
            await asyncio.wait_for(stub.done.wait(), 5)
            assert caller.marks_sent_back == ["after-400ms", "after-1400ms"]
    assert 0.38 <= seen["echo1"] - seen["queued"] <= 0.6
    assert seen["echo2"] - seen["clear"] < 0.1
    assert 3200 + 1200 <= len(caller.played_audio) <= 3200 + 2400  # ~200 ms of the second chunk


async def test_caller_flags_protocol_errors() -> None:
    async def behaviour(ws: ServerConnection, start: dict[str, Any]) -> None:
        sid = start["streamSid"]
        await ws.send(media("MZ" + "0" * 32, b"\xff" * 160))  # wrong streamSid
        await ws.send(media(sid, b"\xff" * 160, track="outbound"))  # extra field
        await ws.send(orjson.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "x", "n": 1}}).decode())
        await ws.send(orjson.dumps({"event": "media", "streamSid": sid, "media": {"payload": "%%%"}}).decode())
        await ws.send(orjson.dumps({"event": "clear"}).decode())  # missing streamSid
        await ws.send(orjson.dumps({"event": "hangup", "streamSid": sid}).decode())  # unknown event
        await ws.send(b"\xff" * 160)  # binary frame
        await ws.send("not json")
        await ws.send(media(sid, b"\xff" * 160))  # the only valid one
        await asyncio.sleep(0.05)

    async with StubMediaServer(behaviour) as stub:
        async with TwilioCaller(stub.url, "secret", custom_parameters={}) as caller:
            await asyncio.wait_for(stub.done.wait(), 5)
            await caller.wait_closed()
    errors = caller.protocol_errors
    assert len(errors) == 8
    assert "wrong streamSid" in errors[0] and "fields" in errors[1] and "mark" in errors[2]
    assert "base64" in errors[3] and "clear" in errors[4] and "unknown event" in errors[5]
    assert errors[6].startswith("31950") and errors[7].startswith("31951 not JSON")
    assert all(e.startswith("31951") for e in errors[:6])
    assert caller.received_audio == b"\xff" * 160  # invalid messages are dropped
    assert caller.marks_sent_back == [] and caller.clears == 0


async def test_webhook_is_signed_like_twilio() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["form"] = dict(httpx.QueryParams(request.content.decode()))
        seen["signature"] = request.headers["X-Twilio-Signature"]
        return httpx.Response(200, text="<Response/>")

    params = incoming_call_params("CA" + "1" * 32, "+14155550100", "+14155550199", "AC" + "2" * 32)
    assert params["CallStatus"] == "ringing" and params["Direction"] == "inbound" and params["CallerCity"] == ""
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        response = await post_twilio_webhook(client, "http://testserver/twilio/voice", params, "tok",
                                             signed_url="https://example.com/twilio/voice")
    assert response.status_code == 200
    assert seen["form"] == params  # blank values are posted too: they are part of the signature
    assert RequestValidator("tok").validate("https://example.com/twilio/voice", seen["form"], seen["signature"])
