"""shim parity run + report: a scenario played 20 times on both stacks (the real shim server with
the Realtime stand-in; the Vapi stand-in's websocket agent, deliberately drifting), interrupted
runs, scenario validation and the speech cache."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import wave
from pathlib import Path

import asyncpg
import pytest

from shim.parity import runner
from shim.parity.report import as_html, as_markdown, as_table, fetch_latencies, fetch_report
from shim.parity.scenario import ScenarioError, load_scenario, read_wav_ulaw8k
from shim.testing.fake_customer import FakeCustomer, reply_results
from shim.testing.fake_openai_speech import FakeOpenAISpeech
from shim.testing.fake_realtime import Script, calls
from shim.testing.fake_vapi import FakeVapi
from shim.testing.fake_vapi_agent import ScriptedAgent

from .harness import AUTH_TOKEN, running_shim

VAPI_KEY = "test-vapi-key"
SPEECH_KEY = "sk-speech-test"
SCENARIO = """\
name: book-cleaning
assistant: asst-1
turns:
  - say: "A cleaning on Tuesday, please."
  - say: "Nine works, book it."
expect:
  tools: [check_availability, book_appointment]
"""


def function_tool(name: str, url: str) -> dict:
    return {"type": "function", "messages": [{"type": "request-start", "content": ""}],
            "function": {"name": name, "description": name, "parameters": {"type": "object", "properties": {}}},
            "server": {"url": url}}


def drifting_plan(call_index: int, turn_index: int):
    """Vapi's agent: check then book, except every 5th call books without checking (4 of 20)."""
    if call_index % 5 == 0:
        return [] if turn_index == 0 else [("book_appointment", {"time": "9am"})]
    return [("check_availability", {"day": "tuesday"})] if turn_index == 0 else [("book_appointment", {"time": "9am"})]


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shim.cli", "parity", *args, env={**os.environ, "SHIM_LOG_FORMAT": "console", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


async def test_twenty_runs_on_both_stacks_report_agreement_and_drift(tmp_path, db_dsn):
    scenario = tmp_path / "book.yaml"
    scenario.write_text(SCENARIO)
    agent = ScriptedAgent(drifting_plan, greeting_ms=200, reply_ms=200)
    script = Script(replies=[calls(("check_availability", {"day": "tuesday"})), "Free at nine.",
                             calls(("book_appointment", {"time": "9am"})), "Booked."], audio_ms_per_char=8)
    async with FakeCustomer() as customer, FakeOpenAISpeech(api_key=SPEECH_KEY) as speech, FakeVapi(api_key=VAPI_KEY) as vapi:
        vapi.agent = agent
        customer.on("/tools", reply_results(lambda name, args: "ok"))
        overrides = {"firstMessage": "Hi.", "model": {"provider": "openai", "model": "gpt-4o",
                     "messages": [{"role": "system", "content": "Be brief."}],
                     "tools": [function_tool("check_availability", customer.url("/tools")),
                               function_tool("book_appointment", customer.url("/tools"))]}}
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=overrides) as run:
            env = {"DATABASE_URL": db_dsn, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "PUBLIC_URL": run.config.public_url,
                   "OPENAI_API_KEY": SPEECH_KEY, "OPENAI_BASE_URL": speech.base_url, "VAPI_API_KEY": VAPI_KEY,
                   "VAPI_BASE_URL": vapi.base_url, "SHIM_DATA_DIR": str(tmp_path / "data"),
                   "SHIM_PARITY_AGENT_SILENCE_S": "0.8", "SHIM_PARITY_MAX_WAIT_S": "8"}
            code, out, err = await cli(env, "run", "--scenario", str(scenario), "--runs", "20", "--stack", "both",
                                       "--concurrency", "8")
            await run.drain()
    assert code == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["runs"] == {"shim": {"ok": 20, "partial": 0, "failed": 0}, "vapi": {"ok": 20, "partial": 0, "failed": 0}}
    assert len(speech.requests) == 2  # each sentence rendered once, then cached
    assert run.fake.validation_errors == [] and customer.validation_errors == []

    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT * FROM parity_runs ORDER BY stack")
        assert len(rows) == 40
        shim_rows = [r for r in rows if r["stack"] == "shim"]
        assert all(r["call_sid"] and r["vapi_call_id"] is None for r in shim_rows)
        bad = [dict(r) for r in shim_rows if list(r["tools"]) != ["check_availability", "book_appointment"]]
        assert bad == [], bad[:2]
        assert all(len(r["turn_latency_ms"]) == 2 and min(r["turn_latency_ms"]) > 0 for r in rows)
        assert all(r["cost_usd"] is not None and r["cost_usd"] > 0 for r in rows)
        assert all(r["ended_reason"] == "customer-ended-call" for r in rows)
        # the shim's call rows got their cost from the Realtime usage
        costs = await conn.fetch("SELECT c.cost_usd, c.costs FROM calls c JOIN parity_runs r ON r.call_sid = c.call_sid")
        assert len(costs) == 20 and all(json.loads(c["costs"])[1]["promptTokens"] > 0 for c in costs)
    finally:
        await conn.close()

    code, out, err = await cli({"DATABASE_URL": db_dsn}, "report", "--format", "json")
    assert code == 0, err
    report = {(r["scenario"], r["stack"]): r for r in json.loads(out)}
    shim, vapi_row = report[("book-cleaning", "shim")], report[("book-cleaning", "vapi")]
    assert shim["runs"] == vapi_row["runs"] == 20
    assert shim["modal_tools"] == vapi_row["modal_tools"] == ["check_availability", "book_appointment"]
    assert shim["agreement"] == 1.0 and shim["drift"] is False  # every shim run matches Vapi's modal sequence
    assert vapi_row["agreement"] == 0.8 and vapi_row["drift"] is True  # 4 of Vapi's 20 runs skipped the check
    for row in (shim, vapi_row):
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] and row["cost_per_minute_usd"] > 0
    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await fetch_report(conn, assistant="asst-1", since=None)
        html_out = as_html(rows, await fetch_latencies(conn, assistant=None, since=None), title="t")
    finally:
        await conn.close()
    assert [r["drift"] for r in rows] == [False, True]
    assert "<svg" in html_out and "book-cleaning" in html_out
    assert "src=" not in html_out and "<link" not in html_out and "<script" not in html_out  # self-contained
    assert "DRIFT" in as_table(rows) and "| book-cleaning | vapi |" in as_markdown(rows)


