"""Prometheus metrics. Per-frame counts live on each call and are summed at scrape time, so the
audio path pays one integer increment per frame instead of a locked counter update."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .prewarm import OUTCOMES as PREWARM_OUTCOMES


class ShimMetrics:
    def __init__(self, live_calls: Callable[[], Iterable]):
        self.registry = CollectorRegistry()
        self._live_calls = live_calls
        self._finished_frames_in = 0
        self._finished_frames_out = 0
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
        self.calls_total.labels(call.end.reason if call.end else "unknown").inc()

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
        yield active
        yield frames
