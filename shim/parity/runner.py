"""`shim parity run`: play a scenario N times against the shim and/or Vapi.

Against the shim it is Twilio, exactly: the signed ``POST /twilio/voice`` (X-Twilio-Signature
with TWILIO_AUTH_TOKEN), then the ``<Stream url>`` of the returned TwiML with its
``<Parameter>``s, 20 ms mu-law frames paced in real time, silence between turns (Twilio never
stops sending), marks echoed as the audio plays (shim.twilio_peer). Against Vapi it starts a call
with the ``vapi.websocket`` transport (mu-law 8 kHz raw) and streams the same audio.

Before each turn the player waits for the agent to finish speaking (no agent audio playing for
`SILENCE_S`, at most `MAX_WAIT_S`), as a person would. Turn latency = end of the caller's audio →
first agent audio at the player. After the last turn it waits for the answer, then hangs up.

Each run is a `parity_runs` row, written as ``partial`` when the run starts and completed when
it ends, so a run cut short (Ctrl-C, a crash, the line dropped mid-scenario) stays visible as
``partial``, never silently dropped. The shim's tool calls, transcript, ended reason and cost are
read from the deployment's rows (this command must use the deployment's DATABASE_URL); Vapi's
from ``GET /call/{id}``, and the Vapi call is imported into `calls` like `import-vapi` does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

import httpx
import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..twilio_peer import FRAME_BYTES, SILENCE, TwilioCaller, incoming_call_params, post_twilio_webhook
from .scenario import Scenario, ScenarioError, Turn, load_scenario, read_wav_ulaw8k
from .speech import SpeechError, render

log = structlog.get_logger(__name__)

SILENCE_S = float(os.environ.get("SHIM_PARITY_AGENT_SILENCE_S", "0.8"))  # agent done speaking after this much quiet
MAX_WAIT_S = float(os.environ.get("SHIM_PARITY_MAX_WAIT_S", "20"))  # bound on any wait for the agent
FRAME_S = 0.02
DTMF_GAP_S = 0.1


@dataclass
class RunResult:
    status: str = "partial"
    call_sid: str | None = None
    vapi_call_id: str | None = None
    turns_played: int = 0
    latencies: list[int] = field(default_factory=list)
    error: str | None = None


class Line:
    """The caller's end of one call: paced frames out, agent audio arrivals in."""

    async def send_frame(self, frame: bytes) -> None: ...
    async def send_dtmf(self, digit: str) -> None: ...
    def arrivals(self) -> list[tuple[float, int]]: ...
    @property
    def closed(self) -> bool: ...
    async def hang_up(self) -> None: ...


class TwilioLine(Line):
    def __init__(self, caller: TwilioCaller):
        self.caller = caller

    async def send_frame(self, frame: bytes) -> None:
        await self.caller.send_audio(frame)

    async def send_dtmf(self, digit: str) -> None:
        await self.caller.send_dtmf(digit)

    def arrivals(self) -> list[tuple[float, int]]:
        return self.caller.audio_arrivals

    @property
    def closed(self) -> bool:
        return self.caller.closed

    async def hang_up(self) -> None:
        if not self.caller.closed:
            await self.caller.stop()
        else:
            await self.caller.close()


