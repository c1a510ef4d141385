"""Prometheus metrics: the Twilio frames rejected as malformed, and the event loop's lag."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import orjson
from prometheus_client.parser import text_string_to_metric_families

from shim.metrics import ShimMetrics

from .harness import running_shim


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def call(**counts: int) -> SimpleNamespace:
    return SimpleNamespace(**{"frames_in": 0, "frames_out": 0, "frames_rejected": 0, **counts},
                           end=SimpleNamespace(reason="customer-ended-call"))


def scrape(metrics: ShimMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_rejected_frames_are_summed_over_live_and_finished_calls():
    live = [call(frames_rejected=3), call(frames_rejected=0)]
    metrics = ShimMetrics(lambda: live)
    assert sample(scrape(metrics), "shim_twilio_frames_rejected_total") == 3
    done = live.pop(0)
    metrics.call_finished(done)  # a call that ends keeps its count in the total
    live.append(call(frames_rejected=4))
    assert sample(scrape(metrics), "shim_twilio_frames_rejected_total") == 7


async def test_the_rejected_frames_counter_equals_the_bad_frames_a_caller_sent(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn) as run:
        caller = await run.place_call()
        await run.fake.wait_for_session()
        await caller.send_silence(100)
        bad = [orjson.dumps({"event": "media", "streamSid": caller.stream_sid,
                             "media": {"track": "inbound", "timestamp": "40", "payload": "@@ not base64 @@"}})] * 5
        bad += [b"{not json", orjson.dumps({"event": "media", "streamSid": caller.stream_sid, "media": {}})]
        for frame in bad:
            await caller._ws.send(frame.decode(), text=True)
        await caller.send_silence(100)  # in order after the bad frames: they have all been parsed
        await asyncio.sleep(0.2)
        url = run.config.http_url("/metrics")
        live = sample((await run.http.get(url)).text, "shim_twilio_frames_rejected_total")
        await caller.stop()
        for _ in range(100):
            if not run.shim.bridge.runners:
                break
            await asyncio.sleep(0.05)
        ended = sample((await run.http.get(url)).text, "shim_twilio_frames_rejected_total")
    assert live == len(bad) == 7
    assert ended == len(bad)  # the finished call's count stays in the total


async def test_loop_lag_is_sampled_and_a_blocked_loop_shows():
    metrics = ShimMetrics(lambda: [])
    watcher = asyncio.create_task(metrics.watch_loop_lag(period=0.02))
    try:
        await asyncio.sleep(0.2)
        calm = scrape(metrics)
        time.sleep(0.3)  # a callback holding the loop, as a slow synchronous call would
        await asyncio.sleep(0.1)
        blocked = scrape(metrics)
    finally:
        watcher.cancel()
    assert sample(calm, "shim_event_loop_lag_seconds_count") >= 2
    assert sample(calm, "shim_event_loop_lag_max_seconds") < 0.25
    assert sample(blocked, "shim_event_loop_lag_max_seconds") >= 0.25
    # the blocked wake-up is in the histogram's tail, above 250 ms
    assert sample(blocked, "shim_event_loop_lag_seconds_bucket", le="0.25") < \
        sample(blocked, "shim_event_loop_lag_seconds_count")


def test_the_lag_max_is_over_the_last_window_and_then_forgets():
    metrics = ShimMetrics(lambda: [])
    metrics.loop_lag(0.5, now=0.0)
    metrics.loop_lag(0.001, now=5.0)
    assert sample(scrape(metrics), "shim_event_loop_lag_max_seconds") == 0.5
    metrics.loop_lag(0.002, now=12.0)  # a new window: the previous one's max is still shown
    assert sample(scrape(metrics), "shim_event_loop_lag_max_seconds") == 0.5
    metrics.loop_lag(0.003, now=23.0)  # two windows later the spike is gone
    assert sample(scrape(metrics), "shim_event_loop_lag_max_seconds") == 0.003
    metrics.loop_lag(-0.0001, now=23.1)  # a timer that fired a hair early is no lag
    assert sample(scrape(metrics), "shim_event_loop_lag_seconds_bucket", le="0.0005") >= 1


async def test_serve_runs_the_lag_monitor_and_stops_it_on_shutdown(tmp_path, db_dsn):
    async with running_shim(tmp_path, db_dsn) as run:
        for _ in range(100):  # until the monitor has sampled twice (bounded; a busy machine is slower)
            text = (await run.http.get(run.config.http_url("/metrics"))).text
            if sample(text, "shim_event_loop_lag_seconds_count") >= 2:
                break
            await asyncio.sleep(0.1)
        monitor = run.shim.lag_monitor
        assert monitor is not None and not monitor.done()
    assert sample(text, "shim_event_loop_lag_seconds_count") >= 2
    assert monitor.done()  # the task ends with the server
