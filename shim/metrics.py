"""Prometheus metrics. Per-frame counts live on each call and are summed at scrape time, so the
audio path pays one integer increment per frame instead of a locked counter update."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        self.calls_total = Counter("shim_calls", "Calls handled, by how they ended", ["ended_reason"], registry=self.registry)
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
            multiprocess_mode="max",  # across worker processes, the worst loop is the figure
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