class VapiLine(Line):
    """Vapi's websocket transport: binary frames = raw audio both ways, text = JSON control."""

    def __init__(self, ws: Any):
        self.ws = ws
        self._arrivals: list[tuple[float, int]] = []
        self._closed = False
        self._next: float | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in self.ws:
                if isinstance(message, bytes) and message:
                    self._arrivals.append((loop.time(), len(message)))
        except ConnectionClosed:
            pass
        finally:
            self._closed = True

    async def send_frame(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next is None or now - self._next > 0.1:
            self._next = now
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._next += FRAME_S
        try:
            await self.ws.send(frame)
        except ConnectionClosed:
            self._closed = True

    async def send_dtmf(self, digit: str) -> None:
        # The websocket transport has no keypad event: the digit is sent as a message to the
        # conversation (Vapi's add-message control), which is how its model would read keypad input.
        await self.ws.send(json.dumps({"type": "add-message", "message": {"role": "user", "content": f"User's Keypad Entry: {digit}"},
                                       "triggerResponseEnabled": False}))

    def arrivals(self) -> list[tuple[float, int]]:
        return self._arrivals

    @property
    def closed(self) -> bool:
        return self._closed

    async def hang_up(self) -> None:
        if not self._closed:
            try:
                await self.ws.send(json.dumps({"type": "end-call"}))
            except ConnectionClosed:
                pass
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


def playback_end(arrivals: list[tuple[float, int]]) -> float:
    """When the agent audio received so far finishes playing (8 bytes per ms, played back to back)."""
    end = 0.0
    for at, size in arrivals:
        end = max(end, at) + size / 8000
    return end


async def idle_until(line: Line, done, timeout: float) -> bool:
    """Send line silence (20 ms frames) until done() or timeout; True if done()."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    silence = bytes([SILENCE]) * FRAME_BYTES
    while not done():
        if line.closed or loop.time() >= deadline:
            return done()
        await line.send_frame(silence)
    return True


async def wait_agent_silent(line: Line, opened: float) -> None:
    """Until no agent audio has played for SILENCE_S, counted from `opened` (when the line opened) at
    the earliest: "nothing heard yet" is not silence, so a greeting still on its way is waited for
    instead of being talked over and then taken for the answer to the first turn."""
    loop = asyncio.get_running_loop()
    await idle_until(line, lambda: loop.time() - max(playback_end(line.arrivals()), opened) >= SILENCE_S, MAX_WAIT_S)


async def play(scenario: Scenario, audio: dict[int, bytes], line: Line, result: RunResult) -> None:
    loop = asyncio.get_running_loop()
    opened = loop.time()
    for i, turn in enumerate(scenario.turns):
        if line.closed:
            raise LineDropped(f"the line closed before turn {i + 1} of {len(scenario.turns)}")
        await wait_agent_silent(line, opened)
        if line.closed:
            raise LineDropped(f"the line closed before turn {i + 1} of {len(scenario.turns)}")
        if turn.kind in ("say", "audio"):
            ulaw = audio[i]
            for off in range(0, len(ulaw), FRAME_BYTES):
                if line.closed:  # the Vapi line swallows sends on a closed socket: a cut turn is not played
                    raise LineDropped(f"the line closed during turn {i + 1} of {len(scenario.turns)}")
                frame = ulaw[off:off + FRAME_BYTES]
                await line.send_frame(frame + bytes([SILENCE]) * (FRAME_BYTES - len(frame)))
            ended = loop.time()
            before = len(line.arrivals())
            got = await idle_until(line, lambda: len(line.arrivals()) > before, MAX_WAIT_S)
            if got:
                result.latencies.append(round((line.arrivals()[before][0] - ended) * 1000))
        elif turn.kind == "dtmf":
            for digit in turn.value:
                if digit == "w":
                    await idle_until(line, lambda: False, 0.5)
                else:
                    await line.send_dtmf(digit)
                    await idle_until(line, lambda: False, DTMF_GAP_S)
        else:
            await idle_until(line, lambda: False, turn.value)
        result.turns_played = i + 1
    await wait_agent_silent(line, opened)


class LineDropped(RuntimeError):
    pass


def parse_stream(twiml: str) -> tuple[str, dict[str, str]]:
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError as exc:
        raise RuntimeError(f"/twilio/voice answered something that is not TwiML ({exc})") from None
    stream = root.find("./Connect/Stream")
    if stream is None or "url" not in stream.attrib:
        raise RuntimeError(f"/twilio/voice answered no <Connect><Stream url>: {twiml[:200]}")
    return stream.attrib["url"], {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}


@dataclass
class Settings:
    target: str
    auth_token: str
    number: str
    from_number: str
    vapi_base: str = ""
    vapi_key: str = ""


async def run_shim_once(scenario: Scenario, audio: dict[int, bytes], s: Settings, http: httpx.AsyncClient,
                        result: RunResult) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    account_sid = "AC" + uuid.uuid4().hex
    result.call_sid = call_sid
    params = incoming_call_params(call_sid, s.from_number, s.number, account_sid)
    resp = await post_twilio_webhook(http, s.target.rstrip("/") + "/twilio/voice", params, s.auth_token)
    if resp.status_code != 200:
        raise RuntimeError(f"POST /twilio/voice -> {resp.status_code}: {resp.text[:200]}")
    url, custom = parse_stream(resp.text)
    caller = TwilioCaller(url, s.auth_token, custom_parameters=custom, call_sid=call_sid, account_sid=account_sid)
    await caller.connect()
    line = TwilioLine(caller)
    try:
        await play(scenario, audio, line, result)
    finally:
        await line.hang_up()


async def run_vapi_once(scenario: Scenario, audio: dict[int, bytes], s: Settings, vapi: Any, result: RunResult) -> None:
    call = await vapi.start_websocket_call(assistant_id=scenario.assistant)
    result.vapi_call_id = call["id"]
    ws = await connect(call["transport"]["websocketCallUrl"], additional_headers={"Authorization": f"Bearer {s.vapi_key}"},
                       max_size=None, compression=None, proxy=None)
    line = VapiLine(ws)
    try:
        await play(scenario, audio, line, result)
    finally:
        await line.hang_up()


# --- after the call: what the stack recorded -------------------------------------------------


async def shim_outcome(conn: Any, lock: asyncio.Lock, call_sid: str, wait_s: float = 15.0) -> dict[str, Any]:
    """The deployment's rows for the call, once its end is recorded (the writer batches)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    row = None
    while loop.time() < deadline:
        async with lock:
            row = await conn.fetchrow("SELECT ended_at, ended_reason, cost_usd FROM calls WHERE call_sid = $1", call_sid)
        if row is not None and row["ended_at"] is not None:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.3)  # the last usage/tool rows of the same batch window
    async with lock:
        row = await conn.fetchrow("SELECT ended_reason, cost_usd FROM calls WHERE call_sid = $1", call_sid)
        tools = await conn.fetch("SELECT name, arguments FROM tool_calls WHERE call_sid = $1 ORDER BY seq", call_sid)
        words = await conn.fetch("SELECT role, text FROM utterances WHERE call_sid = $1 ORDER BY started_at, seq", call_sid)
    return {
        "ended_reason": row["ended_reason"] if row else None,
        "cost_usd": row["cost_usd"] if row else None,
        "tools": [{"name": t["name"], "arguments": json.loads(t["arguments"]) if t["arguments"] else None} for t in tools],
        "transcript": [{"role": w["role"], "text": w["text"]} for w in words],
    }


