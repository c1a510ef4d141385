"""Assistant settings that change how a call behaves, through the real server."""

from __future__ import annotations

import asyncio
import math


try:
    import audioop
except ImportError:  # pragma: no cover
    import audioop_lts as audioop

from shim.testing import load_asset
from shim.testing.fake_realtime import Script
from shim.testing.twilio_caller import keep_line_open

from .harness import running_shim
from .test_bridge_e2e import fetchrow

GREETING = "Hi, thanks for calling Brightside Dental, this is Maya. How can I help?"
ANSWER = "On Saturdays we are open from nine in the morning until one in the afternoon, and we also take walk ins."


def tone(ms: int, level: int = 8000) -> bytes:
    """A loud 440 Hz μ-law tone: a cough or a knock, as far as a VAD is concerned."""
    n = ms * 8
    pcm = b"".join(int(level * math.sin(2 * math.pi * 440 * i / 8000)).to_bytes(2, "little", signed=True) for i in range(n))
    return audioop.lin2ulaw(pcm, 2)


async def test_greeting_modes(tmp_path, db_dsn):
    script = Script(replies=["Hello, how can I help?"], audio_ms_per_char=20)
    async with running_shim(tmp_path, db_dsn, script, assistant_overrides={"firstMessageMode": "assistant-waits-for-user"}) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await caller.send_silence(800)
        assert session.events_of("response.create") == [] and len(caller.received_audio) == 0
        await caller.stop()
    async with running_shim(tmp_path, db_dsn, script,
                            assistant_overrides={"firstMessageMode": "assistant-speaks-first-with-model-generated-message"}) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
        (create,) = session.events_of("response.create")
        assert "instructions" not in create.get("response", {})  # the model writes its own greeting
        await caller.stop()
    assert run.fake.validation_errors == []


async def test_short_noise_does_not_cut_the_assistant_off_but_sustained_speech_does(tmp_path, db_dsn):
    script = Script(replies=[ANSWER, "Sure."], user_transcripts=["what time", "mm", "wait"], audio_ms_per_char=25)
    overrides = {"firstMessageMode": "assistant-waits-for-user", "stopSpeakingPlan": {"voiceSeconds": 0.3}}
    async with running_shim(tmp_path, db_dsn, script, assistant_overrides=overrides) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await caller.send_silence(200)
        await caller.send_audio(load_asset("caller_question"))
        await keep_line_open(caller, caller.wait_for_audio(8000, timeout=10))  # the answer is playing
        await caller.send_audio(tone(120))  # a knock: the model's VAD hears speech...
        await caller.send_silence(1500)  # ...the shim's gate does not cut the assistant off
        assert caller.clears == 0
        assert session.truncations == []
        played_before = len(caller.played_audio)
        await caller.send_audio(load_asset("caller_interrupt"))  # real speech over the assistant
        await caller.send_silence(300)
        assert caller.clears == 1
        await caller.stop()
        await run.drain()
    assert len(caller.played_audio) > played_before  # the answer went on playing after the knock
    # the reply the model started for the knock was cancelled, and none of it was played
    (cancel,) = session.events_of("response.cancel")
    knock_reply = next(e["response"] for e in session.sent if e["type"] == "response.created" and e["response"]["id"] == cancel["response_id"])
    assert knock_reply["id"] != next(e for e in session.sent if e["type"] == "response.created")["response"]["id"]
    assert len(session.truncations) == 1  # only the real interruption truncated the answer
    event = await fetchrow(db_dsn, "SELECT count(*) AS n FROM call_events WHERE call_sid = $1 AND kind = 'interruption_ignored'", caller.call_sid)
    assert event["n"] == 1
    assert run.fake.validation_errors == [] and caller.protocol_errors == []


