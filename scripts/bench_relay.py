"""`make bench`: load benchmark of the media relay: the real `shim serve` beside a bare relay
(the floor) and Twilio's sample bridge, in one run, so ratios hold on a shared machine.

For each --calls value (and --delay-calls for --delay-stacks), runs N concurrent simulated calls (Twilio caller + Realtime stand-in,
both lightweight and in this one uvloop process, see scripts/_bench_peers.py) through:

* shim: `python -m shim.cli serve` as a subprocess, as scripts/demo.py starts it (media on the
  one port, routed to picows; `--media media-port` for picows on a port of its own; embedded PostgreSQL and its writer, the demo assistant with its defaults, e.g. the
  office ambience mixed under every assistant chunk; only the Twilio REST recording start is
  skipped, by leaving TWILIO_ACCOUNT_SID unset, so nothing leaves 127.0.0.1);
* bare relay (--baseline): a ~60-line picows relay, also a subprocess of this script
  (`--serve-bare`), that forwards media -> input_audio_buffer.append and
  response.output_audio.delta -> media + mark, with no other logic: the floor;
* twilio-samples: the media path of Twilio's Python example bridge (uvicorn + `websockets`,
  scripts/_bench_sample.py, `--serve-sample`), what most people start from.

Measured on the server process only, over a steady window where all N calls are live:
CPU seconds (user+system of the server PID and its children) per call-minute, RSS per call
(live minus idle-after-warm-up, divided by N), and the delay each tagged frame spends between
the two peers (caller -> model and model -> caller; p50/p99/max). Callers send 20 ms frames
on a fixed schedule; the assistant talks half the time (3 s of 100 ms deltas every 6 s), and
the caller "talks" the other half (speech_started/stopped + a transcript), and every other
turn it barges in (speech_started mid-answer; the bridge sends Twilio `clear`).

Also measured per call: set-up (the caller opens the WebSocket -> session.update reaches the
model), `start` -> session.update, and barge-in trigger -> `clear` reaches the caller. Results go
to stdout (Markdown tables), to --json and to --svg (CPU per call-minute by N);
`--from-json FILE` re-renders both from an earlier run.

    make bench                                  # 50 and 100 calls, every stack; 150 for bare + shim
    .venv/bin/python scripts/bench_relay.py --quick
    .venv/bin/python scripts/bench_relay.py --repeat 2   # twice over, alternating order: steadier ratios
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil

from shim.testing._serve import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_peers import (  # noqa: E402
    DELTA_BYTES,
    FRAME_BYTES,
    SESSIONS,
    Caller,
    Delays,
    ModelServer,
    Pacer,
    Tagger,
    perf,
    sleep_until,
)

REPO = Path(__file__).resolve().parents[1]
AUTH_TOKEN = "bench-auth-token"
MiB = 1024 * 1024


# --- the bare relay baseline (runs as `bench_relay.py --serve-bare PORT --model-url URL`) -------


def serve_bare(port: int, model_url: str) -> None:
    from picows import WSCloseCode, WSListener, WSMsgType, ws_connect, ws_create_server

    TEXT = WSMsgType.TEXT
    SESSION_UPDATE = orjson.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}})

    class ModelSide(WSListener):
        def __init__(self, relay):
            self.relay = relay

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == TEXT:
                event = orjson.loads(frame.get_payload_as_bytes())
                kind = event.get("type")
                if kind == "response.output_audio.delta":
                    self.relay.to_twilio(event["delta"])
                elif kind == "session.created":
                    transport.send(TEXT, SESSION_UPDATE)
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()

        def on_ws_disconnected(self, transport):
            self.relay.close()

    class Relay(WSListener):
        def __init__(self):
            self.twilio = self.model = None
            self.sid, self.marks = "", 0

        def on_ws_connected(self, transport):
            self.twilio = transport

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == TEXT:
                msg = orjson.loads(frame.get_payload_as_bytes())
                event = msg.get("event")
                if event == "media":
                    if self.model is not None:
                        self.model.send(TEXT, ('{"type":"input_audio_buffer.append","audio":"'
                                               + msg["media"]["payload"] + '"}').encode())
                elif event == "start":
                    self.sid = msg["start"]["streamSid"]
                    asyncio.get_running_loop().create_task(self.connect())
                elif event == "stop":
                    self.close()
            elif frame.msg_type == WSMsgType.CLOSE:
                self.close()

        async def connect(self):
            self.model, _ = await ws_connect(lambda: ModelSide(self), model_url,
                                             extra_headers={"Authorization": "Bearer sk-bench"})

        def to_twilio(self, delta: str):
            self.marks += 1
            head = '{"event":"%s","streamSid":"' + self.sid + '",'
            self.twilio.send(TEXT, ((head % "media") + '"media":{"payload":"' + delta + '"}}').encode())
            self.twilio.send(TEXT, ((head % "mark") + '"mark":{"name":"' + str(self.marks) + '"}}').encode())

        def on_ws_disconnected(self, transport):
            self.close()

        def close(self):
            for t in (self.twilio, self.model):
                if t is not None and not t.is_disconnected:
                    t.send_close(WSCloseCode.OK)
                    t.disconnect()

    async def main():
        server = await ws_create_server(lambda req: Relay() if req.path.startswith(b"/twilio/media") else None,
                                        "127.0.0.1", port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    import uvloop

    uvloop.run(main())


# --- measuring the server process ------------------------------------------------------------


def _tree(p: psutil.Process) -> list[psutil.Process]:
    try:
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return [p]


def tree_cpu(p: psutil.Process, exclude: set[int] = frozenset()) -> float:
    total = 0.0
    for q in _tree(p):
        if q.pid in exclude:
            continue
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_counters(p: psutil.Process, exclude: set[int] = frozenset()) -> tuple[float, float, int]:
    """(user s, system s, context switches) summed over the process tree."""
    user = system = 0.0
    switches = 0
    for q in _tree(p):
        if q.pid in exclude:
            continue
        try:
            with q.oneshot():
                t = q.cpu_times()
                user += t.user
                system += t.system
                c = q.num_ctx_switches()
                switches += c.voluntary + c.involuntary
        except (psutil.Error, AttributeError):
            pass
    return user, system, switches


def tree_rss(p: psutil.Process, exclude: set[int] = frozenset()) -> int:
    total = 0
    for q in _tree(p):
        if q.pid in exclude:
            continue
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


async def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = perf() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited (code {proc.returncode}) while waiting for {what}")
        if perf() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def http_ok(port: int, path: str) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 2)
        return b" 200 " in line
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


@dataclass
class Server:
    proc: subprocess.Popen
    media_url: str
    log_path: Path
    pg: psutil.Process | None = None  # embedded Postgres, when it is not a child of the server


async def start_shim(model: ModelServer, tag: str, source: Path, media: str = "one-port", workers: int = 1) -> Server:
    data_dir = REPO / ".shim" / "bench"
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port, media_port = free_port(), free_port()
    env = dict(
        os.environ,
        OPENAI_API_KEY="sk-bench-not-a-real-key",
        OPENAI_REALTIME_URL=model.url,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        PUBLIC_URL=f"http://127.0.0.1:{http_port}",
        SHIM_DATA_DIR=str(data_dir),
        SHIM_ASSISTANTS_DIR=str(source / "assistants"),
        SHIM_LOG_LEVEL="info",  # as deployed (the default): every feature on, logs included
        SHIM_DRAIN_TIMEOUT="5",
        SHIM_WORKERS=str(workers),  # (an env var: a checkout without --workers ignores it)
    )
    env.pop("DATABASE_URL", None)
    # Without an account SID the shim skips starting Twilio's call recording (one REST call per
    # call, at call start, outside the measuring window); nothing may leave 127.0.0.1.
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_API_BASE"):
        env.pop(name, None)
    if source != REPO:  # benchmark another checkout of the shim (python -m puts cwd first on sys.path)
        env["PYTHONPATH"] = str(source)
    # one-port: as deployed (the front door routes /twilio/media to picows on the webhook port);
    # media-port: picows on a port of its own (`--media-port`), for comparison.
    command = [sys.executable, "-m", "shim.cli", "serve", "--host", "127.0.0.1", "--port", str(http_port)]
    media_url = f"ws://127.0.0.1:{http_port}/twilio/media"
    if media == "media-port":
        media_url = env["PUBLIC_MEDIA_URL"] = f"ws://127.0.0.1:{media_port}/twilio/media"
        command += ["--media-port", str(media_port)]
    log_path = data_dir / f"serve-{tag}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=source, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, media_url, log_path)
    deadline = perf() + 90
    while not await http_ok(http_port, "/healthz"):
        if proc.poll() is not None or perf() > deadline:
            await stop_server(server)
            raise RuntimeError(f"shim serve did not start; see {log_path}:\n{tail(log_path)}")
        await asyncio.sleep(0.1)
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    try:
        pg = psutil.Process(int(pidfile.read_text().splitlines()[0]))
        if pg.pid not in {q.pid for q in _tree(psutil.Process(proc.pid))}:
            server.pg = pg
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return server


async def start_bare(model: ModelServer, tag: str) -> Server:
    return await _start_peer(model, tag, "--serve-bare", "/twilio/media", "bare relay", 20)


async def start_sample(model: ModelServer, tag: str) -> Server:
    return await _start_peer(model, tag, "--serve-sample", "/media-stream", "twilio-samples bridge", 30)


async def _start_peer(model: ModelServer, tag: str, flag: str, path: str, name: str, start_s: float) -> Server:
    """One of this script's own servers (the bare relay, the sample) in a subprocess."""
    port = free_port()
    log_path = REPO / ".shim" / "bench" / f"serve-{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), flag, str(port), "--model-url", model.url],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
    server = Server(proc, f"ws://127.0.0.1:{port}{path}", log_path)
    deadline = perf() + start_s
    while not await port_open(port):
        if proc.poll() is not None or perf() > deadline:
            await stop_server(server)
            raise RuntimeError(f"{name} did not start; see {log_path}:\n{tail(log_path)}")
        await asyncio.sleep(0.05)
    return server