async def vapi_outcome(conn: Any, lock: asyncio.Lock, vapi: Any, call_id: str, wait_s: float = 30.0) -> dict[str, Any]:
    from .vapi_import import map_call, store_call

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    call = await vapi.get_call(call_id)
    while call.get("status") != "ended" and loop.time() < deadline:
        await asyncio.sleep(0.5)
        call = await vapi.get_call(call_id)
    imported = map_call(call)
    if call.get("status") == "ended":
        async with lock:
            await store_call(conn, imported)
    return {
        "ended_reason": call.get("endedReason"),
        "cost_usd": call.get("cost"),
        "tools": [{"name": t["name"], "arguments": t["arguments"]} for t in imported.tool_calls],
        "transcript": [{"role": u["role"], "text": u["text"]} for u in imported.utterances],
    }


# --- a batch --------------------------------------------------------------------------------


_INSERT = """INSERT INTO parity_runs (run_id, batch_id, scenario, assistant_id, stack, status, turns_total, error, started_at)
              VALUES ($1, $2, $3, $4, $5, 'partial', $6, 'in progress (run not finished)', $7)"""
_FINISH = """UPDATE parity_runs SET status = $2, call_sid = $3, vapi_call_id = $4, turns_played = $5, tools = $6,
                 tool_arguments = $7::jsonb, turn_latency_ms = $8, transcript = $9::jsonb, ended_reason = $10,
                 cost_usd = $11::numeric, error = $12, ended_at = $13
              WHERE run_id = $1"""


