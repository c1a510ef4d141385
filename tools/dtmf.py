"""DTMF: the model's `dtmf` tool played in-band, and the caller's keypresses turned into text.

Pure and fast: no I/O, no globals besides caches. Two directions:

**Assistant -> far end (Vapi's `dtmf` tool).** Vapi exposes `dtmf({keys: string})` to the model:
digits 0-9, `*`, `#`, `A`-`D`, with `w` = 0.5 s pause and `W` = 1 s pause (https://docs.vapi.ai/tools/default-tools;
https://docs.vapi.ai/ivr-navigation).
Vapi sends RFC 2833 events; a Twilio Media Stream cannot send DTMF toward the far end out of band
(Twilio: "Sending DTMF outbound from your media server toward Twilio is not supported", https://www.twilio.com/docs/voice/media-streams/websocket-messages), so the
shim plays the keys IN-BAND: `validate_keys` checks the model's string, `dtmf_ulaw` renders it as
8 kHz G.711 mu-law in whole 20 ms frames, ready to be sent as outbound `media` messages (160 bytes
each) in place of assistant audio. In-band DTMF survives a G.711 path well; through low-bitrate
codecs (AMR, G.729) on some legs it can be distorted, which is why the tones below are longer and
the gaps wider than the minimums. Whether Twilio re-detects our in-band tones and regenerates them
as RFC 2833 toward a SIP far end is UNCONFIRMED; over the PSTN the tones simply travel as audio.

Tone design (ITU-T Q.23 / Q.24):
  * Frequencies: Q.23's 4x4 matrix. Rows (low group) 697, 770, 852, 941 Hz; columns (high group)
    1209, 1336, 1477, 1633 Hz. Generated exactly (Q.23 allows the sender +-1.8%).
  * Level: `level_dbfs` is the level of the pair as a whole; each frequency is `level_dbfs - 3.01 dB`
    (so the pair carries the power of one sine at `level_dbfs`), twist 0 dB. The default -10 dBFS
    gives -13 dBFS per frequency (~ -10 dBm0, since G.711's 0 dBm0 is 3.17 dB under full scale) and
    a peak of -7 dBFS: no clipping, and well inside receivers' acceptance windows (which typically
    reach from about 0 down to -25 dBm0 per frequency). dBFS: 0 dBFS = a sine peaking at 32768.
  * Duration: Q.24 (Annex A; e.g. the North American column) requires receivers to ACCEPT tones of
    >= 40 ms separated by pauses of >= 40 ms and to reject tones shorter than ~23 ms. Those are the
    minimums, so `dtmf_ulaw` refuses anything below 40 ms. The defaults, 100 ms tone + 80 ms gap
    (a 180 ms cycle, ~5.5 digits/s, about what a phone sends when a person presses keys fast), leave
    margin for jitter buffers, packet-loss concealment and codecs that smear the edges.
  * Each tone has a 5 ms raised-cosine (Hann) ramp at both ends (capped at a quarter of the tone):
    no clicks, and the spectrum stays clean (tests/test_dtmf.py: everything outside the two
    frequencies is >= 20 dB down; measured ~45 dB down for every key).
  * Layout: every key is its tone followed by `gap_ms` of silence (the last key too, so speech the
    shim plays next never abuts a tone); `w` / `W` add exactly 500 / 1000 ms of silence where they
    stand. So "1w2" = tone(1), gap, 500 ms, tone(2), gap. Silence is mu-law 0xFF. The result is padded
    with 0xFF to a whole number of 20 ms frames.

`detect_dtmf` is the inverse, a Goertzel detector used by the tests and usable on the caller's
inbound audio (e.g. if Twilio's `dtmf` events were ever missing).

**Caller -> model (Vapi's `keypadInputPlan`).** Twilio delivers the caller's keys as `dtmf` messages
on a bidirectional stream, one key each (Twilio's `dtmf` message). `KeypadBuffer` applies the assistant's
`keypadInputPlan` {enabled, timeoutSeconds, delimiters} and `keypad_text` is the user message the
model then receives. See those two for what Vapi does and the sources.
"""

from __future__ import annotations

import audioop
import functools
import math
from collections.abc import Mapping
from typing import Final

import numpy as np

RATE: Final = 8000
FRAME_BYTES: Final = 160  # 20 ms of 8 kHz mu-law, one Twilio media frame
FULL_SCALE: Final = 32768.0
SILENCE: Final = 0xFF  # mu-law encoding of 0 (audioop.lin2ulaw(b"\0\0", 2) == b"\xff")