async def test_a_run_cut_short_is_partial_and_a_stopped_batch_leaves_partial_rows(tmp_path, db_dsn, monkeypatch):
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"name": "three-turns", "assistant": "asst-1", "turns": [{"audio": "a.wav"}, {"wait": 0.2}, {"audio": "a.wav"}]}))
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:  # 16 kHz PCM: resampled to 8 kHz mu-law
        from shim.testing.fake_openai_speech import speech_pcm24k
        import audioop

        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(audioop.ratecv(speech_pcm24k(400), 2, 1, 24000, 16000, None)[0])
    loaded = load_scenario(scenario)
    audio = {0: read_wav_ulaw8k(loaded.turns[0].value), 2: read_wav_ulaw8k(loaded.turns[2].value)}
    assert 3000 <= len(audio[0]) <= 3300  # 400 ms at 8 kHz
    monkeypatch.setattr(runner, "SILENCE_S", 0.4)
    monkeypatch.setattr(runner, "MAX_WAIT_S", 5)
    async with FakeVapi(api_key=VAPI_KEY) as vapi:
        vapi.agent = ScriptedAgent(greeting_ms=100, reply_ms=100, hang_up_after_turns=1)
        settings = runner.Settings(target="", auth_token="", number="+15550002222", from_number="+15550001111",
                                   vapi_base=vapi.base_url, vapi_key=VAPI_KEY)
        conn = await asyncpg.connect(db_dsn)
        try:
            _, summaries = await runner.run_batch(conn, loaded, audio, ["vapi"], 1, 1, settings)
            [row] = await conn.fetch("SELECT * FROM parity_runs")
            assert row["status"] == "partial" and row["turns_played"] == 1 and row["turns_total"] == 3
            assert "closed before turn" in row["error"] and row["ended_reason"] == "assistant-ended-call"
            # a batch stopped half-way (Ctrl-C): its runs are kept as partial, not dropped
            vapi.agent.hang_up_after_turns = None
            task = asyncio.create_task(runner.run_batch(conn, loaded, audio, ["vapi"], 2, 2, settings))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stopped = await conn.fetch("SELECT status, error FROM parity_runs WHERE turns_played < turns_total AND error LIKE 'interrupted%'")
            assert len(stopped) == 2 and {r["status"] for r in stopped} == {"partial"}
        finally:
            await conn.close()