async def stop_server(server: Server) -> int | None:
    proc = server.proc
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the shim drains, flushes the writer, stops embedded Postgres
        try:
            await asyncio.to_thread(proc.wait, 40)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    return proc.returncode


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Result:
    stack: str
    calls: int
    window_s: float
    cpu_per_call_min: float
    pg_cpu_per_call_min: float | None
    mib_per_call: float
    rss_idle_mib: float
    rss_live_mib: float
    c2m_ms: list[float]
    m2c_ms: list[float]
    c2m_frames: int
    m2c_frames: int
    c2m_lost: int
    m2c_lost: int
    late_frames: int
    max_late_ms: float
    server_cpu_pct: float  # % of one core, over the window
    pg_cpu_pct: float
    gen_cpu_pct: float
    other_cpu_pct: float  # everything else on the machine (other processes)
    dropped_calls: int
    untagged_media: int  # media frames to the caller that carried no tag (e.g. ambience between answers)
    user_share: float = 0.0  # share of the server's CPU spent in user mode
    switches_per_s: float = 0.0  # context switches of the server
    idle_cpu_pct: float = 0.0  # the server with no call, after the warm-up (% of a core)
    late_ms: list[float] = None  # how late the generator sent frames: p50, p99, max (ms)
    setup_ms: list[float] = None  # caller opens the WebSocket -> session.update at the model
    start_update_ms: list[float] = None  # caller sends `start` -> session.update at the model
    start_connect_ms: list[float] = None  # ... of which `start` -> model socket accepted
    created_update_ms: list[float] = None  # ... and session.created sent -> session.update received
    paired_calls: int = 0  # calls whose model session was identified (set-up figures are over these)
    barges: int = 0  # barge-in turns (speech_started mid-answer) in the window
    clears: int = 0  # `clear` frames the callers received for them
    clear_trigger: str = ""  # what triggers the bridge's barge-in decision (see BARGE_TRIGGER)
    clear_ms: list[float] = None  # that trigger -> `clear` at the caller
    connect_ms: list[float] = None  # a loopback WebSocket connect to the model stand-in (probes)
    round: int = 0  # with --repeat: which pass over the plan