# ITU-T Q.23: key -> (low-group Hz, high-group Hz)
LOW_GROUP: Final = (697, 770, 852, 941)
HIGH_GROUP: Final = (1209, 1336, 1477, 1633)
_LAYOUT: Final = ("123A", "456B", "789C", "*0#D")
FREQUENCIES: Final[dict[str, tuple[int, int]]] = {
    key: (LOW_GROUP[row], HIGH_GROUP[col]) for row, keys in enumerate(_LAYOUT) for col, key in enumerate(keys)
}
KEYS: Final = "0123456789*#ABCD"
PAUSES: Final[dict[str, int]] = {"w": 500, "W": 1000}  # ms, as in Vapi's dtmf tool and Twilio <Play digits>
MAX_KEYS: Final = 64  # after normalisation, pauses included
SEPARATORS: Final = frozenset(" \t\r\n-")  # dropped by validate_keys: "555-1234", "1 2 3"

MIN_TONE_MS: Final = 40  # Q.24 acceptance minimum
MIN_GAP_MS: Final = 40
MAX_TONE_MS: Final = 2000
MAX_GAP_MS: Final = 2000
MAX_LEVEL_DBFS: Final = -3.5  # the pair peaks at level + 3 dB; keep it under mu-law's max (-0.17 dBFS)
MIN_LEVEL_DBFS: Final = -40.0
RAMP_MS: Final = 5.0


class DtmfError(ValueError):
    """The model's `keys` cannot be played. The message says which key, where, and what is allowed."""


_ALLOWED_TEXT: Final = (
    "allowed: digits 0-9, * # A B C D (a-d are read as A-D), w = 0.5 s pause, W = 1 s pause; "
    "spaces and dashes are ignored"
)


def validate_keys(keys: str) -> str:
    """Normalise the model's `keys` string, or raise DtmfError.

    Normalisation (our choice, documented so the model's tool result can explain it):
      * spaces, tabs, newlines and '-' are dropped, so "555-1234" and "1 2 3" work;
      * 'a'-'d' become 'A'-'D' (DTMF's fourth column). 'w'/'W' are case-sensitive (0.5 s vs 1 s).
    Anything else (',', 'p', '+', letters other than A-D, ...) is an error naming the character and
    its 0-based index in the string as given. The result must hold 1..64 keys/pauses (MAX_KEYS).
    """
    if not isinstance(keys, str):
        raise DtmfError(f"keys must be a string, got {type(keys).__name__} {keys!r}; {_ALLOWED_TEXT}")
    out: list[str] = []
    for index, ch in enumerate(keys):
        if ch in SEPARATORS:
            continue
        if ch in "abcd":
            ch = ch.upper()
        if ch in FREQUENCIES or ch in PAUSES:
            out.append(ch)
            continue
        raise DtmfError(f"invalid key {ch!r} at index {index} (position {index + 1}) of {keys!r}; {_ALLOWED_TEXT}")
    if not out:
        raise DtmfError(f"no keys to press in {keys!r}; {_ALLOWED_TEXT}")
    if len(out) > MAX_KEYS:
        raise DtmfError(f"too many keys: {len(out)} after removing spaces/dashes, at most {MAX_KEYS}")
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Generation


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")


