"""CPU cost of the call core alone (no sockets): how long shim.call.Call takes to turn one
Twilio media frame into an input_audio_buffer.append, and one 100 ms model delta into a Twilio
media + mark; then the same events through the shim's picows listeners (shim.bridge: parse,
core, pump, send) next to the bare relay's listener of scripts/bench_relay.py, both on fake
transports (real picows frames, a C no-op for send), so the ratio is the Python each adds on
top of the sockets. Usage: .venv/bin/python scripts/bench_core.py [--quick]. Figures go in the README."""

from __future__ import annotations

import base64
import itertools
import logging
import sys
import time
import timeit
from types import SimpleNamespace

import orjson
import structlog
from picows import WSMsgType
from picows.picows import _make_test_ws_frame  # type: ignore[attr-defined]

from shim.assistant import CallContext
from shim.bridge import CallRunner, ModelListener, PicowsTwilioSink, TwilioListener
from shim.call import Call
from shim.translate import translate
from shim.twilio_media import valid_payload

TEXT = WSMsgType.TEXT


class NoRows:
    def upsert(self, table, row, *, keep_existing=()):
        pass

    def insert(self, table, row):
        pass


def live_call(background: str, call: Call | None = None) -> Call:
    call = call or Call(NoRows(), log=structlog.get_logger())
    call.on_twilio_text(orjson.dumps({"event": "start", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1",
        "customParameters": {"assistant": "x", "from": "+15550001111", "to": "+15550002222"}}}))
    assistant = {"model": {"messages": [{"role": "system", "content": "Be brief."}]}, "backgroundSound": background}
    call.on_setup(translate("x", assistant, CallContext(call_sid="CA1"), model="gpt-realtime-2.1"))
    call.on_model_text(b'{"type":"session.updated","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}},'
                       b'"output":{"format":{"type":"audio/pcmu"}}}}}')
    if background != "off":
        from shim.background import BackgroundMixer, load_office_ambience

        call.on_background_ready(BackgroundMixer(load_office_ambience()))
    call.take_model_out()
    call.take_effects()
    return call


