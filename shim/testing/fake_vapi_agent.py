"""Vapi call objects and a scripted Vapi agent behind the `vapi.websocket` transport, for tests.

* `vapi_call(...)` builds an ended Call object as ``GET /call/{id}`` returns it (artifact messages
  with bot/user turns, ``tool_calls`` + ``tool_call_result`` pairs, ``cost``/``costs[]``, recording
  URLs); `FakeVapi.add_call` validates it against vapi-server-sdk's ``Call``.
* `ScriptedAgent` answers ``POST /call`` (``vapi.websocket``, μ-law 8 kHz raw) and the websocket
  it names (https://docs.vapi.ai/calls/websocket-transport): it speaks a short greeting (a tone,
  paced in real time as 20 ms binary frames), detects each caller turn by energy (voice, then
  `end_silence_ms` of silence), calls the tools `tool_plan(call_index, turn_index)` says (recorded
  in the call's messages as Vapi does), then answers with another tone. ``{"type": "end-call"}``
  or a closed socket ends the call (``customer-ended-call``), after which ``GET /call/{id}``
  returns it ended, with messages and costs. A drifting agent is just a `tool_plan` that varies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import uuid
import warnings
from typing import Any, Callable

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ToolPlan = Callable[[int, int], list[tuple[str, dict[str, Any]]]]

ORG_ID = "org-0000-test"


def _iso(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tone_ulaw(ms: int, freq: float = 440.0, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(8 * ms)) / 8000
    pcm = (np.sin(2 * math.pi * freq * t) * amplitude * 32767).astype("<i2").tobytes()
    return audioop.lin2ulaw(pcm, 2)


def vapi_call(call_id: str, *, created_ms: float, assistant_id: str = "asst-1", turns: list[dict[str, Any]] | None = None,
              ended_reason: str = "customer-ended-call", cost: float = 0.25, status: str = "ended",
              base_url: str = "https://api.vapi.ai", call_type: str = "inboundPhoneCall") -> dict[str, Any]:
    """An ended Vapi call. `turns`: [{"role": "bot"|"user", "text", "ms", "at_ms"?, "tools"?: [(name, args, result)]}]
    in order; times run on from `created_ms`."""
    t = created_ms + 1000
    start = t
    messages: list[dict[str, Any]] = [{"role": "system", "message": "You are a receptionist.", "time": t, "secondsFromStart": 0}]
    for turn in turns or []:
        t = turn.get("at_ms", t)
        for name, args, result in turn.get("tools", ()):
            cid = f"call_{uuid.uuid4().hex[:20]}"
            messages.append({"role": "tool_calls", "message": "", "time": t, "secondsFromStart": (t - start) / 1000,
                             "toolCalls": [{"id": cid, "type": "function",
                                            "function": {"name": name, "arguments": json.dumps(args)}}]})
            t += 300
            messages.append({"role": "tool_call_result", "toolCallId": cid, "name": name, "result": result,
                             "time": t, "secondsFromStart": (t - start) / 1000})
            t += 50
        end = t + turn.get("ms", 1500)
        messages.append({"role": turn["role"], "message": turn.get("text", ""), "time": t, "endTime": end,
                         "secondsFromStart": (t - start) / 1000, "duration": end - t})
        t = end + turn.get("gap_ms", 600)
    ended = t + 500
    minutes = round((ended - start) / 60000, 4)
    body: dict[str, Any] = {
        "id": call_id, "orgId": ORG_ID, "createdAt": _iso(created_ms), "updatedAt": _iso(ended + 2000),
        "type": call_type, "status": status, "assistantId": assistant_id,
        "startedAt": _iso(start),
        "customer": {"number": "+15550001111"},
        "cost": cost,
        "costs": [
            {"type": "transport", "provider": "twilio", "minutes": minutes, "cost": round(0.0085 * math.ceil(minutes), 4)},
            {"type": "vapi", "subType": "normal", "minutes": minutes, "cost": round(0.05 * minutes, 4)},
        ],
        "messages": messages,
        "artifact": {"messages": messages,
                     "recordingUrl": f"{base_url}/recording/{call_id}.wav",
                     "stereoRecordingUrl": f"{base_url}/recording/{call_id}.wav"},
    }
    if status == "ended":
        body["endedAt"] = _iso(ended)
        body["endedReason"] = ended_reason
    return body


class ScriptedAgent:
    def __init__(self, tool_plan: ToolPlan | None = None, *, greeting_ms: int = 300, reply_ms: int = 300,
                 think_ms: int = 250, end_silence_ms: int = 400, voice_rms: int = 300, cost_per_minute: float = 0.13,
                 assistant_id: str = "asst-1", hang_up_after_turns: int | None = None):
        self.hang_up_after_turns = hang_up_after_turns
        self.tool_plan = tool_plan or (lambda call_index, turn_index: [])
        self.greeting_ms, self.reply_ms, self.think_ms = greeting_ms, reply_ms, think_ms
        self.end_silence_ms, self.voice_rms = end_silence_ms, voice_rms
        self.cost_per_minute = cost_per_minute
        self.assistant_id = assistant_id
        self.started = 0
        self.connected: list[str] = []

    def new_call(self, fake: Any, body: dict[str, Any]) -> dict[str, Any]:
        cid = str(uuid.uuid4())
        now = dt.datetime.now(dt.UTC).timestamp() * 1000
        ws_base = fake.base_url.replace("http://", "ws://", 1)
        call = {
            "id": cid, "orgId": ORG_ID, "createdAt": _iso(now), "updatedAt": _iso(now),
            "type": "vapi.websocketCall", "status": "queued",
            "assistantId": body.get("assistantId") or self.assistant_id,
            "transport": {"provider": "vapi.websocket", "websocketCallUrl": f"{ws_base}/{cid}/transport",
                          "audioFormat": body["transport"].get("audioFormat")
                          or {"format": "pcm_s16le", "container": "raw", "sampleRate": 16000}},
            "metadata": {"callIndex": self.started},
        }
        self.started += 1
        return call

    async def serve(self, fake: Any, cid: str, ws: Any) -> None:
        call = fake.calls[cid]
        index = call["metadata"]["callIndex"]
        self.connected.append(cid)
        t0 = dt.datetime.now(dt.UTC).timestamp() * 1000
        call.update(status="in-progress", startedAt=_iso(t0))
        messages: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()

        def now_ms() -> float:
            return dt.datetime.now(dt.UTC).timestamp() * 1000

        def add(msg: dict[str, Any]) -> None:
            msg["secondsFromStart"] = round((msg["time"] - t0) / 1000, 3)
            messages.append(msg)

        async def speak(ms: int, text: str) -> None:
            start = now_ms()
            audio = tone_ulaw(ms)
            next_at = loop.time()
            for i in range(0, len(audio), 160):
                await ws.send_bytes(audio[i:i + 160])
                next_at += 0.02
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            add({"role": "bot", "message": text, "time": start, "endTime": now_ms()})

        ended_reason = "customer-ended-call"
        speaking: asyncio.Task | None = asyncio.create_task(speak(self.greeting_ms, "Hello, how can I help?"))
        turn_index = 0
        voiced_ms = silent_ms = 0
        user_start = 0.0
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("text") is not None:
                    control = json.loads(msg["text"])
                    if control.get("type") in ("end-call", "hangup"):
                        break
                    continue
                frame = msg.get("bytes") or b""
                rms = audioop.rms(audioop.ulaw2lin(frame, 2), 2) if frame else 0
                ms = len(frame) / 8
                if rms >= self.voice_rms:
                    if voiced_ms == 0:
                        user_start = now_ms()
                    voiced_ms += ms
                    silent_ms = 0
                elif voiced_ms:
                    silent_ms += ms
                    if silent_ms >= self.end_silence_ms:
                        end = now_ms() - silent_ms
                        add({"role": "user", "message": f"(caller turn {turn_index + 1})", "time": user_start, "endTime": end})
                        voiced_ms = silent_ms = 0
                        plan = self.tool_plan(index, turn_index)
                        turn_index += 1
                        if speaking is not None:
                            await speaking
                        speaking = asyncio.create_task(self._answer(plan, add, now_ms, speak))
                        if self.hang_up_after_turns is not None and turn_index >= self.hang_up_after_turns:
                            await speaking
                            speaking = None
                            ended_reason = "assistant-ended-call"
                            await ws.close()
                            break
        finally:
            if speaking is not None:
                speaking.cancel()
                await asyncio.gather(speaking, return_exceptions=True)
            ended = now_ms()
            minutes = round((ended - t0) / 60000, 4)
            messages.sort(key=lambda m: m["time"])
            call.update(
                status="ended", endedAt=_iso(ended), endedReason=ended_reason, updatedAt=_iso(ended),
                messages=messages, artifact={"messages": messages},
                cost=round(self.cost_per_minute * minutes, 6),
                costs=[{"type": "transport", "provider": "vapi.websocket", "minutes": minutes, "cost": 0},
                       {"type": "vapi", "subType": "normal", "minutes": minutes, "cost": round(0.05 * minutes, 6)}])
            from shim.testing.fake_vapi import validate_call

            validate_call(call)

    async def _answer(self, plan, add, now_ms, speak) -> None:
        await asyncio.sleep(self.think_ms / 1000)
        for name, args in plan:
            cid = f"call_{uuid.uuid4().hex[:20]}"
            add({"role": "tool_calls", "message": "", "time": now_ms(),
                 "toolCalls": [{"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
            add({"role": "tool_call_result", "toolCallId": cid, "name": name, "result": "ok", "time": now_ms() + 1})
        await speak(self.reply_ms, "Sure.")