@functools.lru_cache(maxsize=256)
def _tone(key: str, n: int, level_dbfs: float) -> bytes:
    """One key's tone, `n` samples, mu-law. Cached: a call with the default settings only joins bytes."""
    low, high = FREQUENCIES[key]
    t = np.arange(n, dtype=np.float64) / RATE
    amp = FULL_SCALE * 10.0 ** ((level_dbfs - 10.0 * math.log10(2.0)) / 20.0)  # each frequency: level - 3.01 dB
    # Cosines, so the first samples are not a zero crossing (the tone starts where its ramp says it does).
    x = amp * (np.cos(2 * np.pi * low * t) + np.cos(2 * np.pi * high * t))
    ramp = min(round(RAMP_MS * RATE / 1000), n // 4)
    if ramp:
        w = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2  # raised cosine, 0 -> 1
        x[:ramp] *= w
        x[-ramp:] *= w[::-1]
    pcm = np.clip(np.rint(x), -32768, 32767).astype("<i2")
    return audioop.lin2ulaw(pcm.tobytes(), 2)


@functools.lru_cache(maxsize=64)
def _silence(n: int) -> bytes:
    return bytes([SILENCE]) * n


def dtmf_ulaw(keys: str, *, tone_ms: int = 100, gap_ms: int = 80, level_dbfs: float = -10.0) -> bytes:
    """Render `keys` (validated with `validate_keys`) as 8 kHz mu-law DTMF, padded to 160-byte frames.

    Each key: `tone_ms` of its Q.23 pair (5 ms raised-cosine ramps) then `gap_ms` of silence; `w`/`W`:
    500/1000 ms of silence. See the module docstring for levels and timing. Raises DtmfError for bad
    keys, ValueError for settings outside tone/gap 40..2000 ms, level -40..-3.5 dBFS.
    """
    normalised = validate_keys(keys)
    _check_range("tone_ms", tone_ms, MIN_TONE_MS, MAX_TONE_MS)
    _check_range("gap_ms", gap_ms, MIN_GAP_MS, MAX_GAP_MS)
    _check_range("level_dbfs", level_dbfs, MIN_LEVEL_DBFS, MAX_LEVEL_DBFS)
    tone_n = round(tone_ms * RATE / 1000)
    gap = _silence(round(gap_ms * RATE / 1000))
    level = float(level_dbfs)
    parts: list[bytes] = []
    for ch in normalised:
        pause = PAUSES.get(ch)
        if pause is not None:
            parts.append(_silence(pause * RATE // 1000))
        else:
            parts.append(_tone(ch, tone_n, level))
            parts.append(gap)
    total = sum(map(len, parts))
    parts.append(_silence(-total % FRAME_BYTES))
    return b"".join(parts)


# --------------------------------------------------------------------------------------------------
# Detection

# Each DTMF frequency is probed at f and f * (1 +- 1.2%): Q.24 receivers must accept senders up to
# +-1.5% off, and a 20 ms Goertzel loses most of a tone 1.5% (22 Hz at 1477 Hz) off its single probe.
_DEVIATIONS: Final = (-0.012, 0.0, 0.012)
_DETECT_FREQS: Final = np.concatenate(
    [np.array(LOW_GROUP + HIGH_GROUP, dtype=np.float64) * (1 + d) for d in _DEVIATIONS]
)
_KEY_AT: Final = tuple(tuple(_LAYOUT[r][c] for c in range(4)) for r in range(4))
MIN_RMS_DBFS: Final = -50.0  # quieter frames are never tones (mu-law idle noise, line hiss)
MIN_PAIR_SHARE: Final = 0.55  # a frame holds a key if the pair carries >= 55% of its energy ...
CORE_PAIR_SHARE: Final = 0.85  # ... and a tone needs CORE_FRAMES frames where it carries >= 85%
CORE_FRAMES: Final = 2
MIN_GROUP_RATIO_DB: Final = 6.0  # the strongest frequency of a group beats the group's runner-up by this
MAX_TWIST_DB: Final = 8.0  # |high - low| level difference, Q.24's usual acceptance bound
MIN_TONE_DETECT_MS: Final = 40  # a key must hold over consecutive frames spanning about this (Q.24 minimum)


def _goertzel_power(frames: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """|X(f)|^2 at `freqs` for every frame (rows). The Goertzel recurrence, run for all frames and
    frequencies at once: one numpy step per sample of a frame, not per sample of audio."""
    coeff = 2.0 * np.cos(2.0 * np.pi * freqs / RATE)
    s1 = np.zeros((frames.shape[0], coeff.size))
    s2 = np.zeros_like(s1)
    for n in range(frames.shape[1]):
        s0 = frames[:, n : n + 1] + coeff * s1 - s2
        s2 = s1
        s1 = s0
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def _frame_keys(ulaw: bytes, frame_n: int) -> list[tuple[str, float] | None]:
    """(key, share of the frame's energy in its pair) for each frame, or None. Frames are `frame_n`
    samples long and start every `frame_n // 2` samples."""
    if not ulaw:
        return []
    hop = frame_n // 2
    pad = max(frame_n - len(ulaw), 0) + (-max(len(ulaw) - frame_n, 0) % hop)
    pcm = np.frombuffer(audioop.ulaw2lin(bytes(ulaw) + bytes([SILENCE]) * pad, 2), dtype="<i2")
    # Frames overlap by half: whatever the alignment, a >= 40 ms tone fills at least two frames
    # completely, so the purity test (CORE_PAIR_SHARE) never has to rely on half-silent frames.
    frames = np.lib.stride_tricks.sliding_window_view(pcm.astype(np.float64), frame_n)[::hop]
    energy = np.einsum("ij,ij->i", frames, frames)  # sum of squares per frame
    power = _goertzel_power(frames, _DETECT_FREQS).reshape(frames.shape[0], len(_DEVIATIONS), 8).max(axis=1)
    # A sine of amplitude A over k of the frame's N samples gives |X|^2 = (A k / 2)^2 and energy
    # A^2 k / 2, so 2|X|^2 / (N * energy) is 1 for a pure full-frame tone (k/N for a partial one).
    share = 2.0 * power / (frame_n * np.maximum(energy, 1e-9))[:, None]
    rms_dbfs = 10.0 * np.log10(np.maximum(energy / frame_n, 1e-12) / FULL_SCALE**2) + 3.01  # sine = 0 dBFS
    margin = 10.0 ** (MIN_GROUP_RATIO_DB / 10.0)
    out: list[tuple[str, float] | None] = []
    for i in range(frames.shape[0]):
        if rms_dbfs[i] < MIN_RMS_DBFS:
            out.append(None)
            continue
        low, high = share[i, :4], share[i, 4:]
        r, c = int(np.argmax(low)), int(np.argmax(high))
        lo, hi = float(low[r]), float(high[c])
        if (
            lo + hi < MIN_PAIR_SHARE
            or lo <= 0
            or hi <= 0
            or lo < margin * np.max(np.delete(low, r))
            or hi < margin * np.max(np.delete(high, c))
            or abs(10.0 * math.log10(hi / lo)) > MAX_TWIST_DB
        ):
            out.append(None)
            continue
        out.append((_KEY_AT[r][c], lo + hi))
    return out


def detect_dtmf(ulaw: bytes, *, frame_ms: int = 20) -> str:
    """The keys present in 8 kHz mu-law audio, in order; each continuous tone counts once.

    A Goertzel detector over frames of `frame_ms` (15..25 ms: Goertzel needs >= ~15 ms to tell
    adjacent rows, 73 Hz apart, from each other, and a 40 ms tone must still fill whole frames)
    starting every `frame_ms / 2`. Each Q.23 frequency is probed at f and f +- 1.2%.
      * A frame holds a key when it is louder than -50 dBFS, its strongest low-group and high-group
        frequencies carry >= 55% of its energy together, each beats the runner-up of its group by
        >= 6 dB, and twist is within 8 dB.
      * A key is reported once it holds over consecutive frames spanning ~40 ms (3 frames at 20 ms:
        every >= 40 ms tone does at any alignment, a 20 ms blip never does, as Q.24 wants) of which
        at least 2 (1 with 25 ms frames) are pure: >= 85% of the energy in the pair. A steady tone
        reaches ~0.97; speech, even synthetic vowels with formants parked on DTMF frequencies,
        stays near 0.8 at most.
      * It is reported again only after a frame without it: "11" with a >= 40 ms gap reads as two
        ones, a single long tone as one.
    Robust to mu-law quantisation (the tests round-trip tones from -40 to -3.5 dBFS) and to
    +-1.5% frequency error, 4 dB twist and line noise.
    """
    if isinstance(frame_ms, bool) or not isinstance(frame_ms, int) or not 15 <= frame_ms <= 25:
        raise ValueError(f"frame_ms must be an int in [15, 25], got {frame_ms!r}")
    frame_n = frame_ms * RATE // 1000
    hop_ms = frame_ms / 2
    # consecutive frames spanning at most MIN_TONE_DETECT_MS (so a 40 ms tone always makes it), never 1
    need = max(2, math.floor((MIN_TONE_DETECT_MS - frame_ms) / hop_ms) + 1)
    # pure frames: as many as a 40 ms tone always fills completely, whatever its alignment (2 at 20 ms)
    need_core = max(1, min(CORE_FRAMES, math.floor((MIN_TONE_DETECT_MS - frame_ms) / hop_ms)))
    digits: list[str] = []
    current: str | None = None
    run = core = 0
    reported = False
    for frame in _frame_keys(ulaw, frame_n):
        key = frame[0] if frame is not None else None
        if key is None or key != current:
            current, run, core, reported = key, 0, 0, False
        if frame is None:
            continue
        run += 1
        core += frame[1] >= CORE_PAIR_SHARE
        if not reported and run >= need and core >= need_core:
            digits.append(key)
            reported = True
    return "".join(digits)


# --------------------------------------------------------------------------------------------------
# Caller keypresses -> the model


def keypad_text(digits: str) -> str:
    """The user message the model receives for the caller's keypad entry: "User's Keypad Entry: 1234".

    This is Vapi's own wording. Source: Vapi docs, "Keypad input settings" ("When Vapi processes the
    collected digits, it adds them to the conversation as a user message, for example,
    `User's Keypad Entry: 1234`"),
    https://docs.vapi.ai/documentation/assistants/conversation-behavior/keypad-input-settings
    (VapiAI/docs, fern/assistants/keypad-input-settings.mdx); Vapi staff gave the same format on the
    support forum, https://support.vapi.ai/t/27066857/dtmf-inputs-outbound-call ("User's Keypad
    Entry: [digits]"). Prompts written for Vapi look for exactly this string, so keep it verbatim.
    The shim adds it as a user `input_text` conversation item and then asks for a response.
    """
    return f"User's Keypad Entry: {digits}"


class KeypadBuffer:
    """Vapi's `keypadInputPlan`: collect the caller's keys, hand them over on a delimiter or a timeout.

    Plan fields (Vapi OpenAPI `KeypadInputPlan`; docs "Keypad input settings", cited in keypad_text):
      * `enabled` (default false). Disabled, which is also the plan being absent, Vapi does not turn
        caller keys into conversation messages at all: the docs describe `enabled` as "Enables caller
        keypad input. Default is false", and the Feb 27 2025 changelog introduced the plan as what
        enables handling of caller DTMF. The shim does the same: with the plan off, `press` drops the
        key and returns None (the bridge should log it at debug and may count it), so an assistant
        behaves as it did on Vapi. (The tones may still be audible in the inbound audio, as on Vapi.)
      * `timeoutSeconds` (default 2, 0..10): processed this long after the LAST key (each key restarts
        the wait, like an inter-digit timeout). 0 = no timeout: wait for a delimiter (Vapi docs:
        "Set the timeout to 0 when input should only be processed after the caller enters a
        delimiter"). Out-of-range values are clamped into 0..10; non-numbers mean 2.
      * `delimiters`: "#", "*" or "" (none). A list such as ["#", "*"] (older docs and support
        answers use arrays) is accepted too. Absent = none: the schema gives no default (our choice).
        A delimiter is not part of the entry; with no delimiter configured, # and * are ordinary keys.
      * timeout 0 AND no delimiter would never process anything; the older schema text says input is
        then "processed ... immediately if no delimiter is used", so each key is handed over at once.

    A delimiter with nothing buffered returns None (nothing to say). Keys that are not a single
    DTMF key (0-9 * # A-D) are ignored. Times are the caller's monotonic clock, in seconds.
    """

    __slots__ = ("enabled", "timeout_seconds", "delimiters", "_digits", "_last")

    def __init__(self, plan: Mapping | None) -> None:
        plan = plan if isinstance(plan, Mapping) else {}
        self.enabled: bool = plan.get("enabled") is True
        timeout = plan.get("timeoutSeconds", 2)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
            timeout = 2
        self.timeout_seconds: float = float(min(max(timeout, 0), 10))
        raw = plan.get("delimiters", "")
        items = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else []
        self.delimiters: frozenset[str] = frozenset(d for d in items if d in ("#", "*"))
        self._digits: list[str] = []
        self._last: float | None = None

    @property
    def pending(self) -> str:
        """The keys buffered so far (not yet handed over)."""
        return "".join(self._digits)

    @property
    def deadline(self) -> float | None:
        """When `due` will hand the buffer over (monotonic seconds), or None if nothing will time out."""
        if not self._digits or self.timeout_seconds <= 0 or self._last is None:
            return None
        return self._last + self.timeout_seconds

    def press(self, digit: str, now: float) -> str | None:
        """A key from Twilio's `dtmf` event. Returns the entry to send to the model (delimiter not
        included) when this key completes it, else None."""
        if not self.enabled or not isinstance(digit, str) or len(digit) != 1 or digit not in FREQUENCIES:
            return None
        if digit in self.delimiters:
            return self._take()
        self._digits.append(digit)
        self._last = now
        if self.timeout_seconds <= 0 and not self.delimiters:
            return self._take()
        return None

    def due(self, now: float) -> str | None:
        """The buffered entry once `timeoutSeconds` have passed since the last key, else None."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        return self._take()

    def clear(self) -> None:
        """Forget buffered keys (e.g. at hang-up)."""
        self._digits.clear()
        self._last = None

    def _take(self) -> str | None:
        text = "".join(self._digits)
        self.clear()
        return text or None
