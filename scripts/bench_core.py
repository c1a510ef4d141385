"""CPU cost of the call core alone (no sockets): how long shim.call.Call takes to turn one
Twilio media frame into an input_audio_buffer.append, and one 100 ms model delta into a Twilio
media + mark. Usage: .venv/bin/python scripts/bench_core.py. Figures go in the README."""

from __future__ import annotations

import base64
import logging
import time
import timeit

import orjson
import structlog

from shim.assistant import CallContext
from shim.call import Call
from shim.translate import translate
from shim.twilio_media import valid_payload


class NoRows:
    def upsert(self, table, row, *, keep_existing=()):
        pass

    def insert(self, table, row):
        pass


def live_call(background: str) -> Call:
    call = Call(NoRows(), log=structlog.get_logger())
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
    return call


def per_op(fn, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    frame = orjson.dumps({"event": "media", "sequenceNumber": "3", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20", "payload": base64.b64encode(b"\xff" * 160).decode()}})
    delta = orjson.dumps({"type": "response.output_audio.delta", "response_id": "r1", "item_id": "i1",
                          "output_index": 0, "content_index": 0, "delta": base64.b64encode(b"\x10" * 800).decode()})
    print("| path | µs per event | CPU-s per call-minute (50 frames/s in, 10 deltas/s out, assistant talking half the time) |")
    print("|---|---|---|")
    for background in ("off", "office"):
        call = live_call(background)

        def caller_frame():
            call.on_twilio_text(frame)
            call.backend.out.clear()

        call.on_model_text(b'{"type":"response.created","response":{"id":"r1"}}')

        def model_delta():
            call.on_model_text(delta)
            call.twilio_out.clear()
            call._playback.clear(0.0)  # Twilio would echo the marks

        t_in = per_op(caller_frame, 100_000)
        t_out = per_op(model_delta, 50_000)
        per_minute = 60 * (50 * t_in + 0.5 * 10 * t_out)
        print(f"| caller frame → append (background {background}) | {t_in * 1e6:.2f} | |")
        print(f"| model delta → media + mark (background {background}) | {t_out * 1e6:.2f} | {per_minute:.4f} |")
    payload = base64.b64encode(b"\xff" * 160).decode()  # one 20 ms frame
    check = min(timeit.repeat(lambda: valid_payload(payload), number=50_000, repeat=20)) / 50_000
    empty = min(timeit.repeat(lambda: None, number=50_000, repeat=20)) / 50_000
    print(f"| of which: media payload check (base64 alphabet + length, best of 20 x 50k) | {(check - empty) * 1e6:.2f} | |")


if __name__ == "__main__":
    main()
