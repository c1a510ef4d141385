"""Prometheus metrics. Per-frame counts live on each call and are summed at scrape time, so the
audio path pays one integer increment per frame instead of a locked counter update."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .prewarm import OUTCOMES as PREWARM_OUTCOMES

log = structlog.get_logger("shim.metrics")

LAG_PERIOD_S = 0.1  # the lag monitor's sleep
LAG_WINDOW_S = 10.0  # shim_event_loop_lag_max_seconds: the max over the last one to two windows


class ShimMetrics:
    def __init__(self, live_calls: Callable[[], Iterable]):
        self.registry = CollectorRegistry()
        self._live_calls = live_calls
        self._finished_frames_in = 0
        self._finished_frames_out = 0
        self._finished_frames_rejected = 0
        self._barge_ins = Counter("shim_barge_ins", "Caller interruptions of the assistant", registry=self.registry)
        self._model_errors = Counter(
            "shim_model_errors", "Realtime model errors, failed responses and lost sockets", registry=self.registry
        )
        self._turn_latency = Histogram(
            "shim_turn_latency_seconds",
            "Caller end of speech to the first assistant audio byte sent to Twilio",
            buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0),
            registry=self.registry,
        )
        self._prewarm = Counter(
            "shim_prewarm", "Model sessions opened from /twilio/voice: adopted by their call, expired or failed; "
            "missed = a call's first model connect that found none on this process", ["outcome"], registry=self.registry,
        )
        for outcome in PREWARM_OUTCOMES:  # every series exists from the start
            self._prewarm.labels(outcome)
        self.calls_total = Counter("shim_calls", "Calls handled, by how they ended", ["ended_reason"], registry=self.registry)
        self._model_sessions = Counter(
            "shim_model_sessions_replaced",
            "Model sessions replaced mid-call: reconnected after a loss, rolled over before the time limit, or "
            "abandoned (the caller heard the apology)", ["outcome"], registry=self.registry)
        # Every call of a process shares one event loop: a callback that holds it delays every
        # frame of every call, so its lag is the first figure to look at under load.
        self._loop_lag = Histogram(
            "shim_event_loop_lag_seconds",
            f"How late the event loop woke a {LAG_PERIOD_S * 1000:.0f} ms sleep (sampled continuously)",
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                     0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self._loop_lag_max = Gauge(
            "shim_event_loop_lag_max_seconds",
            f"The largest event-loop lag seen in the last {LAG_WINDOW_S:.0f}-{2 * LAG_WINDOW_S:.0f} s",
            registry=self.registry,
        )
        self._lag_window_max = 0.0  # the current window's max
        self._lag_previous_max = 0.0  # the last complete window's max
        self._lag_window_end: float | None = None
        self.registry.register(self)

    # Call-side hooks (see shim.call.Metrics)
    def barge_in(self) -> None:
        self._barge_ins.inc()

    def model_error(self) -> None:
        self._model_errors.inc()

    def turn_latency(self, seconds: float) -> None:
        self._turn_latency.observe(seconds)

    def model_session(self, outcome: str) -> None:
        self._model_sessions.labels(outcome).inc()

    def prewarm(self, outcome: str) -> None:
        self._prewarm.labels(outcome).inc()

    def call_finished(self, call) -> None:
        self._finished_frames_in += call.frames_in
        self._finished_frames_out += call.frames_out
        self._finished_frames_rejected += call.frames_rejected
        self.calls_total.labels(call.end.reason if call.end else "unknown").inc()

    # Event-loop lag
    def loop_lag(self, lag: float, now: float) -> None:
        """One lag sample (seconds late) taken at `now` (a monotonic clock)."""
        lag = max(lag, 0.0)
        self._loop_lag.observe(lag)
        if self._lag_window_end is None:
            self._lag_window_end = now + LAG_WINDOW_S
        elif now >= self._lag_window_end:
            # a window with no sample at all (the loop was blocked through it) counts as empty
            stale = now >= self._lag_window_end + LAG_WINDOW_S
            self._lag_previous_max = 0.0 if stale else self._lag_window_max
            self._lag_window_max = 0.0
            self._lag_window_end = now + LAG_WINDOW_S
        self._lag_window_max = max(self._lag_window_max, lag)
        self._loop_lag_max.set(max(self._lag_window_max, self._lag_previous_max))

    async def watch_loop_lag(self, period: float = LAG_PERIOD_S) -> None:
        """Runs for the life of the process (Shim.startup/shutdown): sleep `period`, record the
        overshoot. One timer wake-up per 100 ms: nothing next to the calls' own work."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            now = loop.time()
            self.loop_lag(now - due, now)

    # Custom collector: values summed over live calls at scrape time.
    def describe(self):
        return []

    def collect(self):
        calls = list(self._live_calls())
        active = GaugeMetricFamily("shim_active_calls", "Calls with an open media stream")
        active.add_metric([], len(calls))
        frames = CounterMetricFamily("shim_frames_relayed", "Audio frames relayed", labels=["direction"])
        frames.add_metric(["caller_to_model"], self._finished_frames_in + sum(c.frames_in for c in calls))
        frames.add_metric(["model_to_caller"], self._finished_frames_out + sum(c.frames_out for c in calls))
        rejected = CounterMetricFamily("shim_twilio_frames_rejected",
                                       "Twilio frames dropped as malformed (bad JSON or base64, a duplicate start...)")
        rejected.add_metric([], self._finished_frames_rejected + sum(c.frames_rejected for c in calls))
        yield active
        yield frames
        yield rejected