async def test_end_call_phrase_hangs_up_after_the_goodbye_is_heard(tmp_path, db_dsn):
    goodbye = "You are welcome, goodbye!"
    script = Script(replies=[goodbye], user_transcripts=["thanks, that is all"], audio_ms_per_char=25)
    overrides = {"firstMessageMode": "assistant-waits-for-user", "endCallPhrases": ["Goodbye"]}
    async with running_shim(tmp_path, db_dsn, script, assistant_overrides=overrides) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await caller.send_silence(200)
        await caller.send_audio(load_asset("caller_question"))
        await keep_line_open(caller, caller.wait_closed(timeout=15))  # the shim hangs up by itself
        ended = await run.twilio_post("/twilio/stream-ended", {"CallSid": caller.call_sid})
        await run.drain()
    spoken = bytes(next(iter(session.audio_out.values())))
    assert bytes(caller.played_audio) == spoken  # every word of the goodbye was heard first
    assert "<Hangup" in ended.text and "<Say>" not in ended.text
    call = await fetchrow(db_dsn, "SELECT ended_reason FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "assistant-said-end-call-phrase"


async def test_silence_timeout_and_max_duration_end_calls_as_vapi_names_them(tmp_path, db_dsn):
    async def call_until_hangup(name: str, overrides: dict) -> str:
        async with running_shim(tmp_path / name, db_dsn, Script(replies=["Okay."], audio_ms_per_char=20),
                                assistant_overrides=overrides) as run:
            caller = await run.place_call()
            await keep_line_open(caller, caller.wait_closed(timeout=15))  # the line stays open, nobody talks
            await run.drain()
        return caller.call_sid

    quiet, long = await asyncio.gather(
        call_until_hangup("quiet", {"firstMessageMode": "assistant-waits-for-user", "silenceTimeoutSeconds": 5}),
        call_until_hangup("long", {"maxDurationSeconds": 10, "silenceTimeoutSeconds": 3600}),
    )
    sql = "SELECT ended_reason, extract(epoch FROM ended_at - started_at) AS took FROM calls WHERE call_sid = $1"
    call = await fetchrow(db_dsn, sql, quiet)
    assert call["ended_reason"] == "silence-timed-out" and 4.5 <= call["took"] <= 7
    call = await fetchrow(db_dsn, sql, long)
    assert call["ended_reason"] == "exceeded-max-duration" and 9.5 <= call["took"] <= 12


async def test_background_sound_is_under_the_voice_when_on(tmp_path, db_dsn):
    script = Script(audio_ms_per_char=20)
    async with running_shim(tmp_path, db_dsn, script, assistant_overrides={"backgroundSound": "office"}) as run:
        caller = await run.place_call()
        session = await run.fake.wait_for_session()
        await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
        await keep_line_open(caller, caller.wait_until_played(timeout=15))
        await caller.stop()
    voice = bytes(next(iter(session.audio_out.values())))
    heard = bytes(caller.received_audio)
    assert len(heard) == len(voice) and heard != voice
    voice_pcm, heard_pcm = audioop.ulaw2lin(voice, 2), audioop.ulaw2lin(heard, 2)
    ambience = audioop.add(heard_pcm, audioop.mul(voice_pcm, 2, -1), 2)
    ratio_db = 20 * math.log10(max(audioop.rms(ambience, 2), 1) / audioop.rms(voice_pcm, 2))
    assert -35 < ratio_db < -8  # audible, well under the voice


async def test_recording_starts_on_the_live_call_and_its_url_is_stored(tmp_path, db_dsn):
    from shim.testing.fake_twilio_api import FakeTwilioApi

    from .harness import AUTH_TOKEN

    account = "AC" + "1" * 32
    async with FakeTwilioApi(account, AUTH_TOKEN) as twilio_api:
        for name, overrides in (("on", {}), ("off", {"artifactPlan": {"recordingEnabled": False}})):
            async with running_shim(tmp_path / name, db_dsn, Script(audio_ms_per_char=20), assistant_overrides=overrides,
                                    twilio_account_sid=account, twilio_api_base=twilio_api.url) as run:
                caller = await run.place_call()
                await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
                await caller.stop()
                await run.drain()
            call = await fetchrow(db_dsn, "SELECT recording_url FROM calls WHERE call_sid = $1", caller.call_sid)
            if name == "on":
                (request,) = twilio_api.of(f"/Calls/{caller.call_sid}/Recordings.json")
                assert request.form == {"RecordingChannels": "dual", "RecordingTrack": "both"}
                assert call["recording_url"].startswith(f"{twilio_api.url}/2010-04-01/Accounts/")
            else:
                assert twilio_api.of(f"/Calls/{caller.call_sid}/Recordings.json") == []
                assert call["recording_url"] is None


async def test_a_recording_that_cannot_start_does_not_end_the_call(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn, Script(audio_ms_per_char=20), twilio_account_sid="AC" + "2" * 32,
                            twilio_api_base="http://127.0.0.1:9") as run:
        caller = await run.place_call()
        await keep_line_open(caller, caller.wait_for_audio(1, timeout=10))
        await keep_line_open(caller, caller.wait_until_played(timeout=10))
        assert not caller.closed  # the call goes on
        await caller.stop()
        await run.drain()
    call = await fetchrow(db_dsn, "SELECT ended_reason, recording_url FROM calls WHERE call_sid = $1", caller.call_sid)
    assert call["ended_reason"] == "customer-ended-call" and call["recording_url"] is None
    event = await fetchrow(db_dsn, "SELECT detail FROM call_events WHERE call_sid = $1 AND kind = 'recording_failed'", caller.call_sid)
    assert event is not None
