"""Lightweight peers for scripts/bench_relay.py: a Realtime stand-in and a Twilio caller.

The validating stand-ins in shim/testing/ check every event with pydantic and decode audio; at
100+ calls they would measure themselves. These do the protocol minimum with picows, in one
process, and time-stamp tagged frames with time.perf_counter:

* every caller media frame carries a unique counter in its first 64 μ-law samples; the model
  stand-in reads it back when the matching input_audio_buffer.append arrives;
* every model audio delta (100 ms, 800 bytes) is tagged the same way and read back when the
  caller receives the Twilio media frame carrying it;
* the first delta of each response also pairs the caller with its model session (SESSIONS), so
  set-up times (caller connects / sends `start` -> session.update reaches the model) and
  barge-in times (trigger -> Twilio `clear` reaches the caller) are measured per call.

Every other turn the caller barges in: the stand-in bursts the first 500 ms of the answer (as
the real API streams faster than real time, so the caller has audio queued), then sends
speech_started mid-answer; it stops the answer at once when the session asked for
interrupt_response (the API's default), else when the bridge sends response.cancel.

Tags are carried by the signs of full-scale samples (see Tagger), so they survive the shim's
background-ambience mixing; the caller audio is relayed untouched anyway.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import heapq
import itertools
import math
import random
import secrets
import time
from collections import deque

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_connect, ws_create_server
from twilio.request_validator import RequestValidator

perf = time.perf_counter
TEXT = WSMsgType.TEXT
FRAME_S = 0.020  # Twilio's inbound cadence
FRAME_BYTES = 160
DELTA_BYTES = 800  # 100 ms of μ-law
BURST_CHUNKS = 5  # a barge-in turn's answer starts with 500 ms sent at once
BARGE_AT_S = 1.2  # ... and the caller starts talking over it this far into the answer

# tag of a response's first delta -> its ModelSession: the caller that receives it learns its
# session (popped on receipt; cleared between runs)
SESSIONS: dict[int, "ModelSession"] = {}


class Tagger:
    """base64 μ-law payloads of `size` bytes that carry a unique 64-bit counter.

    The counter is written as the signs of the first 64 samples at full scale (0x80 = +32124,
    0x00 = -32124), so it survives anything that adds a quieter signal, changes the gain a little
    or requantizes: the shim's background-ambience mixer rewrites every assistant chunk, and a
    tag in raw payload bytes would not survive it. The next 2 bytes are silence, so the tag is
    exactly the first 88 base64 characters and the rest is a precomputed constant."""

    _counter = itertools.count(0x5A00_0000_0000_0001)

    def __init__(self, size: int, first: int | None = None):
        self.tail = base64.b64encode(b"\xff" * (size - TAG_BYTES)).decode()
        if first is not None:  # a counter of its own (scripts/drill_soak.py: the tag names its call)
            self._counter = itertools.count(first)

    def next(self) -> tuple[int, str]:
        n = next(self._counter)
        head = format(n, "064b").encode().translate(_BITS_TO_ULAW) + b"\xff\xff"
        return n, base64.b64encode(head).decode() + self.tail


TAG_BYTES = 66  # 64 sign-carrying samples + 2 silent ones (a multiple of 3: clean base64 split)
TAG_CHARS = 88
_BITS_TO_ULAW = bytes(0x80 if i == ord("1") else 0x00 for i in range(256))
_ULAW_TO_BITS = bytes(ord("1") if i >= 0x80 else ord("0") for i in range(256))


def tag_of(payload: str) -> int | None:
    """The counter in a tagged payload (None if it is too short to carry one)."""
    if len(payload) < TAG_CHARS:
        return None
    try:
        head = base64.b64decode(payload[:TAG_CHARS])
    except ValueError:
        return None
    return int(head[:64].translate(_ULAW_TO_BITS), 2)


class Delays:
    """Send/receive times of tagged frames in one direction; keeps samples whose send time falls
    inside the measuring window."""

    def __init__(self) -> None:
        self.t0 = self.t1 = math.inf
        self.sent: dict[int, float] = {}
        self.samples: list[float] = []
        self.sent_in_window = 0
        self.late_in_window = 0  # sent > 20 ms after their schedule
        self.max_late = 0.0
        self.lates: list[float] = []  # how late the generator sent each frame in the window
        # Frames a bridge may rightly drop: deltas the model sends after the caller started
        # talking over the answer (the bridge has cut it off and discards what is still in
        # flight). Their delay counts if they arrive; they are not "lost" if they do not.
        self.optional: set[int] = set()
        self.optional_recv = 0

    def reset(self) -> None:
        self.__init__()

    def window(self, t0: float, t1: float) -> None:
        self.t0, self.t1 = t0, t1

    def on_send(self, tag: int, t: float, late: float, optional: bool = False) -> None:
        self.sent[tag] = t
        if optional:
            self.optional.add(tag)
        elif self.t0 <= t <= self.t1:
            self.sent_in_window += 1
            self.lates.append(late)
            if late > self.max_late:
                self.max_late = late
            if late > 0.020:
                self.late_in_window += 1

    def on_recv(self, tag: int | None, t: float) -> bool:
        ts = self.sent.pop(tag, None)
        if ts is None:
            return False
        if self.t0 <= ts <= self.t1:
            self.samples.append(t - ts)
            if self.optional and tag in self.optional:
                self.optional.discard(tag)
                self.optional_recv += 1
        return True

    def lost(self) -> int:
        return self.sent_in_window - (len(self.samples) - self.optional_recv)


# --- the Realtime stand-in ---------------------------------------------------------------------


class ModelServer:
    """Minimal GA Realtime server. After session.update, each session runs a fixed cycle: the
    assistant talks for `talk_s` (100 ms deltas at real-time pace), then the "caller" talks
    (speech_started / speech_stopped / transcription.completed), then the next response."""

    session_class: type[ModelSession]  # ModelSession; scripts/drill_soak.py counts per session

    def __init__(self, c2m: Delays, m2c: Delays, *, cycle_s: float = 6.0, talk_s: float = 3.0):
        self.c2m, self.m2c = c2m, m2c
        self.cycle_s, self.talk_s = cycle_s, talk_s
        # Where in its cycle each new session starts: 0 = answer at once (warm-up); otherwise a
        # random phase, so the assistant of about half the calls is talking at any moment
        # instead of all of them in step.
        self.spread_phases = False
        self.barge_in = True  # every other turn, the caller talks over the answer
        self.barge_times: list[float] = []  # perf() of every barge-in speech_started
        self.rng = random.Random(1)
        self.sessions: set[ModelSession] = set()
        self.live = 0  # sessions configured (session.update seen) and still connected
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""
        self.tagger = Tagger(DELTA_BYTES)
        self._ids = itertools.count(1)

    async def start(self) -> None:
        def factory(request: WSUpgradeRequest):
            if not request.path.startswith(b"/v1/realtime"):
                return None
            return self.session_class(self, next(self._ids))

        self.server = await ws_create_server(factory, "127.0.0.1", 0, enable_auto_pong=True)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"

    async def stop(self) -> None:
        for s in list(self.sessions):
            s.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class ModelSession(WSListener):
    def __init__(self, server: ModelServer, n: int):
        self.server = server
        self.c2m, self.m2c, self.tagger = server.c2m, server.m2c, server.tagger
        self.sid = f"sess_{n}"
        self.transport: WSTransport | None = None
        self.task: asyncio.Task | None = None
        self.in_chars = 0  # base64 characters of caller audio appended
        self.live = False
        self._ev = itertools.count(1)
        self.t_connected = self.t_update = math.nan  # perf() of the upgrade and the first session.update
        self.interrupt = True  # server VAD's interrupt_response (the API's default)
        self.cancelled = False  # response.cancel seen for the answer being sent
        self.barge_sent = math.nan  # perf() of the last speech_started (a bridge may clear on any)

    def _send(self, s: str) -> None:
        self.transport.send(TEXT, s.encode())

    def _event(self, event: dict) -> None:
        event["event_id"] = f"ev_{self.sid}_{next(self._ev)}"
        self.transport.send(TEXT, orjson.dumps(event))

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.t_connected = perf()
        self.transport = transport
        self.server.sessions.add(self)
        self.server.connections += 1
        self._event({"type": "session.created", "session": {
            "type": "realtime", "object": "realtime.session", "id": self.sid, "model": "bench",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}}}})

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == TEXT:
            now = perf()
            msg = orjson.loads(frame.get_payload_as_bytes())
            typ = msg.get("type")
            if typ == "input_audio_buffer.append":
                audio = msg["audio"]
                self.in_chars += len(audio)
                self.c2m.on_recv(tag_of(audio), now)
            elif typ == "session.update":
                if self.t_update != self.t_update:  # first one (nan)
                    self.t_update = now
                session = dict(msg.get("session") or {})
                audio = session.get("audio") or {}
                turn = (audio.get("input") or {}).get("turn_detection")
                if isinstance(turn, dict):
                    self.interrupt = turn.get("interrupt_response", True) is not False
                session["audio"] = {
                    "input": {**(audio.get("input") or {}), "format": {"type": "audio/pcmu"}},
                    "output": {**(audio.get("output") or {}), "format": {"type": "audio/pcmu"}},
                }
                session.update(object="realtime.session", id=self.sid)
                self._event({"type": "session.updated", "session": session})
                if self.task is None:
                    self.live = True
                    self.server.live += 1
                    self.task = asyncio.get_running_loop().create_task(self._run())
            elif typ == "response.cancel":
                self.cancelled = True
            # response.create, truncate, ...: the schedule ignores them
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.server.sessions.discard(self)
        if self.live:
            self.live = False
            self.server.live -= 1
        if self.task is not None:
            self.task.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.send_close(WSCloseCode.GOING_AWAY)
            self.transport.disconnect()

    def _in_ms(self) -> int:
        return self.in_chars * 3 // 4 // 8

    async def _run(self) -> None:
        server = self.server
        m2c, tagger = self.m2c, self.tagger
        chunks = int(round(server.talk_s / 0.1))
        start = perf() + (server.rng.uniform(0, server.cycle_s) if server.spread_phases else 0.0)
        for k in itertools.count():
            base = start + k * server.cycle_s
            barge = server.barge_in and k % 2 == 1
            rid, iid, uid = f"resp_{self.sid}_{k}", f"item_{self.sid}_{k}", f"item_{self.sid}_u{k}"
            await sleep_until(base)
            self.cancelled = False
            self._event({"type": "response.created", "response": {
                "id": rid, "object": "realtime.response", "status": "in_progress", "output": []}})
            head = ('{"type":"response.output_audio.delta","response_id":"' + rid + '","item_id":"' + iid
                    + '","output_index":0,"content_index":0,"event_id":"ev_' + self.sid + "_" + str(k) + "_")
            status, barged = "completed", False
            for i in range(chunks):
                due = base + (max(i - BURST_CHUNKS, 0) * 0.1 if barge else i * 0.1)
                if barge and not barged and due >= base + BARGE_AT_S:
                    await sleep_until(base + BARGE_AT_S)
                    barged = True
                    self.barge_sent = perf()
                    server.barge_times.append(self.barge_sent)
                    self._event({"type": "input_audio_buffer.speech_started",
                                 "audio_start_ms": max(self._in_ms() - 300, 0), "item_id": uid})
                    if self.interrupt:
                        status = "cancelled"
                        break
                await sleep_until(due)
                if self.cancelled:
                    status = "cancelled"
                    break
                tag, payload = tagger.next()
                data = (head + str(i) + '","delta":"' + payload + '"}').encode()
                t = perf()
                m2c.on_send(tag, t, t - due, barged)
                if i == 0:
                    SESSIONS[tag] = self
                self.transport.send(TEXT, data)
                if i % 5 == 4:
                    self._event({"type": "response.output_audio_transcript.delta", "response_id": rid,
                                 "item_id": iid, "output_index": 0, "content_index": 0, "delta": "words "})
            ids = {"response_id": rid, "item_id": iid, "output_index": 0, "content_index": 0}
            if status == "completed":
                self._event({"type": "response.output_audio.done", **ids})
                self._event({"type": "response.output_audio_transcript.done", **ids,
                             "transcript": "words " * (chunks // 5)})
            self._event({"type": "response.done", "response": {
                "id": rid, "object": "realtime.response", "status": status, "output": []}})
            if not barged:
                # the caller's turn: starts once the answer has played, ends before the next answer
                await sleep_until(base + server.talk_s + 0.5)
                self.barge_sent = perf()
                self._event({"type": "input_audio_buffer.speech_started",
                             "audio_start_ms": max(self._in_ms() - 300, 0), "item_id": uid})
            await sleep_until(base + server.cycle_s - 0.8)
            self._event({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self._in_ms(), "item_id": uid})
            await sleep_until(base + server.cycle_s - 0.5)
            self._event({"type": "conversation.item.input_audio_transcription.completed", "item_id": uid,
                         "content_index": 0, "transcript": "I would like to book a cleaning."})


ModelServer.session_class = ModelSession


async def sleep_until(t: float) -> None:
    d = t - perf()
    if d > 0:
        await asyncio.sleep(d)


# --- the Twilio caller ---------------------------------------------------------------------------


class Caller(WSListener):
    """One Twilio <Connect><Stream>: signed upgrade, connected + start, paced 20 ms media (by the
    shared Pacer), marks echoed once the audio queued before them has played (8 bytes/ms)."""

    def __init__(self, n: int, c2m: Delays, m2c: Delays, tagger: Tagger):
        self.n = n
        self.c2m, self.m2c, self.tagger = c2m, m2c, tagger
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.transport: WSTransport | None = None
        self.seq = 0
        self.chunk = 0
        self.play_end = 0.0
        self._marks: deque[str] = deque()
        self._gen = 0
        self.closed = False
        self.stopped = False
        self.media_in = 0
        self.media_untagged = 0
        self.marks_echoed = 0
        self.t_connect = self.t_start = math.nan  # perf(): upgrade requested; `start` sent
        self.last_sent = math.nan  # perf() of the last media frame sent
        self.session: ModelSession | None = None  # paired by the first tagged answer received
        # (perf() the clear arrived, since the last media frame sent, since the model's speech_started)
        self.clears: list[tuple[float, float, float]] = []

    async def connect(self, url: str, auth_token: str) -> None:
        signature = RequestValidator(auth_token).compute_signature(url, {})
        self.t_connect = perf()
        await ws_connect(lambda: self, url, extra_headers={"X-Twilio-Signature": signature},
                         websocket_handshake_timeout=10)
        self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.seq += 1
        self.t_start = perf()
        self._send({"event": "start", "sequenceNumber": str(self.seq), "streamSid": self.stream_sid, "start": {
            "accountSid": "AC" + "0" * 32, "streamSid": self.stream_sid, "callSid": self.call_sid,
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"assistant": "demo", "from": f"+1555{self.n:07d}", "to": "+15550100200",
                                 # what the shim's voice webhook would have issued for this CallSid
                                 "token": hmac.new(auth_token.encode(), self.call_sid.encode(),
                                                   hashlib.sha256).hexdigest()[:32]}}})

    def _send(self, obj: dict) -> None:
        self.transport.send(TEXT, orjson.dumps(obj))

    def send_media(self, due: float) -> None:
        if self.closed or self.stopped:
            return
        self.seq += 1
        self.chunk += 1
        tag, payload = self.tagger.next()
        data = ('{"event":"media","sequenceNumber":"' + str(self.seq) + '","media":{"track":"inbound","chunk":"'
                + str(self.chunk) + '","timestamp":"' + str((self.chunk - 1) * 20) + '","payload":"' + payload
                + '"},"streamSid":"' + self.stream_sid + '"}').encode()
        t = self.last_sent = perf()
        self.c2m.on_send(tag, t, t - due)
        self.transport.send(TEXT, data)

    async def stop(self, timeout: float = 5.0) -> None:
        if self.closed:
            return
        self.stopped = True
        self.seq += 1
        self._send({"event": "stop", "sequenceNumber": str(self.seq), "streamSid": self.stream_sid,
                    "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}})
        try:
            await asyncio.wait_for(self.transport.wait_disconnected(), timeout)
        except TimeoutError:
            self.transport.disconnect()

    def _echo(self, gen: int) -> None:
        if gen != self._gen or not self._marks or self.closed:
            return
        self._echo_name(self._marks.popleft())

    def _echo_name(self, name: str) -> None:
        self.seq += 1
        self.marks_echoed += 1
        self.transport.send(TEXT, ('{"event":"mark","sequenceNumber":"' + str(self.seq) + '","streamSid":"'
                                   + self.stream_sid + '","mark":{"name":"' + name + '"}}').encode())

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == TEXT:
            now = perf()
            msg = orjson.loads(frame.get_payload_as_bytes())
            event = msg.get("event")
            if event == "media":
                payload = msg["media"]["payload"]
                tag = tag_of(payload)
                if self.m2c.on_recv(tag, now):
                    self.media_in += 1
                    if self.session is None:
                        self.session = SESSIONS.pop(tag, None)
                else:
                    self.media_untagged += 1  # e.g. ambience the shim plays between answers
                nbytes = len(payload) * 3 // 4 - (2 if payload.endswith("==") else 1 if payload.endswith("=") else 0)
                self.play_end = max(self.play_end, now) + nbytes / 8000
            elif event == "mark":
                name = msg["mark"]["name"]
                wait = self.play_end - now
                if wait <= 0 and not self._marks:
                    self._echo_name(name)
                else:
                    self._marks.append(name)
                    asyncio.get_running_loop().call_later(max(wait, 0), self._echo, self._gen)
            elif event == "clear":
                self.clears.append((now, now - self.last_sent,
                                    now - self.session.barge_sent if self.session is not None else math.nan))
                self.play_end = now
                self._gen += 1
                while self._marks:
                    self._echo_name(self._marks.popleft())
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True


class Pacer:
    """Sends every caller's 20 ms frames on a fixed monotonic schedule (no drift: the next due
    time is the previous due time + 20 ms), from one task for all calls."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Caller]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def add(self, caller: Caller, first_due: float) -> None:
        heapq.heappush(self._heap, (first_due, caller.n, caller))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        heap = self._heap
        while True:
            now = perf()
            # uvloop timers have 1 ms resolution: send what is due within the next millisecond
            while heap and heap[0][0] <= now + 0.001:
                due, n, caller = heapq.heappop(heap)
                if caller.closed or caller.stopped:
                    continue
                caller.send_media(due)
                heapq.heappush(heap, (due + FRAME_S, n, caller))
            if heap:
                wait = heap[0][0] - perf()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    await asyncio.sleep(0)
            else:
                self._wake.clear()
                await self._wake.wait()
