"""tools/dtmf.py: in-band DTMF for the model's `dtmf` tool, the Goertzel detector, and keypadInputPlan."""

from __future__ import annotations

import audioop
import math
import time

import numpy as np
import pytest

from shim.testing import load_asset
from shim_tools import dtmf
from shim_tools.dtmf import (
    FREQUENCIES,
    KEYS,
    DtmfError,
    KeypadBuffer,
    detect_dtmf,
    dtmf_ulaw,
    keypad_text,
    validate_keys,
)

RATE = 8000
FF = 0xFF


def decode(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2").astype(np.float64)


def encode(x: np.ndarray) -> bytes:
    return audioop.lin2ulaw(np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes(), 2)


def ms(n: float) -> int:
    return round(n * RATE / 1000)


def dbfs(amplitude: float) -> float:
    return 20 * math.log10(amplitude / 32768)


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("key", list(KEYS))
def test_every_key_round_trips(key):
    assert detect_dtmf(dtmf_ulaw(key)) == key


def test_all_sixteen_keys_in_one_string_and_random_strings():
    assert detect_dtmf(dtmf_ulaw(KEYS)) == KEYS
    assert detect_dtmf(dtmf_ulaw(KEYS[::-1], tone_ms=40, gap_ms=40)) == KEYS[::-1]
    rng = np.random.default_rng(7)
    alphabet = list(KEYS) + ["w", "W"]
    for _ in range(20):
        keys = "".join(rng.choice(alphabet, size=int(rng.integers(1, 20))))
        if not keys.strip("wW"):
            keys += "5"
        assert detect_dtmf(dtmf_ulaw(keys)) == keys.replace("w", "").replace("W", ""), keys


@pytest.mark.parametrize("keys", ["11", "111", "1w1", "##", "0000", "DD"])
@pytest.mark.parametrize("tone_ms,gap_ms", [(100, 80), (40, 40), (60, 40)])
def test_repeated_keys_count_once_per_tone(keys, tone_ms, gap_ms):
    expected = keys.replace("w", "")
    assert detect_dtmf(dtmf_ulaw(keys, tone_ms=tone_ms, gap_ms=gap_ms)) == expected


@pytest.mark.parametrize("frame_ms", [15, 18, 20, 25])
def test_detection_does_not_depend_on_frame_alignment(frame_ms):
    """Shortest tones and gaps the generator allows, shifted sample by sample against the frames."""
    audio = dtmf_ulaw("159D#*11", tone_ms=40, gap_ms=40)
    for offset in range(0, 2 * ms(frame_ms), 3):
        assert detect_dtmf(bytes([FF]) * offset + audio, frame_ms=frame_ms) == "159D#*11", offset


@pytest.mark.parametrize("level", [-40.0, -35.0, -25.0, -10.0, -3.5])
def test_round_trip_survives_mu_law_at_any_allowed_level(level):
    assert detect_dtmf(dtmf_ulaw(KEYS, level_dbfs=level)) == KEYS


# --------------------------------------------------------------------------------------------------
# Layout: tones, gaps, pauses, frames


def test_pauses_and_gaps_are_exact():
    tone, gap = ms(100), ms(80)
    out = dtmf_ulaw("1w2W3")
    # 1, gap, 500 ms, 2, gap, 1000 ms, 3, gap, padding
    spans = []
    pos = 0
    for kind, n in [("t", tone), ("s", gap + 4000), ("t", tone), ("s", gap + 8000), ("t", tone), ("s", gap)]:
        spans.append((kind, pos, pos + n))
        pos += n
    assert len(out) == math.ceil(pos / 160) * 160
    assert out[pos:] == bytes([FF]) * (len(out) - pos)
    for kind, a, b in spans:
        if kind == "s":
            assert out[a:b] == bytes([FF]) * (b - a), (a, b)  # silence, to the sample
        else:
            # the tone occupies its span from its first millisecond to its last (raised-cosine ramps
            # start a hair above zero, so the edge samples may still quantise to silence)
            assert any(c != FF for c in out[a : a + 8]) and any(c != FF for c in out[b - 8 : b]), (a, b)
            assert sum(c != FF for c in out[a:b]) > 0.95 * (b - a)
    assert detect_dtmf(out) == "123"


def test_leading_and_trailing_pauses():
    out = dtmf_ulaw("ww5W")
    assert out[:8000] == bytes([FF]) * 8000  # 2 x 500 ms before the tone
    assert any(c != FF for c in out[8000:8008])
    end = 8000 + ms(100)
    assert any(c != FF for c in out[end - 8 : end])
    assert out[end:] == bytes([FF]) * (len(out) - end)
    assert len(out) - end >= ms(80) + 8000  # gap, then the 1 s pause, then padding
    assert len(out) == math.ceil((end + ms(80) + 8000) / 160) * 160


@pytest.mark.parametrize(
    "keys,tone_ms,gap_ms",
    [("1", 100, 80), ("12", 100, 80), ("1", 45, 43), ("123", 77, 41), ("w", 100, 80), ("9W9", 250, 150)],
)
def test_output_is_whole_20ms_frames(keys, tone_ms, gap_ms):
    out = dtmf_ulaw(keys, tone_ms=tone_ms, gap_ms=gap_ms)
    n_keys = sum(k not in "wW" for k in keys)
    content = n_keys * (ms(tone_ms) + ms(gap_ms)) + keys.count("w") * 4000 + keys.count("W") * 8000
    assert len(out) % 160 == 0
    assert len(out) == math.ceil(content / 160) * 160
    assert out[content:] == bytes([FF]) * (len(out) - content)


def test_separators_do_not_change_the_audio():
    assert dtmf_ulaw("555-1234") == dtmf_ulaw("5551234") == dtmf_ulaw(" 555 1234\n")
    assert dtmf_ulaw("abcd") == dtmf_ulaw("ABCD")


# --------------------------------------------------------------------------------------------------
# Levels and spectrum


def test_tones_do_not_clip():
    x = decode(dtmf_ulaw(KEYS))
    peak = np.max(np.abs(x))
    assert peak < 32124  # mu-law's largest value, -0.17 dBFS: nothing reaches it
    assert -7.0 - 0.6 < dbfs(peak) < -7.0 + 0.6  # -10 dBFS pair = 2 x -13 dBFS, peaks at -7 dBFS
    loudest = decode(dtmf_ulaw(KEYS, level_dbfs=dtmf.MAX_LEVEL_DBFS))
    assert dbfs(np.max(np.abs(loudest))) < -0.3


def test_spectrum_of_one_key():
    key = "5"  # 770 + 1336 Hz
    low, high = FREQUENCIES[key]
    x = decode(dtmf_ulaw(key))[: ms(100)]
    steady = x[ms(5) : ms(95)]  # between the ramps
    nfft = 1 << 14
    spec = np.abs(np.fft.rfft(steady * np.hanning(steady.size), nfft))
    freqs = np.fft.rfftfreq(nfft, 1 / RATE)
    db = 20 * np.log10(spec / spec.max() + 1e-12)

    def peak_near(f):
        band = (freqs > f - 15) & (freqs < f + 15)
        i = np.argmax(np.where(band, db, -np.inf))
        return freqs[i], db[i]

    (f_low, db_low), (f_high, db_high) = peak_near(low), peak_near(high)
    assert abs(f_low - low) < 2 and abs(f_high - high) < 2
    assert abs(db_low - db_high) < 0.5  # twist 0 dB
    outside = (np.abs(freqs - low) > 50) & (np.abs(freqs - high) > 50)
    worst = db[outside].max()
    assert worst <= min(db_low, db_high) - 20  # everything else, harmonics included, >= 20 dB down
    # The whole tone, ramps included, is as clean (the ramps are what keeps the splatter down).
    spec_all = np.abs(np.fft.rfft(x * np.hanning(x.size), nfft))
    db_all = 20 * np.log10(spec_all / spec_all.max() + 1e-12)
    assert db_all[outside].max() <= -20
    # Absolute level of each component: -13 dBFS (level_dbfs - 3 dB) for the default -10.
    t = np.arange(steady.size) / RATE
    for f in (low, high):
        amp = 2 * abs(np.dot(steady, np.exp(-2j * np.pi * f * t))) / steady.size
        assert abs(dbfs(amp) - (-13.0)) < 0.4


# --------------------------------------------------------------------------------------------------
# The detector leaves everything else alone


def test_detector_ignores_silence():
    assert detect_dtmf(b"") == ""
    assert detect_dtmf(bytes([FF]) * 16000) == ""
    assert detect_dtmf(bytes([FF, 0x7E]) * 8000) == ""  # idle-channel flicker between +0 and -1
    rng = np.random.default_rng(1)
    assert detect_dtmf(encode(rng.normal(0, 32768 * 10 ** (-60 / 20), 16000))) == ""  # -60 dBFS hiss


def _vowels(rng: np.random.Generator, seconds: float, formants: list[tuple[float, float]]) -> np.ndarray:
    """Speech-like: a glottal pulse train with gliding pitch through formant resonators, syllable
    envelope, breath noise. Formants deliberately sit in the DTMF bands."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = 110 + 60 * np.sin(2 * np.pi * 0.7 * t) + 20 * rng.standard_normal() + 15 * np.sin(2 * np.pi * 5.5 * t)
    phase = np.cumsum(f0 / RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal cycle
    y = pulses + 0.02 * rng.standard_normal(n)
    seg = n // len(formants)
    out = np.zeros(n)
    for i, (f1, f2) in enumerate(formants):
        part = y[i * seg : (i + 1) * seg]
        for fc, bw in ((f1, 90.0), (f2, 110.0), (2500.0, 160.0)):
            r = math.exp(-math.pi * bw / RATE)
            a1, a2 = -2 * r * math.cos(2 * math.pi * fc / RATE), r * r
            z = np.zeros_like(part)
            for k in range(part.size):  # small enough for a plain loop
                z[k] = part[k] - a1 * (z[k - 1] if k else 0) - a2 * (z[k - 2] if k > 1 else 0)
            part = z
        out[i * seg : i * seg + part.size] = part
    out *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2  # ~4 syllables/s
    return out / np.max(np.abs(out)) * 32768 * 10 ** (-6 / 20)


def test_detector_ignores_speech_and_noise():
    rng = np.random.default_rng(3)
    white = rng.normal(0, 32768 * 10 ** (-20 / 20), 32000)
    pink = np.cumsum(rng.normal(0, 1, 32000))
    pink = np.convolve(pink - np.convolve(pink, np.ones(64) / 64, "same"), np.ones(3) / 3, "same")
    pink *= 32768 * 10 ** (-15 / 20) / np.std(pink)
    # /a/ /o/ /e/ /u/ /i/-ish formant pairs, several sitting right on DTMF rows and columns
    vowels = _vowels(rng, 4.0, [(730, 1090), (697, 1209), (770, 1336), (852, 1477), (941, 1633), (300, 2300)])
    for name, x in [("white", white), ("pink", pink), ("vowels", vowels), ("vowels+noise", vowels + 0.3 * white)]:
        assert detect_dtmf(encode(x)) == "", name
    for seed in range(4):  # more voices, every formant pair parked on a DTMF pair
        x = _vowels(np.random.default_rng(100 + seed), 1.6, [(697, 1209), (770, 1336), (852, 1477), (941, 1633)])
        assert detect_dtmf(encode(x)) == "", seed
    for asset in ("caller_question", "caller_interrupt"):  # real (espeak) speech, as Twilio sends it
        assert detect_dtmf(load_asset(asset)) == "", asset


def _pair(low: float, high: float, n: int, low_dbfs: float = -13.0, high_dbfs: float = -13.0) -> np.ndarray:
    t = np.arange(n) / RATE
    a_low, a_high = 32768 * 10 ** (low_dbfs / 20), 32768 * 10 ** (high_dbfs / 20)
    return a_low * np.sin(2 * np.pi * low * t) + a_high * np.sin(2 * np.pi * high * t)


def test_detector_tolerates_real_world_tones_and_rejects_short_bursts():
    sil = np.zeros(ms(100))
    # +-1.5% off frequency (Q.23 sender tolerance), 4 dB twist, over a noisy line
    rng = np.random.default_rng(5)
    noisy = np.concatenate([sil, _pair(697 * 1.015, 1477 * 0.985, ms(60), -16, -12), sil])
    noisy += rng.normal(0, 32768 * 10 ** (-40 / 20), noisy.size)
    assert detect_dtmf(encode(noisy)) == "3"
    # 3.5% off: Q.24 says a receiver must not take that for a key
    off = np.concatenate([sil, _pair(697 * 1.035, 1477 * 0.965, ms(60)), sil])
    assert detect_dtmf(encode(off)) == ""
    # A 20 ms blip (Q.24: must not be taken for a digit below ~23 ms), at every alignment
    for offset in range(0, ms(20), 4):
        blip = np.concatenate([np.zeros(offset), sil, _pair(852, 1336, ms(20)), sil])
        assert detect_dtmf(encode(blip)) == "", offset
    # Only one of the two frequencies, or two from the same group: not a key
    assert detect_dtmf(encode(np.concatenate([sil, _pair(770, 941, ms(100)), sil]))) == ""
    t = np.arange(ms(100)) / RATE
    assert detect_dtmf(encode(32768 * 0.3 * np.sin(2 * np.pi * 1336 * t))) == ""


def test_detect_rejects_bad_frame_sizes():
    for bad in (10, 30, 20.0, True):
        with pytest.raises(ValueError):
            detect_dtmf(b"", frame_ms=bad)


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "keys,expected",
    [
        ("123", "123"),
        ("555-1234", "5551234"),
        (" 1 2 3 ", "123"),
        ("abcd", "ABCD"),
        ("*#", "*#"),
        ("ww1W2", "ww1W2"),
        ("w", "w"),
        ("0" * 64, "0" * 64),
        ("-".join("1" * 64), "1" * 64),
    ],
)
def test_validate_keys_normalises(keys, expected):
    assert validate_keys(keys) == expected


@pytest.mark.parametrize(
    "keys,bad,index",
    [("12x4", "x", 2), ("1,2", ",", 1), ("p123", "p", 0), ("123+", "+", 3), ("12E", "E", 2), ("9\u00a0", "\u00a0", 1)],
)
def test_invalid_keys_name_the_key_and_its_position(keys, bad, index):
    with pytest.raises(DtmfError) as err:
        validate_keys(keys)
    msg = str(err.value)
    assert repr(bad) in msg and f"index {index}" in msg and f"position {index + 1}" in msg
    assert "0-9" in msg and "w = 0.5 s" in msg  # says what is allowed
    with pytest.raises(DtmfError):
        dtmf_ulaw(keys)


@pytest.mark.parametrize("keys", ["", "   ", "--", "1" * 65, 123, None, b"123"])
def test_empty_too_long_or_not_a_string(keys):
    with pytest.raises(DtmfError):
        validate_keys(keys)
    assert issubclass(DtmfError, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [{"tone_ms": 39}, {"gap_ms": 30}, {"tone_ms": 5000}, {"level_dbfs": 0.0}, {"level_dbfs": -60}, {"tone_ms": True}],
)
def test_settings_outside_the_safe_range_are_refused(kwargs):
    with pytest.raises(ValueError):
        dtmf_ulaw("1", **kwargs)


# --------------------------------------------------------------------------------------------------
# Caller keypresses -> the model


def test_keypad_text_is_vapis_wording():
    assert keypad_text("1234") == "User's Keypad Entry: 1234"
    assert keypad_text("*0#") == "User's Keypad Entry: *0#"


@pytest.mark.parametrize("plan", [None, {}, {"enabled": False, "delimiters": "#"}, {"enabled": "true"}, "junk"])
def test_disabled_plan_drops_keys(plan):
    kb = KeypadBuffer(plan)
    assert not kb.enabled
    for i, d in enumerate("123#"):
        assert kb.press(d, float(i)) is None
    assert kb.due(100.0) is None and kb.pending == "" and kb.deadline is None


def test_delimiter_hands_over_the_entry_without_the_delimiter():
    kb = KeypadBuffer({"enabled": True, "timeoutSeconds": 2, "delimiters": "#"})
    assert [kb.press(d, 0.1 * i) for i, d in enumerate("1234")] == [None] * 4
    assert kb.pending == "1234"
    assert kb.press("#", 0.5) == "1234"
    assert kb.pending == "" and kb.due(10.0) is None
    assert kb.press("#", 11.0) is None  # nothing buffered: nothing to say
    assert kb.press("*", 12.0) is None and kb.pending == "*"  # not the delimiter: an ordinary key
    assert kb.press("#", 12.1) == "*"


def test_timeout_counts_from_the_last_key():
    kb = KeypadBuffer({"enabled": True})  # timeoutSeconds defaults to 2, no delimiter
    assert kb.timeout_seconds == 2.0 and kb.delimiters == frozenset()
    kb.press("4", 10.0)
    assert kb.deadline == 12.0
    kb.press("2", 11.5)
    assert kb.deadline == 13.5
    assert kb.due(13.0) is None
    assert kb.due(13.5) == "42"
    assert kb.due(20.0) is None and kb.deadline is None
    kb.press("#", 30.0)  # no delimiter configured: # is a key like any other
    assert kb.due(32.0) == "#"


def test_timeout_and_delimiter_whichever_first():
    kb = KeypadBuffer({"enabled": True, "timeoutSeconds": 0.5, "delimiters": "*"})
    kb.press("7", 0.0)
    assert kb.due(0.49) is None
    assert kb.due(0.5) == "7"
    kb.press("8", 1.0)
    assert kb.press("*", 1.2) == "8"
    assert kb.due(5.0) is None


def test_timeout_zero_waits_for_the_delimiter():
    kb = KeypadBuffer({"enabled": True, "timeoutSeconds": 0, "delimiters": "#"})
    kb.press("9", 0.0)
    kb.press("9", 1.0)
    assert kb.deadline is None and kb.due(1e6) is None
    assert kb.press("#", 1e6) == "99"


def test_timeout_zero_without_delimiter_hands_over_each_key():
    kb = KeypadBuffer({"enabled": True, "timeoutSeconds": 0, "delimiters": ""})
    assert kb.press("1", 0.0) == "1"
    assert kb.press("#", 0.1) == "#"


def test_plan_values_are_tolerated_like_vapi_exports():
    kb = KeypadBuffer({"enabled": True, "delimiters": ["#", "*"], "timeoutSeconds": 99})
    assert kb.delimiters == {"#", "*"} and kb.timeout_seconds == 10.0
    kb.press("5", 0.0)
    assert kb.press("*", 0.1) == "5"
    assert KeypadBuffer({"enabled": True, "timeoutSeconds": -3}).timeout_seconds == 0.0
    assert KeypadBuffer({"enabled": True, "timeoutSeconds": "2"}).timeout_seconds == 2.0
    assert KeypadBuffer({"enabled": True, "delimiters": "x"}).delimiters == frozenset()
    kb = KeypadBuffer({"enabled": True})
    for junk in ("", "12", "x", None, 5):
        assert kb.press(junk, 0.0) is None
    assert kb.pending == ""
    kb.press("a", 0.0)  # Twilio sends upper-case keys; anything else is ignored
    kb.press("D", 0.0)
    assert kb.pending == "D"
    kb.clear()
    assert kb.pending == "" and kb.deadline is None


# --------------------------------------------------------------------------------------------------
# Speed (reported, not asserted)


def test_generation_speed_report():
    dtmf._tone.cache_clear()
    dtmf._silence.cache_clear()
    t0 = time.perf_counter()
    dtmf_ulaw("0123456789")
    cold = time.perf_counter() - t0
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        dtmf_ulaw("0123456789")
    warm = (time.perf_counter() - t0) / n
    audio = dtmf_ulaw("0123456789" * 6)
    t0 = time.perf_counter()
    detect_dtmf(audio)
    det = time.perf_counter() - t0
    print(
        f"\ndtmf_ulaw('0123456789'): cold {cold * 1e3:.3f} ms, warm {warm * 1e6:.1f} us; "
        f"detect_dtmf on {len(audio) / RATE:.1f} s of audio: {det * 1e3:.1f} ms"
    )
