"""The fast paths (shim.twilio_media.parse_media_fast, parse_mark_fast) against the full parser:
whatever a fast path accepts, `parse` accepts with the same result; a fast path never accepts what
`parse` rejects; and Twilio's own frame shapes do take them (else they would be dead code)."""

from __future__ import annotations

import base64

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim import twilio_media as tw
from shim.call import Call
from tests.test_call import Rows  # the recording RecordSink the call tests share

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# near-misses: JSON escapes and structure, padding, non-ASCII digits and letters, controls
ODD = '="\\ \t\n\x00\x1f{}[],:\u00e9\u0661\uff10-.eE'
digits = st.text("0123456789", min_size=0, max_size=22)
fields = st.one_of(digits, st.text(B64 + ODD, max_size=12))
payloads = st.one_of(
    st.binary(min_size=0, max_size=400).map(lambda b: base64.b64encode(b).decode()),
    st.text(B64 + "=", max_size=40),
    st.text(B64 + ODD, max_size=40),
)


def twilio_frame(seq: str, track: str, chunk: str, ts: str, payload: str, sid: str) -> bytes:
    """A media frame spelled exactly as Twilio writes it (fields pasted unescaped, on purpose)."""
    return ('{"event":"media","sequenceNumber":"' + seq + '","media":{"track":"' + track + '","chunk":"' + chunk
            + '","timestamp":"' + ts + '","payload":"' + payload + '"},"streamSid":"' + sid + '"}').encode()


def agrees(data: bytes) -> bool:
    """The media fast path's answer, checked against `parse`; True when it took the frame."""
    fast = tw.parse_media_fast(data)
    if fast is None:
        return False
    assert tw.parse(data) == tw.Media(*fast), data  # would raise ProtocolError if parse rejected it
    return True


def mark_agrees(data: bytes) -> bool:
    fast = tw.parse_mark_fast(data)
    if fast is None:
        return False
    assert tw.parse(data) == tw.Mark(fast), data
    return True


def mark_frame(seq: str, sid: str, name: str) -> bytes:
    return ('{"event":"mark","sequenceNumber":"' + seq + '","streamSid":"' + sid + '","mark":{"name":"' + name
            + '"}}').encode()


@given(seq=fields, sid=st.sampled_from(["MZ" + "a1" * 16, ""]) | fields, name=fields)
@FUZZ
def test_mark_fast_path_accepts_only_what_parse_accepts_and_agrees(seq, sid, name) -> None:
    mark_agrees(mark_frame(seq, sid, name))


@given(st.integers(1, 10**20 - 1))
@FUZZ
def test_twilio_mark_echo_takes_the_fast_path(n: int) -> None:
    assert mark_agrees(mark_frame("9", "MZ" + "0" * 32, str(n)))
    assert tw.parse_mark_fast(mark_frame("9", "MZ1", str(n))) == str(n)
    assert tw.parse_mark_fast(mark_frame("9", "MZ1", "goodbye")) is None  # not ours: parse() takes it


@given(seq=fields, track=st.sampled_from(["inbound", "outbound", "", "In", "x" * 17]) | fields, chunk=fields,
       ts=fields, payload=payloads, sid=st.sampled_from(["MZ" + "a1" * 16, "", "MZ-1"]) | fields)
@FUZZ
def test_fast_path_accepts_only_what_parse_accepts_and_agrees(seq, track, chunk, ts, payload, sid) -> None:
    agrees(twilio_frame(seq, track, chunk, ts, payload, sid))


@given(st.binary(max_size=400))
@FUZZ
def test_fast_path_on_arbitrary_bytes(data: bytes) -> None:
    agrees(data)
    mark_agrees(data)
    mark_agrees(b'{"event":"mark","sequenceNumber":"1","streamSid":"MZ1","mark":{"name":"' + data + b'"}}')
    agrees(b'{"event":"media","sequenceNumber":"1","media":{"track":"inbound","chunk":"1","timestamp":"0",'
           b'"payload":"' + data + b'"},"streamSid":"MZ1"}')