def test_scenario_errors_name_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: ''\nturns:\n  - say: ''\n  - audio: missing.wav\n  - dtmf: 'x'\n  - wait: -1\n  - shout: hi\n"
                   "expect: {tools: check}\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(bad)
    for part in ("name:", "turns[0].say", "turns[1].audio: no file", "turns[2].dtmf", "turns[3].wait", "turns[4]",
                 "expect.tools"):
        assert part in str(err.value), part
    stereo = tmp_path / "stereo.wav"
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\0\0" * 1600)
    with pytest.raises(ScenarioError, match="2 channel"):
        read_wav_ulaw8k(stereo)


def stereo_recording(call: dict, rate: int = 16000) -> bytes:
    """Vapi's stereo recording of `call`: customer (left) speaks during the user messages, the
    assistant (right) during the bot messages."""
    import audioop
    import io

    import numpy as np

    from shim.testing.fake_openai_speech import speech_pcm24k

    msgs = call["artifact"]["messages"]
    total_s = max(m.get("endTime", m["time"]) for m in msgs) / 1000 - msgs[0]["time"] / 1000 + 1
    left = np.zeros(int(total_s * rate), dtype="<i2")
    right = np.zeros_like(left)
    for m in msgs:
        if m["role"] not in ("user", "bot"):
            continue
        ms = int(m["endTime"] - m["time"])
        voice = np.frombuffer(audioop.ratecv(speech_pcm24k(ms), 2, 1, 24000, rate, None)[0], dtype="<i2")
        at = int(m["secondsFromStart"] * rate)
        (left if m["role"] == "user" else right)[at:at + len(voice)] = voice[: len(left) - at]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.stack([left, right], axis=1).tobytes())
    return buf.getvalue()


async def test_replay_of_an_imported_vapi_call_compares_tool_calls(tmp_path, db_dsn):
    from shim.parity.replay import replay
    from shim.parity.vapi_client import VapiClient
    from shim.testing.fake_vapi_agent import vapi_call

    import httpx

    runner.SILENCE_S, runner.MAX_WAIT_S = 0.8, 8
    script = Script(replies=[calls(("check_availability", {"day": "tuesday"})), "Free at nine.",
                             calls(("book_appointment", {"time": "9am"})), "Booked."], audio_ms_per_char=8)
    async with FakeCustomer() as customer, FakeVapi(api_key=VAPI_KEY) as vapi:
        customer.on("/tools", reply_results(lambda name, args: "ok"))
        call = vapi_call("vc-replay", created_ms=1.7645e12, base_url=vapi.base_url, turns=[
            {"role": "bot", "text": "Hi.", "ms": 600},
            {"role": "user", "text": "A cleaning on Tuesday, please.", "ms": 900, "gap_ms": 500},
            {"role": "bot", "text": "Free at nine.", "ms": 700, "tools": [("check_availability", {"day": "tuesday"}, "ok")]},
            {"role": "user", "text": "Nine works, book it.", "ms": 800, "gap_ms": 500},
            {"role": "bot", "text": "Booked.", "ms": 500, "tools": [("book_appointment", {"time": "9am"}, "ok")]},
        ])
        vapi.add_call(call)
        vapi.recordings["vc-replay"] = stereo_recording(call)
        overrides = {"firstMessage": "Hi.", "model": {"provider": "openai", "model": "gpt-4o",
                     "messages": [{"role": "system", "content": "Be brief."}],
                     "tools": [function_tool("check_availability", customer.url("/tools")),
                               function_tool("book_appointment", customer.url("/tools"))]}}
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=overrides) as run:
            settings = runner.Settings(target=run.config.public_url, auth_token=AUTH_TOKEN, number="+15550002222",
                                       from_number="+15550001111", vapi_base=vapi.base_url, vapi_key=VAPI_KEY)
            conn = await asyncpg.connect(db_dsn)
            try:
                async with httpx.AsyncClient() as http:
                    [result] = await replay(conn, VapiClient(vapi.base_url, VAPI_KEY, client=http), ["vc-replay"],
                                            settings, http, runner.run_batch)
                assert result["status"] == "ok", result
                assert result["vapi_tools"] == result["shim_tools"] == ["check_availability", "book_appointment"]
                assert result["match"] is True
                rows = await fetch_report(conn, assistant=None, since=None)
                replayed = {r["stack"]: r for r in rows if r["scenario"] == "replay:vc-replay"}
                assert replayed["shim"]["agreement"] == 1.0 and replayed["vapi"]["agreement"] == 1.0
                [shim_run] = await conn.fetch("SELECT turn_latency_ms, turns_total FROM parity_runs WHERE stack = 'shim'")
                assert shim_run["turns_total"] == 2 and len(shim_run["turn_latency_ms"]) == 2
            finally:
                await conn.close()


