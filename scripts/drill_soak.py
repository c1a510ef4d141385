"""Load and soak drill: many concurrent calls for minutes through a real `shim serve`.

Bounded, loopback only: `shim serve` as a subprocess (embedded PostgreSQL unless
--database-url), the lightweight Realtime stand-in and Twilio callers of scripts/_bench_peers.py
(picows; the validating stand-ins of shim/testing/ keep every event and all audio, ~1 GB at
200 calls x 10 min, and would measure themselves). The model runs in this process; the callers
in --generators child processes, so the shim is not starved by its own load.

Each call: a signed stream, 20 ms μ-law frames at real time for the whole call, ~--call-seconds
long (then its slot places a new call, so the soak also covers calls ending and starting); the model
answers on a fixed cycle (it talks --talk s of every --cycle s in 100 ms deltas, then the caller
talks: speech_started / stopped / transcript); the caller plays the answer at 8 bytes/ms and
echoes each mark once played. Every frame carries a tag naming its call (or model session) and
a sequence number, so a frame that is lost, reordered or delivered to another call is seen.

Reported: frames the caller sent vs frames its model session received, frames the model sent
vs frames the caller received, per call; every call's end reason and row in Postgres; the
shim's RSS every --sample s (first vs last minute); event-loop lag p50/p99/max from
/metrics (shim_event_loop_lag_seconds); CPU-s per call-minute; how late the load generator
sent its frames, and how long the shim's loop waited for a CPU (/proc/PID/schedstat): a
saturated generator or a busy machine is not the shim's fault, and fails the drill as such.

Usage: .venv/bin/python scripts/drill_soak.py [--calls 200] [--minutes 10]
       .venv/bin/python scripts/drill_soak.py --calls 20 --minutes 0.5   (a quick run, ~1 min)
Exit 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_peers import DELTA_BYTES, FRAME_BYTES, Caller, ModelServer, ModelSession, Pacer, Tagger, perf  # noqa: E402
from bench_relay import tree_cpu, tree_rss  # noqa: E402
from drill_db_outage import AUTH_TOKEN, report, run_drill, serve_env, start_serve, stop_serve  # noqa: E402

from shim.db import resolve_dsn  # noqa: E402
from shim.testing._serve import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
METRICS_TOKEN = "drill-metrics-token"
# A caller hangs up between QUIET_S and QUIET_S + 0.5 s after the assistant's answer finished
# playing: the model is silent then (until the next answer, --cycle minus --talk >= 2 s after).
QUIET_S = 1.0

# A tag is MAGIC (28 bits) | owner (16 bits) | sequence (20 bits: 5.8 h of 20 ms frames). Owner
# 1..32767 is a call (its number n), 32768.. a model session. The magic tells a tag from
# anything else the shim might send (e.g. background sound alone: random signs pass 1 in 2**28).
MAGIC = 0x5A0_D50A
SESSION_OWNER = 1 << 15
MAX_CALLS = SESSION_OWNER - 1  # calls in one run, churn included


def first_tag(owner: int) -> int:
    return (MAGIC << 36) | (owner << 20) | 1


def parse_tag(tag: int | None) -> tuple[int, int] | None:
    """(owner, sequence) of a drill tag, None for anything else."""
    if tag is None or tag >> 36 != MAGIC:
        return None
    return (tag >> 20) & 0xFFFF, tag & 0xFFFFF


class Lateness:
    """How late the load generator sent what it had scheduled (1 ms buckets up to 1 s)."""

    def __init__(self) -> None:
        self.buckets = [0] * 1001
        self.max = 0.0

    def add(self, late: float) -> None:
        if late > self.max:
            self.max = late
        self.buckets[min(max(int(late * 1000), 0), 1000)] += 1

    def merge(self, other: dict) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other["buckets"])]
        self.max = max(self.max, other["max"])

    def quantile(self, q: float) -> float:
        """Seconds (upper bound of the 1 ms bucket)."""
        total = sum(self.buckets)
        if not total:
            return 0.0
        seen = 0
        for ms, n in enumerate(self.buckets):
            seen += n
            if seen >= q * total:
                return (ms + 1) / 1000
        return 1.0


@dataclass
class Stream:
    """One direction of one call as one end saw it: counts, gaps in the sequence, frames from another call."""

    owner: int  # whose tags this end sends
    sent: int = 0
    received: int = 0
    source: int | None = None  # whose tags it received (the first seen)
    foreign: int = 0  # frames received from anyone else
    gaps: int = 0  # sequence numbers skipped or repeated
    last_seq: int = 0
    recent_sends: list[float] = field(default_factory=list)  # perf() of the last sends (a ring, see on_send)

    def on_send(self, tag: int, t: float, late: float, lateness: Lateness) -> None:
        self.sent += 1
        lateness.add(late)
        if len(self.recent_sends) >= 64:
            del self.recent_sends[:32]
        self.recent_sends.append(t)

    def on_recv(self, tag: int | None) -> bool:
        parsed = parse_tag(tag)
        if parsed is None:
            return False
        owner, seq = parsed
        if self.source is None:
            self.source = owner
        if owner != self.source:
            self.foreign += 1
            return True
        self.received += 1
        if seq != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = seq
        return True


class _End:
    """What _bench_peers' Caller and ModelSession call on each frame (their c2m / m2c)."""

    def __init__(self, stream: Stream, lateness: Lateness):
        self.stream, self.lateness = stream, lateness

    def on_send(self, tag: int, t: float, late: float, optional: bool = False) -> None:
        self.stream.on_send(tag, t, late, self.lateness)

    def on_recv(self, tag: int | None, t: float) -> bool:
        return self.stream.on_recv(tag)


