"""Time to greeting: Twilio's `/twilio/voice` request -> the first greeting audio byte Twilio
receives, with the model session pre-warmed from the webhook (SHIM_PREWARM=1) and without
(SHIM_PREWARM=0), measured in the same run.

Two `shim serve` subprocesses (one per setting, as bench_relay.py starts them: embedded
PostgreSQL, the demo assistant, nothing leaving 127.0.0.1) share one Realtime stand-in
(shim/testing/fake_realtime.py) with an injected network delay: `--rtt-ms` per round trip, the
opening handshake costing `--handshake-rtts` of them (TCP, TLS 1.3, HTTP upgrade). Each call is
what Twilio does: the signed voice webhook, then, `--stream-delay-ms` (uniform in the range) after
the TwiML answer, the media stream's WebSocket and its `start`. Calls run one at a time,
alternating between the two servers (A B B A ...: both see the same load and the same stream
delays).

    .venv/bin/python scripts/bench_greeting.py --calls 30 --rtt-ms 150 --stream-delay-ms 100-300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from xml.etree import ElementTree

import httpx

from shim.testing._serve import free_port
from shim.testing.fake_realtime import FakeRealtime, Script
from shim.twilio_peer import TwilioCaller, incoming_call_params, post_twilio_webhook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_relay import AUTH_TOKEN, REPO, Server, http_ok, stop_server, tail  # noqa: E402

CALLER, SHIM_NUMBER = "+15550001111", "+15550002222"


async def start_shim(model_url: str, tag: str, prewarm: bool) -> tuple[Server, str]:
    data_dir = REPO / ".shim" / f"bench-greeting-{tag}"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(
        os.environ,
        OPENAI_API_KEY="sk-bench-not-a-real-key",
        OPENAI_REALTIME_URL=model_url,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        PUBLIC_URL=f"http://127.0.0.1:{port}",
        SHIM_DATA_DIR=str(data_dir),
        SHIM_ASSISTANTS_DIR=str(REPO / "assistants"),
        SHIM_DEFAULT_ASSISTANT="demo",
        SHIM_LOG_LEVEL="warning",
        SHIM_DRAIN_TIMEOUT="5",
        SHIM_PREWARM="1" if prewarm else "0",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",  # post-call analysis: nowhere (nothing leaves the host)
    )
    for name in ("DATABASE_URL", "TWILIO_ACCOUNT_SID", "TWILIO_API_BASE", "PUBLIC_MEDIA_URL"):
        env.pop(name, None)
    log_path = data_dir / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shim.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"ws://127.0.0.1:{port}/twilio/media", log_path)
    deadline = asyncio.get_running_loop().time() + 90
    while not await http_ok(port, "/healthz"):
        if proc.poll() is not None or asyncio.get_running_loop().time() > deadline:
            await stop_server(server)
            raise RuntimeError(f"shim serve did not start; see {log_path}:\n{tail(log_path)}")
        await asyncio.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


async def one_call(http: httpx.AsyncClient, base: str, stream_delay_s: float) -> float:
    """Seconds from sending /twilio/voice to the first greeting audio byte at Twilio's end."""
    loop = asyncio.get_running_loop()
    call_sid = f"CA{uuid.uuid4().hex}"
    t0 = loop.time()
    answer = await post_twilio_webhook(http, f"{base}/twilio/voice",
                                       incoming_call_params(call_sid, CALLER, SHIM_NUMBER, "AC" + "0" * 32), AUTH_TOKEN)
    answer.raise_for_status()
    stream = ElementTree.fromstring(answer.text).find("./Connect/Stream")
    if stream is None:
        raise RuntimeError(f"no <Stream> in the answer: {answer.text[:300]}")
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    await asyncio.sleep(stream_delay_s)  # Twilio sets up the stream
    caller = TwilioCaller(stream.attrib["url"], AUTH_TOKEN, custom_parameters=params, call_sid=call_sid)
    await caller.connect()
    try:
        await caller.wait_for_audio(1, timeout=15)
        return caller.audio_arrivals[0][0] - t0
    finally:
        await caller.stop()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": statistics.median(ordered), "p99": q[98], "mean": statistics.fmean(ordered),
            "min": ordered[0], "max": ordered[-1]}


async def main(args: argparse.Namespace) -> int:
    lo, hi = (float(x) / 1000 for x in args.stream_delay_ms.split("-", 1)) if "-" in args.stream_delay_ms else \
        (float(args.stream_delay_ms) / 1000,) * 2
    rng = random.Random(args.seed)
    script = Script(network_delay_ms=args.rtt_ms, handshake_round_trips=args.handshake_rtts)
    async with FakeRealtime(script) as fake:
        servers = await asyncio.gather(start_shim(fake.url, "off", False), start_shim(fake.url, "on", True))
        results: dict[str, list[float]] = {"off": [], "on": []}
        try:
            async with httpx.AsyncClient(timeout=15) as http:
                for _ in range(2):  # warm-up: imports, first assistant load, database connections
                    for _, base in servers:
                        await one_call(http, base, lo)
                await asyncio.sleep(0.5)
                for i in range(args.calls):
                    delay = rng.uniform(lo, hi)
                    order = [("off", servers[0][1]), ("on", servers[1][1])]
                    for tag, base in order if i % 2 == 0 else order[::-1]:
                        results[tag].append(await one_call(http, base, delay))
                        await asyncio.sleep(args.pause_ms / 1000)  # the last call's teardown settles
                metrics = (await http.get(f"{servers[1][1]}/metrics")).text
                outcomes = {line.split('"')[1]: int(float(line.rsplit(" ", 1)[1]))
                            for line in metrics.splitlines() if line.startswith("shim_prewarm_total{")}
        finally:
            await asyncio.gather(*(stop_server(server) for server, _ in servers))
    off, on = summary(results["off"]), summary(results["on"])
    print(f"time to greeting, /twilio/voice -> first greeting byte at Twilio; {args.calls} calls each, "
          f"model round trip {args.rtt_ms:g} ms (handshake {args.handshake_rtts} round trips), "
          f"stream opened {args.stream_delay_ms} ms after the TwiML")
    print(f"{'':14}{'p50':>8}{'p99':>8}{'mean':>8}{'min':>8}{'max':>8}   (ms)")
    for name, s in (("SHIM_PREWARM=0", off), ("SHIM_PREWARM=1", on)):
        print(f"{name:14}" + "".join(f"{s[k] * 1000:8.0f}" for k in ("p50", "p99", "mean", "min", "max")))
    print(f"pre-warm / fresh: p50 {on['p50'] / off['p50']:.2f}, p99 {on['p99'] / off['p99']:.2f}; "
          f"saved at p50: {(off['p50'] - on['p50']) * 1000:.0f} ms")
    print(f"SHIM_PREWARM=1 sessions (warm-up included): {outcomes}")
    if fake.validation_errors:
        print(f"stand-in validation errors: {fake.validation_errors[:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="calls per setting (default 30)")
    parser.add_argument("--rtt-ms", type=float, default=150, help="model network round trip, ms (default 150)")
    parser.add_argument("--handshake-rtts", type=int, default=3, help="round trips to open the model socket (default 3)")
    parser.add_argument("--stream-delay-ms", default="100-300",
                        help="TwiML answer -> Twilio opens the stream, ms or a range lo-hi (default 100-300)")
    parser.add_argument("--pause-ms", type=float, default=300, help="pause between calls, ms (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    sys.exit(asyncio.run(main(parser.parse_args())))