# What makes each bridge decide to cut the assistant off: the shim waits for 200 ms of voiced
# caller audio after speech_started (Vapi's stopSpeakingPlan), so its trigger is the caller frame
# that completes it (the last frame the caller sent before the clear arrived, since frames are
# 20 ms apart and the clear takes far less); the sample acts on speech_started itself.
BARGE_TRIGGER = {"shim": "caller frame", "before": "caller frame", "sample": "speech_started", "bare": ""}
# "before": the shim from another checkout (--before-dir), measured in the same run for a
# before/after figure of a change.
STACK_NAMES = {"shim": "shim", "before": "shim before", "sample": "twilio-samples", "bare": "bare relay"}


def pct(samples: list[float]) -> list[float]:
    """p50, p99, max in ms."""
    if not samples:
        return [float("nan")] * 3
    import numpy as np

    a = np.asarray(samples) * 1000
    return [float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())]


async def run_stack(stack: str, n: int, model: ModelServer, c2m: Delays, m2c: Delays, args) -> Result:
    tag = f"{stack}-{n}"
    await wait_quiet(args.quiet_wait, tag)
    say(f"[{tag}] starting server")
    starter = {"shim": lambda: start_shim(model, tag, args.shim_dir, args.media, args.workers),
               "before": lambda: start_shim(model, tag, args.before_dir, args.media, args.workers),
               "bare": lambda: start_bare(model, tag), "sample": lambda: start_sample(model, tag)}[stack]
    server = await starter()
    # the sample never closes on Twilio's `stop` (it waits for the socket to close): don't wait long
    stop_wait = 1.0 if stack == "sample" else 5.0
    proc = psutil.Process(server.proc.pid)
    say(f"[{tag}] server pid {proc.pid}")
    pacer = Pacer()
    pacer.start()
    callers: list[Caller] = []
    tagger = Tagger(FRAME_BYTES)
    numbers = itertools.count(1)
    rng = random.Random(n)
    try:
        c2m.reset()
        m2c.reset()

        async def open_call(due: float) -> Caller:
            await sleep_until(due)
            caller = Caller(next(numbers), c2m, m2c, tagger)
            await caller.connect(server.media_url, AUTH_TOKEN)
            # Twilio's 20 ms frames of different calls are not in step: a random phase per call.
            pacer.add(caller, perf() + rng.uniform(0, 0.020))
            return caller

        # Warm-up: a few calls through a full response, so lazy imports and first-use caches are
        # paid before the idle RSS is taken.
        say(f"[{tag}] warm-up")
        model.spread_phases = False
        warm = await asyncio.gather(*(open_call(perf()) for _ in range(min(n, 4))))
        await wait_until(lambda: model.live >= len(warm), 30, "warm-up sessions", server.proc)
        await asyncio.sleep(args.warmup)
        await asyncio.gather(*(c.stop(stop_wait) for c in warm))
        await wait_until(lambda: not model.sessions, 15, "warm-up sessions to close", server.proc)
        await asyncio.sleep(0.5)
        idle0, i0 = tree_cpu(proc, _pg_pids(server)), perf()
        await asyncio.sleep(2.0)
        idle_pct = 100 * (tree_cpu(proc, _pg_pids(server)) - idle0) / (perf() - i0)
        rss_idle = tree_rss(proc, _pg_pids(server))
        connect_ms = pct(await probe_connects(model.url, 20))

        say(f"[{tag}] ramping up {n} calls over {args.ramp:g} s")
        model.spread_phases = True
        model.rng = random.Random(n)  # the same phases for every stack at this size
        SESSIONS.clear()
        start = perf()
        callers = await asyncio.gather(*(open_call(start + args.ramp * i / n) for i in range(n)))
        try:
            await wait_until(lambda: model.live >= n, 30 + args.ramp, f"{n} live model sessions", server.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (live: {model.live}, callers hung up by the server: "
                               f"{sum(c.closed for c in callers)}); server log {server.log_path}:\n"
                               f"{tail(server.log_path, 5)[-3000:]}") from None
        await asyncio.sleep(args.settle)

        say(f"[{tag}] measuring {args.seconds:g} s")
        me = psutil.Process()
        exclude = _pg_pids(server)
        sys0, gen0 = psutil.cpu_times(), me.cpu_times()
        cnt0 = tree_counters(proc, exclude)
        cpu0 = cnt0[0] + cnt0[1]
        pg0 = tree_cpu(server.pg) if server.pg else None
        t0 = perf()
        c2m.window(t0, float("inf"))
        m2c.window(t0, float("inf"))
        rss_samples = []
        end = t0 + args.seconds
        while (now := perf()) < end:
            await asyncio.sleep(min(1.0, end - now))
            rss_samples.append(tree_rss(proc, exclude))
        t1 = perf()
        c2m.window(t0, t1)
        m2c.window(t0, t1)
        barges = sum(t0 <= t <= t1 for t in model.barge_times)
        cnt1 = tree_counters(proc, exclude)
        cpu1 = cnt1[0] + cnt1[1]
        pg1 = tree_cpu(server.pg) if server.pg else None
        sys1, gen1 = psutil.cpu_times(), me.cpu_times()
        dropped = sum(c.closed for c in callers)
        await asyncio.sleep(args.grace)  # frames in flight at t1 still count
        window = t1 - t0
        call_min = n * window / 60
        paired = [c for c in callers if c.session is not None and c.session.t_update == c.session.t_update]
        trigger = BARGE_TRIGGER[stack]
        # counted by when the caller started talking (nan: the caller was never paired with its session)
        clears = [(cf if trigger == "caller frame" else cs) for c in callers for (t, cf, cs) in c.clears
                  if t0 <= t - cs <= t1]
        sys_total = sum(sys1) - sum(sys0)
        busy = 1 - ((sys1.idle + getattr(sys1, "iowait", 0)) - (sys0.idle + getattr(sys0, "iowait", 0))) / sys_total
        rss_live = statistics.median(rss_samples)
        busy_pct = 100 * busy * (os.cpu_count() or 1)
        server_pct = 100 * (cpu1 - cpu0) / window
        pg_pct = 100 * (pg1 - pg0) / window if pg0 is not None else 0.0
        gen_pct = 100 * ((gen1.user + gen1.system) - (gen0.user + gen0.system)) / window
        return Result(
            stack=stack,
            calls=n,
            window_s=window,
            cpu_per_call_min=(cpu1 - cpu0) / call_min,
            pg_cpu_per_call_min=(pg1 - pg0) / call_min if pg0 is not None else None,
            mib_per_call=(rss_live - rss_idle) / n / MiB,
            rss_idle_mib=rss_idle / MiB,
            rss_live_mib=rss_live / MiB,
            c2m_ms=pct(c2m.samples),
            m2c_ms=pct(m2c.samples),
            c2m_frames=len(c2m.samples),
            m2c_frames=len(m2c.samples),
            c2m_lost=c2m.lost(),
            m2c_lost=m2c.lost(),
            late_frames=c2m.late_in_window + m2c.late_in_window,
            max_late_ms=max(c2m.max_late, m2c.max_late) * 1000,
            server_cpu_pct=server_pct,
            pg_cpu_pct=pg_pct,
            gen_cpu_pct=gen_pct,
            other_cpu_pct=max(busy_pct - server_pct - pg_pct - gen_pct, 0.0),
            dropped_calls=dropped,
            untagged_media=sum(c.media_untagged for c in callers),
            user_share=(cnt1[0] - cnt0[0]) / max(cpu1 - cpu0, 1e-9),
            switches_per_s=(cnt1[2] - cnt0[2]) / window,
            idle_cpu_pct=idle_pct,
            late_ms=pct(c2m.lates + m2c.lates),
            setup_ms=pct([c.session.t_update - c.t_connect for c in paired]),
            start_update_ms=pct([c.session.t_update - c.t_start for c in paired]),
            start_connect_ms=pct([c.session.t_connected - c.t_start for c in paired]),
            created_update_ms=pct([c.session.t_update - c.session.t_connected for c in paired]),
            paired_calls=len(paired),
            barges=barges,
            clears=len(clears),
            clear_trigger=trigger,
            clear_ms=pct(clears) if trigger else [float("nan")] * 3,
            connect_ms=connect_ms,
        )
    finally:
        say(f"[{tag}] hanging up")
        await asyncio.gather(*(c.stop(stop_wait) for c in callers if not c.closed), return_exceptions=True)
        await pacer.stop()
        try:
            await wait_until(lambda: not model.sessions, 15, "model sessions to close")
        except RuntimeError as exc:
            say(f"[{tag}] {exc}; closing them")
            for s in list(model.sessions):
                s.close()
        code = await stop_server(server)
        if code not in (0, -signal.SIGTERM):
            say(f"[{tag}] server exited with {code}; log {server.log_path}:\n{tail(server.log_path)}")


async def probe_connects(url: str, count: int) -> list[float]:
    """How long opening a WebSocket to the model stand-in takes here (seconds, one at a time): what
    the shim's `start` -> session.update includes that a real deployment replaces by its own
    connect to OpenAI (TLS, ~100 ms away), so it can be taken out of the shim's part."""
    from picows import WSListener, ws_connect

    times = []
    for _ in range(count):
        t = perf()
        transport, _ = await ws_connect(WSListener, url, extra_headers={"Authorization": "Bearer sk-bench"})
        times.append(perf() - t)
        transport.disconnect()
        await asyncio.sleep(0.01)
    return times


async def wait_quiet(max_wait: float, tag: str) -> None:
    """Other processes on a shared machine skew every figure: wait (bounded) until the machine
    is nearly idle before a run."""
    deadline = perf() + max_wait
    said = False
    while True:
        t0 = psutil.cpu_times()
        await asyncio.sleep(1.0)
        t1 = psutil.cpu_times()
        total = sum(t1) - sum(t0)
        idle = (t1.idle + t1.iowait) - (t0.idle + t0.iowait)
        busy_core_pct = 100 * (1 - idle / total) * (os.cpu_count() or 1) if total > 0 else 0.0
        if busy_core_pct < 20:
            return
        if perf() > deadline:
            say(f"[{tag}] machine still busy ({busy_core_pct:.0f}% of a core), measuring anyway")
            return
        if not said:
            say(f"[{tag}] machine busy ({busy_core_pct:.0f}% of a core): waiting up to {max_wait:g} s for it to settle")
            said = True


def _pg_pids(server: Server) -> set[int]:
    return {q.pid for q in _tree(server.pg)} if server.pg else set()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the report ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def source_version(path: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return str(path)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--", "shim"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes in shim/" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return str(path)


def fmt2(v: list[float] | None) -> str:
    """p50 / p99 of a [p50, p99, max] triple."""
    if not v or v[0] != v[0]:
        return "—"
    return f"{v[0]:.2f} / {v[1]:.2f}"


def name_of(r: Result, meta: dict) -> str:
    if r.stack == "before" and meta.get("before_version"):
        return f"shim before ({meta['before_version']})"
    return f"shim ({meta['media']})" if r.stack == "shim" and meta.get("media") != "one-port" else STACK_NAMES[r.stack]


def shown(results: list[Result]) -> tuple[list[Result], dict[tuple[str, int], str]]:
    """One row per (stack, N), and its CPU ratio to the bare relay. With several rounds, each
    ratio is taken within its round (bare and the other stack measured minutes apart), the
    column shows their median and range, and the row shown is the stack's quietest round (least
    CPU used by other processes): its delays are the least disturbed."""
    bare = {(r.round, r.calls): r for r in results if r.stack == "bare"}
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.stack, r.calls), []).append(r)
    rows, ratios = [], {}
    for key, rs in groups.items():
        rows.append(min(rs, key=lambda r: r.other_cpu_pct))
        if key[0] == "bare":
            ratios[key] = "1"
            continue
        each = sorted(r.cpu_per_call_min / bare[(r.round, r.calls)].cpu_per_call_min for r in rs
                      if (r.round, r.calls) in bare)
        if not each:
            ratios[key] = "—"
        elif len(each) == 1:
            ratios[key] = f"{each[0]:.2f}"
        else:
            ratios[key] = f"{statistics.median(each):.2f} ({each[0]:.2f}–{each[-1]:.2f}, {len(each)} rounds)"
    return sorted(rows, key=lambda r: r.calls), ratios


