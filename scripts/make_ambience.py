#!/usr/bin/env python3
"""Generate shim/assets/office_ambience.ulaw: a quiet, self-made office room-tone loop.

Everything is synthesised here from seeded numpy noise (no recordings, no third-party material),
so the output is the same on every run with the same numpy:

* room tone: pink-ish noise rolled off above ~1.5 kHz (rooms are dark);
* HVAC: broadband "air" around 300-900 Hz plus a faint fan hum (harmonics of 60 Hz at 360/420/480 Hz,
  the fundamental itself is below the telephone band);
* murmur: three distant "talkers", each speech-band noise (muffled, formant-ish bumps) under a
  syllable-rate envelope (2-6 Hz) gated by a slow phrase envelope, so they come and go;
* keyboard: two short, irregular bursts of soft key clicks, far away (band-passed, low);
* optionally (--with-phone, off by default) one faint distant phone chirp. It is off because in a
  10 s loop any recognisable event repeats every 10 s, which is exactly what makes a loop noticeable.

The loop is seamless by construction rather than by a crossfade: every component is built as a
periodic signal of exactly the loop length (noise is synthesised in the frequency domain, tones sit on
the FFT grid, clicks wrap around modulo the length, and the final band-limit is a circular FFT
filter), so the sample after the last one is the first one. A crossfade would add a level dip and a
comb-filtered stretch once per loop; this has neither. The script checks the seam anyway.

Output: band-limited to 300-3400 Hz, RMS normalized to TARGET_RMS_DBFS (measured after the mu-law
round trip), raw G.711 mu-law, 8 kHz mono, no header, a whole number of 20 ms frames.

    .venv/bin/python scripts/make_ambience.py            # writes shim/assets/office_ambience.ulaw
    .venv/bin/python scripts/make_ambience.py --wav x.wav  # also a 16-bit WAV copy to listen to
"""

from __future__ import annotations

import argparse
import audioop
import wave
from pathlib import Path

import numpy as np

RATE = 8000
SECONDS = 10.0
SEED = 20_251_121
TARGET_RMS_DBFS = -38.0  # shim.background.AMBIENCE_FILE_RMS_DBFS must match
BAND_HZ = (300.0, 3400.0)
OUT = Path(__file__).resolve().parent.parent / "shim" / "assets" / "office_ambience.ulaw"
FULL_SCALE = 32768.0


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def dbfs(x: np.ndarray) -> float:
    return 20 * np.log10(rms(x) / FULL_SCALE)


def periodic_noise(rng: np.random.Generator, n: int, magnitude) -> np.ndarray:
    """Gaussian noise with amplitude spectrum `magnitude(f)`, periodic in n samples, unit RMS."""
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec = (rng.standard_normal(f.size) + 1j * rng.standard_normal(f.size)) * magnitude(f)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return x / rms(x)


def periodic_envelope(rng: np.random.Generator, n: int, lo_hz: float, hi_hz: float) -> np.ndarray:
    """A slow, smooth, periodic modulation signal (unit RMS) with energy between lo_hz and hi_hz."""
    return periodic_noise(rng, n, lambda f: ((f >= lo_hz) & (f <= hi_hz)).astype(float))


def bump(f: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((f - centre) / width) ** 2)


def circular_bandpass(x: np.ndarray, lo: float, hi: float, edge: float = 100.0) -> np.ndarray:
    """Zero-phase band-pass with raised-cosine edges, applied circularly (keeps the loop seamless)."""
    f = np.fft.rfftfreq(x.size, 1 / RATE)
    g = np.ones_like(f)
    low = f < lo + edge / 2
    g[low] = 0.5 * (1 + np.cos(np.pi * np.clip((lo + edge / 2 - f[low]) / edge, 0, 1)))
    high = f > hi - edge / 2
    g[high] = 0.5 * (1 + np.cos(np.pi * np.clip((f[high] - (hi - edge / 2)) / edge, 0, 1)))
    return np.fft.irfft(np.fft.rfft(x) * g, x.size)


def room_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    return periodic_noise(rng, n, lambda f: 1 / np.sqrt(np.maximum(f, 40.0)) / np.sqrt(1 + (f / 1500) ** 2))


def hvac(rng: np.random.Generator, n: int) -> np.ndarray:
    air = periodic_noise(rng, n, lambda f: bump(f, 450, 250) + 0.3 * bump(f, 900, 300))
    t = np.arange(n) / RATE
    period = n / RATE
    hum = np.zeros(n)
    for hz, amp in ((360.0, 1.0), (420.0, 0.6), (480.0, 0.45)):
        hum += amp * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    # A very slow "breathing" of the fan (one cycle per half loop), so the hum is not a dead-still tone.
    hum *= 1 + 0.15 * np.sin(2 * np.pi * 2 / period * t)
    return air + 0.18 * hum / rms(hum)