@pytest.fixture
def keep_structlog_config():
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_cli_usage_errors_exit_2_naming_every_problem(tmp_path, monkeypatch, capsys, keep_structlog_config):
    from shim.cli import main

    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: x\nturns:\n  - say: hello\n")
    for var in ("TWILIO_AUTH_TOKEN", "VAPI_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert main(["parity", "run", "--scenario", str(scenario), "--runs", "0", "--stack", "both", "--number", "555",
                 "--from", "me", "--target", "shim.example.com"]) == 2
    err = capsys.readouterr().err
    for part in ("--runs 0", "TWILIO_AUTH_TOKEN", "VAPI_API_KEY", "OPENAI_API_KEY", "no assistant", "--number '555'",
                 "--from 'me'", "--target 'shim.example.com': expected the deployment's base URL"):
        assert part in err, part
    scenario.write_text("name: x\nturns: []\n")
    assert main(["parity", "run", "--scenario", str(scenario)]) == 2
    assert "turns: got []" in capsys.readouterr().err
    assert main(["parity", "replay", "--vapi-call", "abc"]) == 2
    assert "VAPI_API_KEY is not set" in capsys.readouterr().err


def _riff(fmt: bytes, data: bytes) -> bytes:
    import struct

    chunks = b"".join(cid + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)
                      for cid, body in ((b"fmt ", fmt), (b"data", data)))
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_malformed_wavs_are_scenario_errors_naming_each_turn(tmp_path):
    import struct

    pcm8k = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    (tmp_path / "short-fmt.wav").write_bytes(_riff(b"\x01\x00\x01\x00", b"\0\0"))
    (tmp_path / "empty.wav").write_bytes(_riff(pcm8k, b""))
    (tmp_path / "cut.wav").write_bytes(_riff(pcm8k, b"\0\0" * 80 + b"\0"))  # cut mid-sample: still usable
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: x\nturns:\n  - audio: short-fmt.wav\n  - audio: empty.wav\n  - audio: cut.wav\n")
    with pytest.raises(ScenarioError) as err:
        load_scenario(scenario)
    message = str(err.value)
    assert "turns[0].audio" in message and "fmt chunk of 4 bytes; expected at least 16" in message
    assert "turns[1].audio" in message and "no audio" in message  # every bad file named, not just the first
    assert "turns[2]" not in message
    assert read_wav_ulaw8k(tmp_path / "cut.wav") == b"\xff" * 80


def test_yaml_dtmf_digits_are_taken_as_written(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: x\nturns:\n  - dtmf: 0123\n  - dtmf: 42\n  - wait: 2\n")
    assert [t.value for t in load_scenario(scenario).turns] == ["0123", "42", 2.0]  # not the octal 83


def test_expect_must_be_a_mapping(tmp_path):
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"name": "x", "turns": [{"wait": 1}], "expect": []}))
    with pytest.raises(ScenarioError, match=r"expect: got \[\], expected \{tools"):
        load_scenario(scenario)


async def test_a_last_turn_cut_mid_audio_is_partial_not_ok():
    """The line drops while the caller's last turn is still playing: the turn was not played."""

    class DroppingLine(runner.Line):
        def __init__(self, frames_before_drop: int):
            self.left = frames_before_drop

        async def send_frame(self, frame: bytes) -> None:
            await asyncio.sleep(0)
            if frame != bytes([runner.SILENCE]) * len(frame):  # the line silence while waiting for a greeting
                self.left -= 1  # like VapiLine: a send on the dropped line raises nothing

        def arrivals(self) -> list:
            return []

        @property
        def closed(self) -> bool:
            return self.left <= 0

    scenario = runner.Scenario("one-turn", (runner.Turn("say", "hello"),))
    result = runner.RunResult()
    with pytest.raises(runner.LineDropped, match="during turn 1 of 1"):
        await runner.play(scenario, {0: b"\x00" * 160 * 50}, DroppingLine(10), result)  # 1 s of audio, drops at 200 ms
    assert result.turns_played == 0 and result.latencies == []