@given(st.binary(min_size=1, max_size=tw.MAX_MEDIA_PAYLOAD_CHARS * 3 // 4), st.integers(0, 10**15 - 1))
@FUZZ
def test_twilio_shape_takes_the_fast_path(audio: bytes, ts: int) -> None:
    payload = base64.b64encode(audio).decode()
    assert agrees(twilio_frame("12", "inbound", "7", str(ts), payload, "MZ" + "0" * 32))
    assert tw.parse_media_fast(twilio_frame("12", "inbound", "7", str(ts), payload, "MZ1")) == (payload, ts)


def test_other_spellings_fall_back_to_the_parser() -> None:
    payload = base64.b64encode(b"\xff" * 160).decode()
    canonical = twilio_frame("2", "inbound", "1", "20", payload, "MZ1")
    assert tw.parse_media_fast(canonical) == (payload, 20)
    others = [
        orjson.dumps(orjson.loads(canonical), option=orjson.OPT_SORT_KEYS),  # another key order
        canonical.replace(b'","', b'", "'),  # whitespace
        canonical.replace(b"/", b"\\/"),  # a JSON escape inside the payload
        twilio_frame("2", "inbound", "1", "", payload, "MZ1"),  # empty timestamp: parse says 0
    ]
    for data in others:
        assert tw.parse_media_fast(data) is None
        assert tw.parse(data) == tw.Media(payload, 0 if b'"timestamp":""' in data else 20)
    for bad in (payload[:-1], payload + "====", payload[:100] + '\\"' + payload[102:], "a" * 12_000, ""):
        data = twilio_frame("2", "inbound", "1", "20", bad, "MZ1")
        assert tw.parse_media_fast(data) is None  # rejected by parse, with the field named


def test_a_frame_is_relayed_the_same_by_either_path() -> None:
    """The call core gets the same (payload, timestamp) from the fast path as from the parser: the
    model receives identical appends, whichever way Twilio's frame was spelled."""
    import structlog

    payload = base64.b64encode(bytes(range(160))).decode()
    frame = twilio_frame("3", "inbound", "1", "20", payload, "MZ1")
    out = []
    for data in (frame, frame.decode(), orjson.dumps(orjson.loads(frame), option=orjson.OPT_SORT_KEYS)):
        call = Call(Rows(), log=structlog.get_logger())
        call.on_caller_audio = lambda p, ts, _out=out: _out.append((p, ts))  # type: ignore[method-assign]
        call.on_twilio_text(data)
        assert call.frames_rejected == 0
    assert out == [(payload, 20)] * 3


def _relayed(call, data: bytes) -> list[str]:
    """What the model receives for one Twilio frame through the shell's hot path: the core's
    relay_caller_frame, or (None) on_twilio_text and the backend's queue, as bridge.TwilioListener does."""
    wire = call.relay_caller_frame(data)
    if wire is not None:
        assert not call.backend.out
        return [wire.decode()]
    call.on_twilio_text(data)
    out, call.backend.out = call.backend.out, []
    return out


def _timeline(call) -> tuple:
    return (call.frames_in, call.frames_rejected, call._input_ms, list(call._recent_audio), call._breaks_at,
            call._breaks_offset)


@given(st.lists(st.tuples(fields | st.integers(0, 10**6).map(str), payloads), min_size=1, max_size=8))
@FUZZ
def test_the_core_hot_path_relays_and_counts_as_on_twilio_text_does(frames) -> None:
    """Call.relay_caller_frame (the bridge's path for live audio) against on_twilio_text: the same
    appends reach the model and the call's input timeline (breaks, recent audio) is the same."""
    from tests.test_call import live_call

    hot, _, _ = live_call()
    reference, _, _ = live_call()
    hot.backend.out, reference.backend.out = [], []  # set-up's frames: the shell sent them
    for ts, payload in frames:
        data = twilio_frame("5", "inbound", "2", ts, payload, "MZ1")
        reference.on_twilio_text(data)
        expected, reference.backend.out = reference.backend.out, []
        assert _relayed(hot, data) == expected
    assert _timeline(hot) == _timeline(reference)


def test_the_core_hot_path_takes_live_audio_and_leaves_the_rest_to_on_twilio_text() -> None:
    from tests.test_call import live_call, make_call

    payload = base64.b64encode(b"\x7f" * 160).decode()
    frame = twilio_frame("5", "inbound", "2", "40", payload, "MZ1")
    call, _, _ = live_call()
    assert call.backend.out  # set-up's frames, not sent yet: they go first, through pump
    assert call.relay_caller_frame(frame) is None and call.frames_in == 0
    call.backend.out = []  # the shell sent them
    assert call.relay_caller_frame(frame) == b'{"type":"input_audio_buffer.append","audio":"' + payload.encode() + b'"}'
    assert call.frames_in == 1 and call._input_ms == 20
    assert call.relay_caller_frame(frame.replace(b'","', b'", "')) is None  # another spelling: the parser's
    assert call.relay_caller_frame(twilio_frame("5", "inbound", "2", "40", payload[:-4], "MZ1") + b" ") is None
    call._gate = object()  # a barge-in gate listens to the caller's samples: the full path
    assert call.relay_caller_frame(frame) is None
    waiting, _, _ = make_call()  # not live yet: frames are held by on_twilio_text
    assert waiting.relay_caller_frame(frame) is None and waiting.frames_in == 0