def report(results: list[Result], meta: dict) -> str:
    """The Markdown the README's Performance section shows (stacks in run order, sizes ascending)."""
    out = []
    results, ratios = shown(results)
    out.append("| stack | N | CPU-s / call-min | × bare | MiB / call | up p50 / p99 ms | down p50 / p99 ms "
               "| set-up p50 / p99 ms | generator late p99 / max ms | CPU % of a core: generator / others |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: r.calls):
        cpu = f"{r.cpu_per_call_min:.3f}"
        if r.pg_cpu_per_call_min is not None:
            cpu += f" (+{r.pg_cpu_per_call_min:.3f} PG)"
        ratio = ratios[(r.stack, r.calls)]
        late = r.late_ms or [float("nan")] * 3
        out.append(f"| {name_of(r, meta)} | {r.calls} | {cpu} | {ratio} | {r.mib_per_call:.3f} | {fmt2(r.c2m_ms)} "
                   f"| {fmt2(r.m2c_ms)} | {fmt2(r.setup_ms)} | {late[1]:.1f} / {late[2]:.1f} "
                   f"| {r.gen_cpu_pct:.0f} / {r.other_cpu_pct:.0f} |")
    out.append("")
    out.append("| stack | N | `start` → session.update p50 / p99 ms | of which `start` → model socket open "
               "| and session.created → update | a loopback connect (probe) | barge-ins / clears "
               "| barge-in trigger → `clear` at the caller p50 / p99 / max ms |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: r.calls):
        if r.clear_trigger and r.clears:
            clear = f"{' / '.join(f'{x:.2f}' for x in r.clear_ms)} (from {r.clear_trigger})"
        else:
            clear = "— (no barge-in)" if not r.clear_trigger else "— (no clear sent)"
        out.append(f"| {name_of(r, meta)} | {r.calls} | {fmt2(r.start_update_ms)} | {fmt2(r.start_connect_ms)} "
                   f"| {fmt2(r.created_update_ms)} | {fmt2(r.connect_ms)} | {r.barges} / {r.clears} | {clear} |")
    out.append("")
    out.append("| stack | N | window s | RSS idle → live MiB | lost up / down | frames sent >20 ms late "
               "| calls dropped | untagged media | CPU % of a core: server / PG / load-gen / other "
               "| server CPU in user mode | server ctx switches/s | server idle CPU % |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: r.calls):
        out.append(f"| {name_of(r, meta)} | {r.calls} | {r.window_s:.1f} "
                   f"| {r.rss_idle_mib:.1f} → {r.rss_live_mib:.1f} | {r.c2m_lost} / {r.m2c_lost} "
                   f"| {r.late_frames} | {r.dropped_calls} | {r.untagged_media} "
                   f"| {r.server_cpu_pct:.0f} / {r.pg_cpu_pct:.0f} / {r.gen_cpu_pct:.0f} / {r.other_cpu_pct:.0f} "
                   f"| {100 * r.user_share:.0f}% | {r.switches_per_s:,.0f} | {r.idle_cpu_pct:.1f} |")
    out.append("")
    ncpu = meta["cpus"]
    out.append(
        f"Machine: {ncpu} CPU ({meta['cpu']}), Python {meta['python']}, uvloop; everything on 127.0.0.1; "
        f"{meta['when']}. The load generator (all callers and model stand-ins, one process) shares the {ncpu} cores "
        "with the server under test (and, for the shim, its embedded PostgreSQL), so the figures are upper bounds; "
        "every stack ran in this one run, so the ratios are like for like. "
        "CPU = user+system of the server process and its children over the window, per minute of live call "
        "('+PG': the embedded PostgreSQL's own processes). MiB/call = (median RSS with all calls live − RSS idle "
        "after a warm-up) / N. up = caller frame written → input_audio_buffer.append at the model; down = model "
        "delta written → Twilio media at the caller: two loopback hops and both event loops each. "
        "Set-up = the caller opens the WebSocket → session.update reaches the model. Generator late = how long "
        "after its schedule the load generator wrote a frame (if it grows, the generator, not the bridge, is slow). "
        f"Traffic: 20 ms caller frames ({FRAME_BYTES} B) all call long; the assistant talks {meta['talk']:g} s of every "
        f"{meta['cycle']:g} s in {DELTA_BYTES} B (100 ms) deltas, each relayed as media + mark and echoed when "
        "played; every other turn the caller barges in 1.2 s into the answer. Calls ramp up over "
        f"{meta['ramp']:g} s; window {meta['seconds']:g} s per run. Shim source: {meta['source_version']}."
    )
    if any("rounds)" in v for v in ratios.values()):
        out.append("")
        out.append("Several rounds: × bare is the median of the ratios taken within each round (bare relay and "
                   "the stack measured minutes apart), with their range; the rest of each row is from that "
                   "stack's quietest round (least CPU used by other processes).")
    late = [r for r in results if r.late_frames]
    if late:
        out.append("")
        out.append("WARNING: the load generator sent frames more than 20 ms late in "
                   + ", ".join(f"{r.stack}/{r.calls} ({r.late_frames}, max {r.max_late_ms:.0f} ms)" for r in late)
                   + ": it did not keep up, so those delay figures include its own backlog.")
    busy = [r for r in results if r.other_cpu_pct > 10]
    if busy:
        out.append("")
        out.append("WARNING: other processes used CPU during "
                   + ", ".join(f"{r.stack}/{r.calls} ({r.other_cpu_pct:.0f}% of a core)" for r in busy)
                   + "; rerun on a quiet machine for comparable figures.")
    bad = [r for r in results if r.dropped_calls or r.c2m_lost or r.m2c_lost]
    if bad:
        out.append("")
        out.append("WARNING: calls dropped or frames lost in "
                   + ", ".join(f"{r.stack}/{r.calls}" for r in bad) + " (see the last table).")
    return "\n".join(out)


def run_meta(args) -> dict:
    import datetime

    return {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
        "media": args.media, "talk": args.talk, "cycle": args.cycle, "ramp": args.ramp, "seconds": args.seconds,
        "source_version": args.source_version,
        "before_version": source_version(args.before_dir) if args.before_dir else None,
        "command": "scripts/bench_relay.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else "make bench",
    }


def save(results: list[Result], meta: dict, json_path: Path | None, svg_path: Path | None) -> None:
    from dataclasses import asdict

    from bench_svg import cpu_chart

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                           option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        say(f"results written to {json_path}")
    if svg_path is not None:
        svg_path.parent.mkdir(parents=True, exist_ok=True)
        series = {}
        for r in shown(results)[0]:
            series.setdefault(name_of(r, meta), []).append((r.calls, r.cpu_per_call_min))
        svg_path.write_text(cpu_chart(series, subtitle=f"{meta['cpus']} cores shared with the load generator, "
                                                       f"{meta['when']}"))
        say(f"plot written to {svg_path}")


def load(path: Path) -> tuple[list[Result], dict]:
    data = orjson.loads(path.read_bytes())
    nan = float("nan")
    rows = [{k: [nan if x is None else x for x in v] if isinstance(v, list) else v for k, v in r.items()}
            for r in data["results"]]  # JSON has no NaN: orjson wrote null
    return [Result(**r) for r in rows], data["meta"]


def plan(args) -> list[tuple[str, int, int]]:
    """(stack, N, round) in run order: at each size the floor first, then the others; with
    --repeat, every other round in reverse, so drift in the machine's load does not always
    favour the same stack."""
    stacks = [s for s in args.stacks if args.baseline or s != "bare"]
    runs = []
    for k in range(args.repeat):
        order = stacks if k % 2 == 0 else stacks[::-1]
        runs += [(s, n, k) for n in args.calls for s in order]
        runs += [(s, n, k) for n in args.delay_calls if n not in args.calls for s in order
                 if s in args.delay_stacks]
    return runs


async def bench(args) -> int:
    args.source_version = source_version(args.shim_dir)
    c2m, m2c = Delays(), Delays()
    model = ModelServer(c2m, m2c, cycle_s=args.cycle, talk_s=args.talk)
    model.barge_in = args.barge_in
    await model.start()
    results: list[Result] = []
    failures: list[str] = []
    started = perf()
    runs = plan(args)
    say(f"{len(runs)} runs: " + ", ".join(f"{s}/{n}" for s, n, _ in runs))
    try:
        for stack, n, k in runs:
            try:
                result = await run_stack(stack, n, model, c2m, m2c, args)
                result.round = k
                results.append(result)
            except Exception as exc:  # one failed run must not lose the others
                failures.append(f"{stack}/{n}: {type(exc).__name__}: {exc}")
                say(f"[{stack}-{n}] FAILED: {exc}")
    finally:
        await model.stop()
    say(f"(bench took {perf() - started:.0f} s)")
    meta = run_meta(args)
    save(results, meta, args.json, args.svg)
    print(report(results, meta))
    for failure in failures:
        print(f"\nFAILED RUN {failure}")
    return 1 if failures else 0


def _calls(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 50,100") from None


def _stacks(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in STACK_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"{','.join(bad)}: expected stacks among {','.join(STACK_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="50,100", type=_calls,
                        help="concurrent calls, a comma-separated list: one run per value and stack (default 50,100)")
    parser.add_argument("--delay-calls", default="150", type=_calls,
                        help="further sizes run only for --delay-stacks (default 150; '' for none)")
    parser.add_argument("--stacks", default="bare,sample,shim", type=_stacks,
                        help="stacks to run at each size, in order (default bare,sample,shim)")
    parser.add_argument("--delay-stacks", default="bare,shim", type=_stacks,
                        help="stacks run at the --delay-calls sizes (default bare,shim)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over the whole plan (default 1); with more, each ratio is the median of "
                             "per-pass ratios, shown with its range: steadier figures on a busy machine")
    parser.add_argument("--quick", action="store_true",
                        help="a ~1.5 min smoke run: 50 calls, every stack, 8 s windows, nothing at 150")
    parser.add_argument("--media", choices=("one-port", "media-port"), default="one-port",
                        help="one-port: media on the webhook port, as deployed (default); media-port: picows on its own port")
    parser.add_argument("--workers", type=int, default=1,
                        help="`shim serve --workers` (default 1: one process; the CPU columns count all workers)")
    parser.add_argument("--seconds", type=float, default=15, help="steady-state window per run (default 15)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="run the bare picows relay, the floor the ratios are taken against (default on)")
    parser.add_argument("--barge-in", action=argparse.BooleanOptionalAction, default=True,
                        help="the caller talks over every other answer (default on)")
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds over which calls start (default 3)")
    parser.add_argument("--cycle", type=float, default=6.0, help="seconds per assistant+caller turn (default 6)")
    parser.add_argument("--talk", type=float, default=3.0, help="seconds the assistant talks per cycle (default 3)")
    parser.add_argument("--shim-dir", type=lambda p: Path(p).resolve(), default=REPO,
                        help="source tree of the shim to run (default: this checkout), e.g. a `git archive` of a commit")
    parser.add_argument("--before-dir", type=lambda p: Path(p).resolve(), default=None,
                        help="another checkout of the shim, run as the stack 'before' (e.g. a git worktree "
                             "of the previous commit): a change's before/after in one run")
    parser.add_argument("--quiet-wait", type=float, default=5,
                        help="before each run, wait up to this long for other processes to go idle (default 5)")
    parser.add_argument("--json", type=Path, default=REPO / ".shim" / "bench" / "bench.json",
                        help="write the results here (default .shim/bench/bench.json)")
    parser.add_argument("--svg", type=Path, default=REPO / ".shim" / "bench" / "bench.svg",
                        help="write the CPU plot here (default .shim/bench/bench.svg)")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="no run: print the tables of an earlier run's --json (and write --svg from it)")
    parser.add_argument("--warmup", type=float, default=3.5, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--grace", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-sample", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--model-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare, args.model_url)
        return 0
    if args.serve_sample:
        from _bench_sample import serve_sample

        serve_sample(args.serve_sample, args.model_url)
        return 0
    if args.from_json:
        results, meta = load(args.from_json)
        save(results, meta, None, args.svg)
        print(report(results, meta))
        return 0
    if args.quick:
        args.calls, args.delay_calls, args.seconds, args.ramp, args.warmup = [50], [], 8.0, 2.0, 2.0
        args.quiet_wait = min(args.quiet_wait, 10)
    if args.repeat < 1:
        parser.error("--repeat: expected a positive integer")
    if "before" in args.stacks and args.before_dir is None:
        parser.error("--stacks before: needs --before-dir (another checkout of the shim)")
    if args.before_dir is not None and not (args.before_dir / "shim" / "cli.py").is_file():
        parser.error(f"--before-dir {args.before_dir}: expected a checkout of the shim (no shim/cli.py there)")
    if not args.calls or min(args.calls + args.delay_calls) < 1:
        parser.error("--calls: expected positive integers, e.g. 50,100")
    if not 0 < args.talk < args.cycle - 1:
        parser.error("--talk must be positive and at least 1 s shorter than --cycle")
    import uvloop

    return uvloop.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