def murmur(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n)
    for formant1, formant2 in ((500.0, 1400.0), (650.0, 1100.0), (420.0, 1700.0)):
        voice = periodic_noise(
            rng, n, lambda f: bump(f, formant1, 180) + 0.5 * bump(f, formant2, 250) + 0.1 * bump(f, 2500, 400)
        )
        syllables = np.clip(0.6 + 0.5 * periodic_envelope(rng, n, 2.0, 6.0), 0.0, None)
        phrases = 1 / (1 + np.exp(-3.0 * periodic_envelope(rng, n, 0.1, 0.5)))  # talk / pause, softly
        out += voice * syllables * phrases
    return out / rms(out)


def keyboard(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n)
    click_len = int(0.012 * RATE)
    tt = np.arange(click_len) / RATE
    for start_s in rng.uniform(0, SECONDS, size=2):
        pos = start_s
        for _ in range(rng.integers(7, 13)):
            # a key: a few ms of bright noise (the cap) over a softer, lower "thock"
            cap = rng.standard_normal(click_len) * np.exp(-tt / 0.0015)
            thock = np.sin(2 * np.pi * rng.uniform(700, 1000) * tt) * np.exp(-tt / 0.004)
            click = (cap + 0.8 * thock) * 10 ** (rng.uniform(-4, 2) / 20)
            idx = (int(pos * RATE) + np.arange(click_len)) % n  # wraps: the loop stays seamless
            out[idx] += click
            pos += float(np.clip(rng.lognormal(np.log(0.16), 0.35), 0.07, 0.45))
    return out


def phone_chirp(rng: np.random.Generator, n: int) -> np.ndarray:
    """One short, muffled two-tone electronic ring (1 kHz / 1.3 kHz warble at 16 Hz), far away."""
    dur = 0.45
    t = np.arange(int(dur * RATE)) / RATE
    warble = np.where(np.sin(2 * np.pi * 16 * t) >= 0, 1000.0, 1300.0)
    tone = np.sin(2 * np.pi * np.cumsum(warble) / RATE)
    env = np.minimum(1, np.minimum(t / 0.02, (dur - t) / 0.05))
    out = np.zeros(n)
    idx = (int(rng.uniform(0, SECONDS) * RATE) + np.arange(t.size)) % n
    out[idx] = tone * env
    return out


def make(seconds: float = SECONDS, seed: int = SEED, with_phone: bool = False) -> bytes:
    n = int(round(seconds * RATE))
    n -= n % 160  # whole 20 ms frames
    rng = np.random.default_rng(seed)
    x = (
        1.00 * room_tone(rng, n)
        + 0.60 * hvac(rng, n)
        + 0.40 * murmur(rng, n)
        + 1.60 * keyboard(rng, n)  # sparse: clicks peak 3-10 dB over the total RMS, -23 dB of its energy
    )
    chirp = phone_chirp(rng, n)  # always drawn, so --with-phone does not change the rest
    if with_phone:
        x += 0.5 * chirp
    x = circular_bandpass(x, *BAND_HZ)
    x *= FULL_SCALE * 10 ** (TARGET_RMS_DBFS / 20) / rms(x)
    # Fine-tune the level after the mu-law round trip (quantisation adds a little energy).
    for _ in range(3):
        ulaw = audioop.lin2ulaw(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes(), 2)
        got = dbfs(np.frombuffer(audioop.ulaw2lin(ulaw, 2), "<i2"))
        x *= 10 ** ((TARGET_RMS_DBFS - got) / 20)
    return audioop.lin2ulaw(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes(), 2)


def report(ulaw: bytes) -> None:
    y = np.frombuffer(audioop.ulaw2lin(ulaw, 2), "<i2").astype(np.float64)
    steps = np.abs(np.diff(y))
    seam = abs(y[0] - y[-1])
    spec = np.abs(np.fft.rfft(y)) ** 2
    f = np.fft.rfftfreq(y.size, 1 / RATE)
    in_band = spec[(f >= 250) & (f <= 3500)].sum() / spec.sum()
    print(f"{len(ulaw)} bytes, {len(ulaw) / RATE:.2f} s, RMS {dbfs(y):.2f} dBFS, "
          f"peak {20 * np.log10(np.abs(y).max() / FULL_SCALE):.1f} dBFS, {100 * in_band:.2f} % of energy in 250-3500 Hz")
    print(f"seam step {seam:.0f} vs median step {np.median(steps):.0f}, 99.9th pct {np.percentile(steps, 99.9):.0f}")
    assert seam <= np.percentile(steps, 99.9), "loop seam is a discontinuity"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seconds", type=float, default=SECONDS)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--with-phone", action="store_true", help="add one faint distant phone chirp per loop")
    ap.add_argument("--wav", type=Path, help="also write a 16-bit WAV of the result, for listening")
    args = ap.parse_args()

    ulaw = make(args.seconds, args.seed, args.with_phone)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(ulaw)
    print(f"wrote {args.out}")
    report(ulaw)
    if args.wav:
        with wave.open(str(args.wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            # three loops back to back, to hear the seam
            w.writeframes(audioop.ulaw2lin(ulaw, 2) * 3)
        print(f"wrote {args.wav}")


if __name__ == "__main__":
    main()