def per_op(fn, n: int, repeat: int = 5) -> float:
    """Best of `repeat` runs of n calls (the machine may be shared: the minimum is the cost)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - started) / n)
    return best


def fake_transport():
    # send(kind, data) as a C call that keeps nothing growing: the cost measured is the caller's
    return SimpleNamespace(send={}.setdefault, is_disconnected=False)


# --- the bare relay's listeners, as in scripts/bench_relay.py serve_bare (same lines) ---------


class BareModelSide:
    def __init__(self, relay):
        self.relay = relay

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == TEXT:
            event = orjson.loads(frame.get_payload_as_bytes())
            kind = event.get("type")
            if kind == "response.output_audio.delta":
                self.relay.to_twilio(event["delta"])


class BareRelay:
    def __init__(self):
        self.twilio = self.model = None
        self.sid, self.marks = "MZ1", 0

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == TEXT:
            msg = orjson.loads(frame.get_payload_as_bytes())
            event = msg.get("event")
            if event == "media":
                if self.model is not None:
                    self.model.send(TEXT, ('{"type":"input_audio_buffer.append","audio":"'
                                           + msg["media"]["payload"] + '"}').encode())

    def to_twilio(self, delta: str):
        self.marks += 1
        head = '{"event":"%s","streamSid":"' + self.sid + '",'
        self.twilio.send(TEXT, ((head % "media") + '"media":{"payload":"' + delta + '"}}').encode())
        self.twilio.send(TEXT, ((head % "mark") + '"mark":{"name":"' + str(self.marks) + '"}}').encode())


def shim_listeners(background: str) -> tuple[TwilioListener, ModelListener, CallRunner]:
    state = SimpleNamespace(records=NoRows(), metrics=None, admit_start=None, runners=set())
    twilio_listener = TwilioListener(state)
    twilio_listener.on_ws_connected(fake_transport())
    runner = twilio_listener.runner
    live_call(background, runner.call)
    runner.model = fake_transport()
    return twilio_listener, ModelListener(runner), runner


def main() -> None:
    quick = "--quick" in sys.argv
    n_in, n_out = (20_000, 10_000) if quick else (100_000, 50_000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    payload = base64.b64encode(b"\xff" * 160).decode()
    # Twilio's shape and key order, its stream clock advancing 20 ms a frame (a cycle of 2,000)
    frames = [('{"event":"media","sequenceNumber":"' + str(i + 2) + '","media":{"track":"inbound","chunk":"' + str(i + 1)
               + '","timestamp":"' + str(20 * i) + '","payload":"' + payload + '"},"streamSid":"MZ1"}').encode()
              for i in range(2000)]
    delta = orjson.dumps({"type": "response.output_audio.delta", "event_id": "event_1", "response_id": "r1",
                          "item_id": "i1", "output_index": 0, "content_index": 0,
                          "delta": base64.b64encode(b"\x10" * 800).decode()})
    print("| path | µs per event | CPU-s per call-minute (50 frames/s in, 10 deltas/s out, assistant talking half the time) |")
    print("|---|---|---|")
    for background in ("off", "office"):
        call = live_call(background)
        next_frame = itertools.cycle(frames).__next__

        def caller_frame():
            call.on_twilio_text(next_frame())
            call.backend.out.clear()

        call.on_model_text(b'{"type":"response.created","response":{"id":"r1"}}')

        def model_delta():
            call.on_model_text(delta)
            call.twilio_out.clear()
            call._playback.clear(0.0)  # Twilio would echo the marks

        t_in = per_op(caller_frame, n_in)
        t_out = per_op(model_delta, n_out)
        per_minute = 60 * (50 * t_in + 0.5 * 10 * t_out)
        print(f"| caller frame → append (background {background}) | {t_in * 1e6:.2f} | |")
        print(f"| model delta → media + mark (background {background}) | {t_out * 1e6:.2f} | {per_minute:.4f} |")
    check = min(timeit.repeat(lambda: valid_payload(payload), number=50_000, repeat=20)) / 50_000
    empty = min(timeit.repeat(lambda: None, number=50_000, repeat=20)) / 50_000
    print(f"| of which: media payload check (base64 alphabet + length, best of 20 x 50k) | {(check - empty) * 1e6:.2f} | |")

    # Through the picows listeners: what a socket callback costs in Python, shim vs bare relay.
    print()
    print("| through the picows listeners (fake transports) | shim µs | bare relay µs | shim / bare |")
    print("|---|---:|---:|---:|")
    twilio, model, runner = shim_listeners("office")
    model_t = fake_transport()
    runner.call.on_model_text(b'{"type":"response.created","response":{"id":"r1"}}')
    bare = BareRelay()
    bare.model, bare.twilio = fake_transport(), fake_transport()
    bare_model = BareModelSide(bare)
    next_shim = itertools.cycle([_make_test_ws_frame(TEXT, f, True, False) for f in frames]).__next__
    next_bare = itertools.cycle([_make_test_ws_frame(TEXT, f, True, False) for f in frames]).__next__
    delta_frame = _make_test_ws_frame(TEXT, delta, True, False)

    def shim_mark():
        # the echo of the mark just sent (found by name), so the bookkeeping is the real one
        name = str(runner.call._playback._counter)
        twilio.on_ws_frame(None, _make_test_ws_frame(TEXT, (
            '{"event":"mark","sequenceNumber":"9","streamSid":"MZ1","mark":{"name":"' + name + '"}}').encode(), True, False))

    def shim_delta():
        model.on_ws_frame(model_t, delta_frame)
        shim_mark()

    def bare_delta():
        bare_model.on_ws_frame(model_t, delta_frame)
        bare.on_ws_frame(None, _make_test_ws_frame(TEXT, (
            '{"event":"mark","sequenceNumber":"9","streamSid":"MZ1","mark":{"name":"' + str(bare.marks) + '"}}').encode(),
            True, False))

    rows = []
    for name, shim_fn, bare_fn, n in (
        ("caller frame → input_audio_buffer.append", lambda: twilio.on_ws_frame(None, next_shim()),
         lambda: bare.on_ws_frame(None, next_bare()), n_in),
        ("model delta → media + mark, and its echo (background office)", shim_delta, bare_delta, n_out),
    ):
        ts, tb = per_op(shim_fn, n), per_op(bare_fn, n)
        rows.append((ts, tb))
        print(f"| {name} | {ts * 1e6:.2f} | {tb * 1e6:.2f} | {ts / tb:.2f} |")
    (si, bi), (so, bo) = rows
    shim_min, bare_min = 60 * (50 * si + 5 * so), 60 * (50 * bi + 5 * bo)
    print(f"| CPU-s per call-minute in these callbacks | {shim_min:.4f} | {bare_min:.4f} | {shim_min / bare_min:.2f} |")
    assert runner.call.end is None and runner.call.frames_rejected == 0, "the bench call went wrong"


if __name__ == "__main__":
    main()