# --- the model (this process) ------------------------------------------------------------------


class SoakSession(ModelSession):
    def __init__(self, server: SoakModel, n: int):
        super().__init__(server, n)
        owner = SESSION_OWNER + n
        self.heard = Stream(owner)  # caller -> model
        self.said = Stream(owner)  # model -> caller
        self.c2m = _End(self.heard, server.lateness)
        self.m2c = _End(self.said, server.lateness)
        self.tagger = Tagger(DELTA_BYTES, first=first_tag(owner))
        server.all_sessions.append(self)


class SoakModel(ModelServer):
    session_class = SoakSession

    def __init__(self, *, cycle_s: float, talk_s: float, seed: int):
        super().__init__(None, None, cycle_s=cycle_s, talk_s=talk_s)
        self.lateness = Lateness()
        self.all_sessions: list[SoakSession] = []
        self.spread_phases = True  # about half the assistants talk at any moment, not all in step
        # Turns as the soak's callers take them (they never talk over an answer): the benchmark's
        # barge-in turns would make the deltas a bridge rightly drops count as lost here.
        self.barge_in = False
        self.rng = random.Random(seed)


# --- the callers (child processes) ----------------------------------------------------------------


async def callers_child(spec: dict) -> None:
    """`drill_soak.py --callers-child SPEC`: keep spec["count"] calls up (slots numbered from
    spec["first"], started over spec["ramp_s"]); each call lasts spec["call_s"] x 0.5-1.5, then
    its slot places the next one (numbers first + i + k * slots). Says "ready" once every slot has
    a call; on "stop" (stdin) or at spec["deadline_s"], hangs every call up and prints one JSON
    line: each call's streams and the send lateness.

    A call hangs up in its caller's turn, QUIET_S after its assistant's answer finished playing
    (the model is silent until its next answer): every frame the model sent before the hang-up
    must have been heard. It sends no frame after deciding to hang up."""
    lateness = Lateness()
    pacer = Pacer()
    pacer.start()
    rng = random.Random(spec["first"])
    reports: list[dict] = []
    stopping, ready = asyncio.Event(), asyncio.Event()
    count, started = spec["count"], perf()
    connected = 0

    async def hang_up(caller: Caller, out: Stream, back: Stream) -> None:
        closed_early = caller.closed
        caller.stopped = True
        give_up = perf() + 2 * spec["cycle_s"] + 10
        while perf() < give_up and not caller.closed and not QUIET_S <= perf() - caller.play_end <= QUIET_S + 0.5:
            await asyncio.sleep(0.02)
        hangup_at = perf()
        await caller.stop(timeout=10)
        reports.append({"n": caller.n, "call_sid": caller.call_sid, "out": asdict(out), "back": asdict(back),
                        "closed_early": closed_early, "hangup_at": hangup_at, "error": None})

    async def slot(i: int) -> None:
        nonlocal connected
        await asyncio.sleep(max(0.0, started + spec["ramp_s"] * i / count - perf()))
        for k in itertools.count():
            n = spec["first"] + i + k * spec["slots"]
            if (k and stopping.is_set()) or n > MAX_CALLS:
                return
            out, back = Stream(n), Stream(n)
            caller = Caller(n, _End(out, lateness), _End(back, lateness), Tagger(FRAME_BYTES, first=first_tag(n)))
            try:
                await asyncio.wait_for(caller.connect(spec["media_url"], spec["auth_token"]), 15)
            except Exception as exc:  # reported against the call; the slot goes on
                reports.append({"n": n, "call_sid": caller.call_sid, "out": asdict(out), "back": asdict(back),
                                "closed_early": False, "hangup_at": perf(), "error": f"connect: {exc!r}"})
                await asyncio.sleep(1.0)
                continue
            pacer.add(caller, perf() + rng.uniform(0, 0.020))  # calls' 20 ms frames are not in step
            if k == 0:
                connected += 1
                if connected == count:
                    ready.set()
            length = spec["call_s"] * rng.uniform(0.5, 1.5) if spec["call_s"] else math.inf
            try:
                await asyncio.wait_for(stopping.wait(), length)
            except TimeoutError:
                pass
            await hang_up(caller, out, back)

    slots = [asyncio.create_task(slot(i)) for i in range(count)]
    try:
        await asyncio.wait_for(ready.wait(), spec["ramp_s"] + 60)
        print("ready", flush=True)
    except TimeoutError:
        print(f"not ready: {connected} of {count} calls connected", flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await asyncio.wait_for(reader.readline(), max(1.0, spec["deadline_s"] - (perf() - started)))
    except TimeoutError:
        print("callers: no stop from the drill before the deadline; hanging up", file=sys.stderr)
    stopping.set()
    _, pending = await asyncio.wait(slots, timeout=2 * spec["cycle_s"] + 30)
    for task in pending:
        task.cancel()
    await pacer.stop()
    print(json.dumps({"calls": reports, "lateness": {"buckets": lateness.buckets, "max": lateness.max}}), flush=True)


# --- judging ----------------------------------------------------------------------------------------


def judge(calls: list[dict], sessions: list[dict]) -> dict[str, list[str]]:
    """Problems per call (call_sid -> [...]); an empty dict when every call is whole and apart.
    `calls`: the callers' reports; `sessions`: each model session's heard/said streams."""
    by_caller: dict[int, list[dict]] = {}
    for s in sessions:
        if s["heard"]["source"] is not None:
            by_caller.setdefault(s["heard"]["source"], []).append(s)
    problems: dict[str, list[str]] = {}
    for call in calls:
        out, back, sid = call["out"], call["back"], call["call_sid"]
        found = by_caller.get(call["n"], [])
        p = [call["error"]] if call.get("error") else []
        if call["closed_early"]:
            p.append("the shim closed the stream before the caller hung up")
        if call.get("error"):
            pass
        elif len(found) != 1:
            p.append(f"{len(found)} model sessions heard this call, expected 1")
        else:
            heard, said = found[0]["heard"], found[0]["said"]
            if heard["received"] != out["sent"]:
                p.append(f"caller sent {out['sent']} frames, the model received {heard['received']}")
            if heard["foreign"] or heard["gaps"]:
                p.append(f"the model heard {heard['foreign']} frames of another call, {heard['gaps']} out of sequence")
            if back["source"] is not None and back["source"] != said["owner"]:
                p.append(f"the caller heard model session {back['source']}, not its own ({said['owner']})")
            # More than `due` is fine: frames sent just after the hang-up began, relayed before the
            # stop was handled (the caller misread a stall of the shim as the end of the answer).
            due = said["sent"] - sum(t >= call["hangup_at"] for t in said["recent_sends"])
            if not due <= back["received"] <= said["sent"]:
                p.append(f"the model sent {due} frames before the hang-up ({said['sent']} in all), "
                         f"the caller received {back['received']}")
        if back["foreign"] or back["gaps"]:
            p.append(f"the caller heard {back['foreign']} frames of another call, {back['gaps']} out of sequence")
        if p:
            problems[sid] = p
    return problems


def lag_quantiles(before: str, after: str) -> tuple[float, float, int]:
    """(p50, p99) seconds of shim_event_loop_lag_seconds between two scrapes (linear within a
    bucket, as PromQL's histogram_quantile), and the number of samples."""
    def buckets(text: str) -> dict[float, float]:
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "shim_event_loop_lag_seconds_bucket":
                    out[float(s.labels["le"])] = s.value
        return out

    b0, b1 = buckets(before), buckets(after)
    edges = sorted(b1)
    counts = [b1[e] - b0.get(e, 0.0) for e in edges]
    total = counts[-1] if counts else 0

    def q(x: float) -> float:
        if not total:
            return float("nan")
        rank, lo, below = x * total, 0.0, 0.0
        for edge, cum in zip(edges, counts):
            if cum >= rank:
                if math.isinf(edge):
                    return lo
                return lo + (edge - lo) * (rank - below) / max(cum - below, 1e-9)
            lo, below = edge, cum
        return lo

    return q(0.5), q(0.99), int(total)


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# --- the drill ------------------------------------------------------------------------------------


def shim_procs(server_pid: int) -> tuple[psutil.Process, set[int]]:
    """The serve process, and the pids to leave out of its figures (an embedded Postgres started
    as its child)."""
    proc = psutil.Process(server_pid)
    try:
        pg = {q.pid for q in proc.children(recursive=True) if q.name().startswith(("postgres", "pg_ctl"))}
    except psutil.Error:
        pg = set()
    return proc, pg


def postgres_tree(data_dir: Path) -> psutil.Process | None:
    try:
        return psutil.Process(int((data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()[0]))
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def runq_wait(pid: int) -> float:
    """Seconds the process's main thread (its event loop) spent runnable but waiting for a CPU
    (/proc/PID/schedstat, field 2): lag from a busy machine, not from the shim's own work."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


def say(msg: str) -> None:
    print(msg, flush=True)


async def main(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="shim-drill-soak-"))
    data_dir = work / "data"
    model = SoakModel(cycle_s=args.cycle, talk_s=args.talk, seed=args.calls)
    await model.start()
    http_port, media_port = free_port(), free_port()
    env = serve_env(model.url, http_port, media_port, data_dir, assistants=REPO / "assistants", assistant="demo",
                    SHIM_METRICS_TOKEN=METRICS_TOKEN, SHIM_DRAIN_TIMEOUT="20")
    env.pop("DATABASE_URL", None)
    if args.database_url:
        env["DATABASE_URL"] = args.database_url
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_API_BASE"):  # no recording start: nothing leaves 127.0.0.1
        env.pop(name, None)
    load_before = os.getloadavg()
    say(f"== {args.calls} calls for {args.minutes:g} min through `shim serve`; {args.generators} caller "
        f"process(es); machine load average {load_before[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    server = await start_serve(env, http_port, media_port)
    children: list[asyncio.subprocess.Process] = []
    checks: dict[str, bool] = {}
    scrape_url = f"http://127.0.0.1:{http_port}/metrics"
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    try:
        proc, exclude = shim_procs(server.pid)
        pg = postgres_tree(data_dir) if not args.database_url else None
        rss_idle = tree_rss(proc, exclude) / MiB
        per = math.ceil(args.calls / args.generators)
        for g in range(args.generators):
            first, count = 1 + g * per, min(per, args.calls - g * per)
            if count <= 0:
                continue
            spec = {"first": first, "count": count, "media_url": env["PUBLIC_MEDIA_URL"], "auth_token": AUTH_TOKEN,
                    "ramp_s": args.ramp, "cycle_s": args.cycle, "call_s": args.call_seconds, "slots": args.calls,
                    "deadline_s": args.ramp + args.minutes * 60 + 120}
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--callers-child", json.dumps(spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO, limit=64 * MiB))
        for child in children:
            line = await asyncio.wait_for(child.stdout.readline(), args.ramp + 60)
            if line.strip() != b"ready":
                raise SystemExit(f"a caller process did not start its calls (said {line[:200]!r})")
        deadline = perf() + 30
        while model.live < args.calls and perf() < deadline:
            await asyncio.sleep(0.1)
        say(f"== {model.live} of {args.calls} calls live after a {args.ramp:g} s ramp; soaking")

        # a connection per scrape: a kept-alive one may be closed by the server as it is reused
        async with httpx.AsyncClient(timeout=10, headers=headers, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            gen = [psutil.Process(c.pid) for c in children] + [psutil.Process()]
            failed_scrapes = 0

            async def scrape(timeout: float = 10) -> str:
                """/metrics, or "" when it is not answered in `timeout` (counted: a finding in itself)."""
                nonlocal failed_scrapes
                try:
                    return (await http.get(scrape_url, timeout=timeout)).text
                except httpx.HTTPError:
                    failed_scrapes += 1
                    return ""

            scrape0 = await scrape(60)
            cpu0, pg0 = tree_cpu(proc, exclude), tree_cpu(pg) if pg else 0.0
            gen0 = [sum(p.cpu_times()[:2]) for p in gen]
            sys0, wait0, t0 = psutil.cpu_times(), runq_wait(server.pid), perf()
            rss: list[tuple[float, float]] = []
            lag_max, live = 0.0, [model.live]
            end = t0 + args.minutes * 60
            step = min(args.sample, args.minutes * 60 / 6)
            next_at = t0
            while True:
                now = perf()
                if now >= next_at:
                    rss.append((now - t0, tree_rss(proc, exclude) / MiB))
                    text = await scrape()
                    lag_max = max(lag_max, metric(text, "shim_event_loop_lag_max_seconds") or 0.0)
                    next_at += step
                    if args.verbose:
                        say(f"   t={now - t0:6.1f} s  RSS {rss[-1][1]:7.1f} MiB  live {model.live}  "
                            f"lag max {lag_max * 1000:.1f} ms")
                live.append(model.live)
                if server.poll() is not None or any(c.returncode is not None for c in children):
                    raise SystemExit("shim serve or a caller process exited during the soak")
                if now >= end:
                    break
                await asyncio.sleep(min(0.5, end - now, max(next_at - now, 0.0)))
            t1 = perf()
            scrape1 = await scrape(60)
            cpu1, pg1 = tree_cpu(proc, exclude), tree_cpu(pg) if pg else 0.0
            gen1 = [sum(p.cpu_times()[:2]) for p in gen]
            sys1, wait1 = psutil.cpu_times(), runq_wait(server.pid)
            rss.append((t1 - t0, tree_rss(proc, exclude) / MiB))
            lag_max = max(lag_max, metric(scrape1, "shim_event_loop_lag_max_seconds") or 0.0)

            say("== hanging up")
            calls: list[dict] = []
            lateness = model.lateness
            for child in children:
                child.stdin.write(b"stop\n")
                await child.stdin.drain()
            for child in children:
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                result = json.loads(line)
                calls += result["calls"]
                lateness.merge(result["lateness"])
                await asyncio.wait_for(child.wait(), 10)
            deadline = perf() + 20
            while model.sessions and perf() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            final = await scrape(60)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
        if server.poll() is None:
            await stop_serve(server)
        await model.stop()
    code_ok = server.returncode in (0, -15)

    sids = [c["call_sid"] for c in calls]
    dsn, embedded = resolve_dsn(args.database_url, data_dir)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT call_sid, status, ended_reason FROM calls WHERE call_sid = ANY($1)", sids)
            turns = await conn.fetchval("SELECT count(*) FROM utterances WHERE call_sid = ANY($1)", sids)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)

    # --- figures ---
    window = t1 - t0
    call_min = statistics.mean(live) * window / 60  # minutes of live call (slots being refilled excluded)
    sessions = [{"heard": asdict(s.heard), "said": asdict(s.said)} for s in model.all_sessions]
    problems = judge(calls, sessions)
    c2m_sent = sum(c["out"]["sent"] for c in calls)
    c2m_recv = sum(s["heard"]["received"] for s in sessions)
    m2c_sent = sum(s["said"]["sent"] for s in sessions)
    m2c_recv = sum(c["back"]["received"] for c in calls)
    ended = {}
    for r in rows:
        ended[(r["status"], r["ended_reason"])] = ended.get((r["status"], r["ended_reason"]), 0) + 1
    good_rows = ended.get(("ended", "customer-ended-call"), 0)
    span = min(60.0, window / 3)
    first = statistics.median(v for t, v in rss if t <= span)
    last = statistics.median(v for t, v in rss if t >= window - span)
    growth = last - first
    p50, p99, lag_n = lag_quantiles(scrape0, scrape1)
    p99 = min(p99, lag_max) if lag_max else p99  # interpolation inside a bucket may pass the largest seen
    total_cpu = (sum(sys1) - sum(sys0))
    busy = 1 - ((sys1.idle + sys1.iowait) - (sys0.idle + sys0.iowait)) / total_cpu if total_cpu else 0.0
    shim_pct, pg_pct = 100 * (cpu1 - cpu0) / window, 100 * (pg1 - pg0) / window
    gen_pct = [100 * (b - a) / window for a, b in zip(gen0, gen1)]
    other_pct = max(0.0, 100 * busy * (os.cpu_count() or 1) - shim_pct - pg_pct - sum(gen_pct))
    late99, late_max = lateness.quantile(0.99), lateness.max
    load_after = os.getloadavg()
    relayed_final = (metric(final, "shim_frames_relayed_total", direction="caller_to_model") or 0,
                     metric(final, "shim_frames_relayed_total", direction="model_to_caller") or 0)

    churn = f"each ~{args.call_seconds:g} s, then replaced" if args.call_seconds else "each for the whole soak"
    say(f"== {len(calls)} calls placed ({args.calls} at a time, {churn}); {window / 60:.1f} min steady; live calls "
        f"min {min(live)}, median {statistics.median(live):.0f} (a call's slot is empty while it is replaced)")
    say(f"   caller -> model: {c2m_sent:,} frames sent, {c2m_recv:,} received by the model "
        f"(lost {c2m_sent - c2m_recv:,})")
    say(f"   model -> caller: {m2c_sent:,} frames sent, {m2c_recv:,} heard by the callers "
        f"({m2c_sent - m2c_recv:,} not heard: sent after the call hung up, or lost)")
    say(f"   the shim counted {relayed_final[0]:,.0f} caller frames and {relayed_final[1]:,.0f} model frames relayed, "
        f"{metric(final, 'shim_barge_ins_total') or 0:,.0f} barge-ins (the callers never talk over the answer), "
        f"{metric(final, 'shim_model_errors_total') or 0:,.0f} model errors")
    errors = sum(bool(c["error"]) for c in calls)
    early = sum(c["closed_early"] for c in calls)
    say(f"   calls with a problem: {len(problems)} (streams refused or not opened in 15 s: {errors}; "
        f"closed by the shim before the caller hung up: {early})")
    for sid, p in list(problems.items())[:10]:
        say(f"     {sid}: {'; '.join(p)}")
    say(f"   Postgres: {len(rows)} of {len(calls)} call rows; status/ended_reason {dict(ended)}; {turns:,} utterances")
    say(f"   shim RSS: {rss_idle:.1f} MiB idle; {first:.1f} MiB in the first {span:.0f} s, {last:.1f} MiB in the "
        f"last {span:.0f} s ({growth:+.1f} MiB); {(last - rss_idle) / args.calls:.3f} MiB per call over idle")
    say(f"   event-loop lag (shim_event_loop_lag_seconds, {lag_n:,} samples): p50 {p50 * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms, max {lag_max * 1000:.1f} ms; /metrics unanswered in 10 s: {failed_scrapes} "
        f"times; the loop's thread waited for a CPU {wait1 - wait0:.1f} s of the {window:.0f} s "
        f"({100 * (wait1 - wait0) / window:.0f}%: the machine's load, not the shim's work)")
    say(f"   shim CPU: {(cpu1 - cpu0) / call_min:.3f} CPU-s per call-minute ({shim_pct:.0f}% of a core); "
        f"embedded Postgres +{(pg1 - pg0) / call_min:.3f} ({pg_pct:.0f}%)")
    say(f"   load generator: frames sent late p99 {late99 * 1000:.0f} ms, max {late_max * 1000:.0f} ms; CPU "
        f"{' + '.join(f'{p:.0f}%' for p in gen_pct)} of a core (callers..., model); other processes "
        f"{other_pct:.0f}% of a core; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    checks[f"every frame each way arrived, in order, at its own call ({len(calls)} calls)"] = \
        not problems and len(calls) >= args.calls
    checks["no call dropped by the shim (every call ended when its caller hung up)"] = \
        not any(c["closed_early"] or c["error"] for c in calls)
    checks["every call row in Postgres, ended customer-ended-call"] = good_rows == len(calls) == len(rows)
    checks[f"RSS flat: {growth:+.1f} MiB from the first to the last {span:.0f} s"] = \
        growth <= max(10.0, 0.10 * first)
    checks["the load generator kept up (sent late p99 <= 20 ms): the figures are the shim's"] = late99 <= 0.020
    checks[f"the machine left the shim its CPU (its loop waited for a core {100 * (wait1 - wait0) / window:.0f}% "
           f"of the time, <= 10%): the figures are the shim's"] = (wait1 - wait0) <= 0.10 * window
    checks["event-loop lag metric sampled, /metrics answered"] = lag_n > 0 and not failed_scrapes
    checks["shim serve stopped cleanly"] = code_ok
    return report(checks)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="concurrent calls (default 200)")
    parser.add_argument("--call-seconds", type=float, default=90.0,
                        help="mean call length: a call that ends is replaced by a new one (default 90; 0 = calls "
                             "last the whole soak)")
    parser.add_argument("--minutes", type=float, default=10.0, help="steady soak once all calls are live (default 10)")
    parser.add_argument("--ramp", type=float, help="seconds over which calls start (default calls/20, at least 1)")
    parser.add_argument("--generators", type=int, help="caller processes (default: one per 100 calls)")
    parser.add_argument("--cycle", type=float, default=6.0, help="seconds per assistant + caller turn (default 6)")
    parser.add_argument("--talk", type=float, default=3.0, help="seconds the assistant talks per cycle (default 3)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS / lag samples (default 10)")
    parser.add_argument("--database-url", default="", help="an existing Postgres (default: embedded, fresh)")
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument("--callers-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.callers_child:
        return args
    if not 1 <= args.calls <= 2000:
        parser.error(f"--calls: expected 1..2000, got {args.calls}")
    if args.call_seconds and args.calls * (args.minutes * 60 / (args.call_seconds * 0.5) + 2) > MAX_CALLS:
        parser.error(f"--call-seconds {args.call_seconds:g}: too many calls for one run (at most {MAX_CALLS})")
    if args.minutes <= 0:
        parser.error(f"--minutes: expected > 0, got {args.minutes}")
    if not 0 < args.talk <= args.cycle - 2:
        parser.error("--talk must be positive and at least 2 s shorter than --cycle (the caller hangs up in between)")
    args.ramp = max(1.0, args.calls / 20) if args.ramp is None else args.ramp
    args.generators = args.generators or math.ceil(args.calls / 100)
    if not 1 <= args.generators <= args.calls:
        parser.error(f"--generators: expected 1..{args.calls}, got {args.generators}")
    return args


if __name__ == "__main__":
    import uvloop

    args = parse()
    if args.callers_child:
        uvloop.run(callers_child(json.loads(args.callers_child)))
        sys.exit(0)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run_drill(lambda: main(args))