# --- `shim serve --workers N`: one answer for all workers ---------------------------------------
#
# Each worker writes its whole registry's text (every metric, custom collectors included, so
# metrics added later are covered without registering anything) to the run directory every
# SNAPSHOT_S; whichever worker answers a scrape writes its own first, then sums all of them:
# counters and histograms sample by sample, gauges over live workers (live calls: the sum). A
# worker that exits leaves its file, renamed `retired.*` by the parent, whose counters and
# histograms keep counting (the totals never go down, so Prometheus sees no reset) and whose
# gauges are dropped. Gauges whose sum means nothing are named in PER_WORKER_GAUGES and kept
# per worker with a `worker` label. Nothing on the audio path: the per-frame counts stay plain
# integers on each call.

SNAPSHOT_S = 1.0
PER_WORKER_GAUGES: set[str] = {"shim_event_loop_lag_max_seconds"}  # one series per worker, not a sum
_SUMMED_WHEN_RETIRED = ("counter", "histogram", "summary", "gaugehistogram")


def snapshot_path(run_dir: Path, index: int, pid: int) -> Path:
    return run_dir / f"metrics.w{index}.{pid}.prom"


def retire_snapshot(run_dir: Path, index: int, pid: int) -> None:
    """The worker exited: its counters go on counting in the totals, its gauges no more."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(snapshot_path(run_dir, index, pid), run_dir / f"retired.w{index}.{pid}.prom")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _snapshots(run_dir: Path, skip: Path) -> list[tuple[str, bool, bytes]]:
    """(worker index, live, text) of every snapshot but `skip`. A file renamed while being listed
    (a worker just retired) is read again under its new name."""
    for _attempt in range(5):
        found, vanished = [], False
        for path in sorted(run_dir.glob("*.prom")):
            if path == skip:
                continue
            kind, worker = path.name.split(".")[:2]
            try:
                found.append((worker.lstrip("w"), kind == "metrics", path.read_bytes()))
            except FileNotFoundError:
                vanished = True
        if not vanished:
            break
    return found


def merge_expositions(texts: list[tuple[str, bool, bytes]]) -> bytes:
    """One Prometheus text from several workers' (index, live, text): see the comment above."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple, float]]] = {}
    for worker, live, text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
            if (not live and family.type not in _SUMMED_WHEN_RETIRED) or family.name.endswith("_created"):
                continue  # (`_created`: a counter's creation time, which summing makes meaningless)
            per_worker = family.type in ("gauge", "unknown") and family.name in PER_WORKER_GAUGES
            _type, _doc, values = families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = {**sample.labels, "worker": worker} if per_worker else sample.labels
                key = (sample.name, tuple(labels.items()))
                if family.type in ("info", "stateset"):
                    values[key] = max(values.get(key, sample.value), sample.value)
                else:
                    values[key] = values.get(key, 0.0) + sample.value
    merged = []
    for name, (typ, doc, values) in families.items():
        if not values:
            continue
        metric = Metric(name, doc, typ)
        for (sample_name, labels), value in values.items():
            metric.add_sample(sample_name, dict(labels), value)
        merged.append(metric)

    class _Merged:
        def collect(self):
            return merged

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class WorkerMetrics:
    """A worker's side: publish its snapshot every SNAPSHOT_S, answer scrapes with the totals."""

    def __init__(self, registry: CollectorRegistry, run_dir: Path, index: int):
        self.registry = registry
        self.run_dir = run_dir
        self.index = index
        self.path = snapshot_path(run_dir, index, os.getpid())
        self._writing = asyncio.Lock()  # the ticker and a scrape: one writer, the newest text last

    async def publish(self) -> bytes:
        async with self._writing:
            text = generate_latest(self.registry)  # on the loop: the live calls' counters are read here
            await asyncio.to_thread(_write_atomic, self.path, text)
        return text

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except OSError as exc:  # the run directory is gone (the parent is exiting)
                log.warning("metrics_snapshot_not_written", path=str(self.path), error=str(exc))
            await asyncio.sleep(SNAPSHOT_S)

    async def exposition(self) -> bytes:
        own = await self.publish()  # what this answer counts is on disk before it is sent
        others = await asyncio.to_thread(_snapshots, self.run_dir, self.path)
        return await asyncio.to_thread(merge_expositions, [(str(self.index), True, own), *others])