async def run_batch(conn: Any, scenario: Scenario, audio: dict[int, bytes], stacks: list[str], runs: int,
                    concurrency: int, s: Settings, *, progress: Any = None) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    from .vapi_client import VapiClient

    batch_id = uuid.uuid4()
    lock = asyncio.Lock()
    sem = asyncio.Semaphore(max(1, concurrency))
    summaries: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=20) as http:
        vapi = VapiClient(s.vapi_base, s.vapi_key, client=http) if "vapi" in stacks else None

        async def one(stack: str) -> None:
            async with sem:
                run_id = uuid.uuid4()
                started = dt.datetime.now(dt.UTC)
                async with lock:
                    await conn.execute(_INSERT, run_id, batch_id, scenario.name, scenario.assistant, stack,
                                       len(scenario.turns), started)
                result = RunResult()
                outcome: dict[str, Any] = {"tools": [], "transcript": [], "ended_reason": None, "cost_usd": None}
                try:
                    try:
                        if stack == "shim":
                            await run_shim_once(scenario, audio, s, http, result)
                        else:
                            await run_vapi_once(scenario, audio, s, vapi, result)
                        result.status = "ok"
                    except (LineDropped, ConnectionClosed) as exc:
                        result.status, result.error = "partial", str(exc) or type(exc).__name__
                    except Exception as exc:  # noqa: BLE001 - one run's failure is recorded, the batch goes on
                        placed = result.call_sid or result.vapi_call_id
                        result.status = "partial" if placed and result.turns_played else "failed"
                        result.error = f"{type(exc).__name__}: {exc}"[:500]
                        log.warning("parity.run_failed", stack=stack, error=result.error)
                    if result.call_sid or result.vapi_call_id:
                        try:
                            outcome = (await shim_outcome(conn, lock, result.call_sid) if stack == "shim"
                                       else await vapi_outcome(conn, lock, vapi, result.vapi_call_id))
                        except Exception as exc:  # noqa: BLE001
                            result.error = (result.error or "") + f"; reading the outcome failed: {exc}"
                            if result.status == "ok":
                                result.status = "partial"
                except asyncio.CancelledError:
                    result.status, result.error = "partial", "interrupted (the batch was stopped)"
                    raise
                finally:
                    async with lock:
                        await conn.execute(
                            _FINISH, run_id, result.status, result.call_sid, result.vapi_call_id, result.turns_played,
                            [t["name"] for t in outcome["tools"]], json.dumps(outcome["tools"]), result.latencies,
                            json.dumps(outcome["transcript"]), outcome["ended_reason"],
                            None if outcome["cost_usd"] is None else str(outcome["cost_usd"]), result.error,
                            dt.datetime.now(dt.UTC))
                    summaries.append({"run_id": str(run_id), "stack": stack, "status": result.status,
                                      "tools": [t["name"] for t in outcome["tools"]], "turn_latency_ms": result.latencies,
                                      "error": result.error})
                    if progress is not None:
                        progress.update(1)

        tasks = [asyncio.create_task(one(stack)) for _ in range(runs) for stack in stacks]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return batch_id, summaries


