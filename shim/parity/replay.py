"""`shim parity replay`: real Vapi calls become scenarios, replayed against the shim.

For each call: ``GET /call/{id}``; its stereo recording (``artifact.stereoRecordingUrl``: the
customer on the left channel, the assistant on the right) is downloaded, the customer channel is
cut at the transcript's timestamps (each ``user`` message from ``secondsFromStart`` for
``endTime - time`` ms, plus a little margin), converted to 8 kHz mu-law, and played as the turns
of a scenario named ``replay:<call id>`` whose expected tools are the ones Vapi called. The shim's
run is a `parity_runs` row (stack shim), and Vapi's original call one more (stack vapi, the
call's tools), so `parity_report` shows the agreement per replayed call.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
import uuid
import wave
import warnings
from typing import Any

import httpx

from .scenario import Scenario, ScenarioError, Turn
from .vapi_import import map_call, store_call

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

MARGIN_S = 0.15  # around each cut: transcripts' word timings are approximate


def customer_channel_ulaw8k(wav_bytes: bytes) -> bytes:
    """The left (customer) channel of a stereo PCM16 WAV as 8 kHz mu-law (a mono file is taken as is)."""
    try:
        with wave.open(io.BytesIO(wav_bytes)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ScenarioError(f"the recording is not a PCM WAV file ({exc})") from None
    if width != 2:
        raise ScenarioError(f"the recording has {8 * width}-bit samples; expected 16-bit PCM")
    pcm = audioop.tomono(frames, 2, 1, 0) if channels == 2 else frames
    if rate != 8000:
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate, 8000, None)
    return audioop.lin2ulaw(pcm, 2)


def scenario_from_call(call: dict[str, Any], customer_ulaw: bytes) -> tuple[Scenario, dict[int, bytes], list[str]]:
    """The call's customer turns as a scenario (+ their audio) and Vapi's tool sequence."""
    imported = map_call(call)
    msgs = (call.get("artifact") or {}).get("messages") or call.get("messages") or []
    turns: list[Turn] = []
    audio: dict[int, bytes] = {}
    for m in sorted((m for m in msgs if isinstance(m, dict) and m.get("role") == "user"), key=lambda m: m.get("time", 0)):
        start = float(m.get("secondsFromStart") or 0)
        length = max(0.0, (float(m.get("endTime") or 0) - float(m.get("time") or 0)) / 1000)
        a = max(0, int((start - MARGIN_S) * 8000))
        b = min(len(customer_ulaw), int((start + length + MARGIN_S) * 8000))
        if b - a < 800:  # < 100 ms: nothing to say
            continue
        audio[len(turns)] = customer_ulaw[a:b]
        turns.append(Turn("audio", f"recording {start:.2f}s+{length:.2f}s"))
    if not turns:
        raise ScenarioError(f"call {call['id']}: no customer turn in the transcript to replay")
    tools = [t["name"] for t in imported.tool_calls]
    return Scenario(f"replay:{call['id']}", tuple(turns), call.get("assistantId"), tuple(tools), call.get("endedReason")), audio, tools


async def replay(conn: Any, vapi: Any, call_ids: list[str], settings: Any, http: httpx.AsyncClient,
                 run_batch: Any) -> list[dict[str, Any]]:
    results = []
    for cid in call_ids:
        call = await vapi.get_call(cid)
        url = (call.get("artifact") or {}).get("stereoRecordingUrl") or call.get("stereoRecordingUrl")
        if not url:
            results.append({"vapi_call_id": cid, "error": "no stereo recording"})
            continue
        resp = await http.get(url, timeout=60, follow_redirects=True)
        if resp.status_code != 200:
            results.append({"vapi_call_id": cid, "error": f"GET recording -> {resp.status_code}"})
            continue
        try:
            scenario, audio, vapi_tools = scenario_from_call(call, customer_channel_ulaw8k(resp.content))
        except ScenarioError as exc:
            results.append({"vapi_call_id": cid, "error": str(exc)})
            continue
        await store_call(conn, map_call(call))
        batch_id, summaries = await run_batch(conn, scenario, audio, ["shim"], 1, 1, settings)
        now = dt.datetime.now(dt.UTC)
        await conn.execute(
            """INSERT INTO parity_runs (run_id, batch_id, scenario, assistant_id, stack, vapi_call_id, status, turns_played,
                   turns_total, tools, tool_arguments, ended_reason, cost_usd, started_at, ended_at)
               VALUES ($1, $2, $3, $4, 'vapi', $5, 'ok', $6, $6, $7, $8::jsonb, $9, $10::numeric, $11, $12)""",
            uuid.uuid4(), batch_id, scenario.name, scenario.assistant, cid, len(scenario.turns), vapi_tools,
            json.dumps([{"name": t["name"], "arguments": t["arguments"]} for t in map_call(call).tool_calls]),
            call.get("endedReason"), None if call.get("cost") is None else str(call["cost"]),
            _ts(call.get("startedAt")) or now, _ts(call.get("endedAt")) or now)
        [run] = summaries
        results.append({"vapi_call_id": cid, "scenario": scenario.name, "run_id": run["run_id"], "status": run["status"],
                        "vapi_tools": vapi_tools, "shim_tools": run["tools"], "match": run["tools"] == vapi_tools})
        print(f"replay {cid}: {'match' if run['tools'] == vapi_tools else 'DIFFERENT'} "
              f"(vapi {vapi_tools}, shim {run['tools']})", file=sys.stderr)
    return results


def _ts(value: Any) -> dt.datetime | None:
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None