async def render_audio(scenario: Scenario, *, base_url: str, api_key: str, cache_dir: Any) -> dict[int, bytes]:
    from pathlib import Path

    audio: dict[int, bytes] = {}
    async with httpx.AsyncClient() as client:
        for i, turn in enumerate(scenario.turns):
            if turn.kind == "say":
                audio[i] = await render(turn.value, base_url=base_url, api_key=api_key, cache_dir=Path(cache_dir), client=client)
            elif turn.kind == "audio":
                audio[i] = read_wav_ulaw8k(turn.value)
    return audio


def run_command(args: Any, config: Any, run_coro, with_db) -> int:
    def err(msg: str) -> int:
        print(f"shim parity run: {msg}", file=sys.stderr)
        return 2

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        return err(str(exc))
    problems = []
    if args.runs < 1:
        problems.append(f"--runs {args.runs}: expected at least 1")
    if args.concurrency < 1:
        problems.append(f"--concurrency {args.concurrency}: expected at least 1")
    stacks = ["shim", "vapi"] if args.stack == "both" else [args.stack]
    vapi_key = os.environ.get("VAPI_API_KEY", "").strip()
    if "shim" in stacks and not config.twilio_auth_token:
        problems.append("TWILIO_AUTH_TOKEN is not set (the voice webhook and stream are signed with it)")
    if "vapi" in stacks and not scenario.assistant:
        problems.append(f"{args.scenario}: no assistant: field (the Vapi assistant id POST /call starts)")
    if "vapi" in stacks and not vapi_key:
        problems.append("VAPI_API_KEY is not set (needed for --stack vapi/both)")
    if any(t.kind == "say" for t in scenario.turns) and not config.openai_api_key:
        problems.append("OPENAI_API_KEY is not set (say: turns are rendered with OpenAI's speech endpoint)")
    import re

    if not re.match(r"^\+[1-9][0-9]{6,14}$", args.number):
        problems.append(f"--number {args.number!r}: expected E.164, e.g. +15551234567")
    if not re.match(r"^\+[1-9][0-9]{6,14}$", args.from_number):
        problems.append(f"--from {args.from_number!r}: expected E.164, e.g. +15557654321")
    if args.target is not None and not re.match(r"^https?://[^/\s?#]+(/\S*)?$", args.target):
        problems.append(f"--target {args.target!r}: expected the deployment's base URL, e.g. https://shim.example.com")
    if problems:
        return err("; ".join(problems))
    from ..vapi_api import VAPI_BASE_URL

    settings = Settings(target=(args.target or config.http_url("")).rstrip("/"), auth_token=config.twilio_auth_token,
                        number=args.number, from_number=args.from_number,
                        vapi_base=os.environ.get("VAPI_BASE_URL", VAPI_BASE_URL).strip().rstrip("/"), vapi_key=vapi_key)

    async def work(conn) -> int:
        from tqdm import tqdm

        try:
            audio = await render_audio(scenario, base_url=config.openai_base_url, api_key=config.openai_api_key,
                                       cache_dir=config.data_dir / "parity-tts")
        except (SpeechError, ScenarioError) as exc:
            print(f"shim parity run: {exc}", file=sys.stderr)
            return 1
        bar = tqdm(total=args.runs * len(stacks), desc=scenario.name, unit="run", file=sys.stderr,
                   disable=None)  # None: off when stderr is not a terminal
        try:
            batch_id, summaries = await run_batch(conn, scenario, audio, stacks, args.runs, args.concurrency, settings,
                                                  progress=bar)
        finally:
            bar.close()
        print(json.dumps({"batch_id": str(batch_id), "scenario": scenario.name,
                          "runs": {st: {k: sum(1 for r in summaries if r["stack"] == st and r["status"] == k)
                                        for k in ("ok", "partial", "failed")} for st in stacks}}))
        return 0 if all(r["status"] == "ok" for r in summaries) else 1

    return run_coro(with_db(config, work))


__all__ = ["RunResult", "Settings", "Turn", "load_scenario", "run_batch", "run_command"]
