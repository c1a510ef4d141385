"""Background ambience (Vapi's `backgroundSound`) mixed under the assistant's voice.

Vapi plays "office" ambience on phone calls unless `backgroundSound` is "off" or a URL of an audio
file. The shim ships its own office loop (shim/assets/office_ambience.ulaw, made by
scripts/make_ambience.py) and can fetch a WAV from a URL (`fetch_ambience`).

Levels. Every ambience, shipped or fetched, is stored at AMBIENCE_FILE_RMS_DBFS (-38 dBFS RMS). The
assistant's speech, as the Realtime API sends it in g711_ulaw, sits around TYPICAL_SPEECH_RMS_DBFS
(-20 dBFS RMS over an utterance; TTS voices are mastered loud, and the shim's espeak test phrases,
peak-normalized to -6 dBFS, measure -23/-27 dBFS). AMBIENCE_GAIN_DB = -2 dB puts the ambience at
-40 dBFS, 20 dB under that speech: clearly audible in pauses, never competing with words, and far
enough down that G.711's own quantisation noise (~-60 dBFS around speech) doesn't mask it either.

Cost. `BackgroundMixer.mix` runs on every assistant audio chunk, so it does no per-sample Python.
The mix of one sample is lin2ulaw(saturate(ulaw2lin(voice) + ambience at the gain)), and the
ambience at the gain is a function of its own mu-law byte: so the whole mix is a function of two
bytes, precomputed once per gain as a 256 x 256 table (64 KB, shared by every call; built with the
same ulaw2lin / saturating add / lin2ulaw, so the bytes are exactly those of mixing sample by
sample). A chunk is then one table lookup per sample in numpy, about half the time of
ulaw2lin -> audioop.add -> lin2ulaw (lin2ulaw searches segments per sample). The ambience's own
bytes are precomputed too, extended past the loop end so a chunk never needs to wrap; chunks
longer than that extension take the audioop path. `silence` is a slice of the precomputed mu-law
ambience. See tests/test_background.py for the numbers this module promises.
"""

from __future__ import annotations

import asyncio
import audioop
import binascii
import functools
import re
import urllib.parse
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Final

import httpx
import numpy as np

RATE: Final = 8000
FULL_SCALE: Final = 32768.0

AMBIENCE_FILE_RMS_DBFS: Final = -38.0  # level of every stored ambience (scripts/make_ambience.py)
TYPICAL_SPEECH_RMS_DBFS: Final = -20.0  # assistant speech as the Realtime API sends it
AMBIENCE_UNDER_SPEECH_DB: Final = 20.0  # how far under the voice the ambience should sit
AMBIENCE_GAIN_DB: float = TYPICAL_SPEECH_RMS_DBFS - AMBIENCE_UNDER_SPEECH_DB - AMBIENCE_FILE_RMS_DBFS  # -2.0

OFFICE_ASSET: Final = "office_ambience.ulaw"
MAX_AMBIENCE_SECONDS: Final = 60  # longer files are cut: a minute of loop is plenty, and bounds memory
_EXTENSION: Final = 2 * RATE  # samples of ambience repeated past the loop end: chunks up to 2 s never wrap
_URL_CACHE_SIZE: Final = 8
_SEAM_FADE_SECONDS: Final = 0.05  # crossfade of a fetched file's end into its start, so the loop doesn't click


class AmbienceError(ValueError):
    """A background sound could not be used. The message names the URL without its query string."""


# --------------------------------------------------------------------------------------------------
# The shipped office loop


def _assets_dir():
    try:
        return resources.files("shim").joinpath("assets")
    except (NotADirectoryError, TypeError, ValueError):
        # `shim` imported as a namespace package (no __init__.py) under an editable install:
        # importlib.resources can't build a path for it; the files sit next to this module.
        return Path(__file__).with_name("assets")


@functools.cache
def load_office_ambience() -> bytes:
    """The shipped office loop: raw mu-law, 8 kHz mono, 10 s, at AMBIENCE_FILE_RMS_DBFS."""
    return _assets_dir().joinpath(OFFICE_ASSET).read_bytes()


# --------------------------------------------------------------------------------------------------
# Mixing


@functools.lru_cache(maxsize=16)
def _prepare(ambience_ulaw: bytes, gain_db: float) -> tuple[np.ndarray, bytes]:
    """(int16 samples at the gain, mu-law of the same), both extended by _EXTENSION samples past
    the loop end (cyclically, so a loop shorter than the extension still works). Cached: every call
    with the same ambience object shares them (bytes cache their hash, so the lookup is cheap)."""
    n = len(ambience_ulaw)
    lin = np.frombuffer(audioop.ulaw2lin(ambience_ulaw, 2), dtype=np.int16)
    scaled = np.clip(np.rint(lin * 10 ** (gain_db / 20)), -32768, 32767).astype(np.int16)
    extended = np.resize(scaled, n + _EXTENSION)  # np.resize repeats cyclically
    extended.flags.writeable = False
    return extended, audioop.lin2ulaw(extended.tobytes(), 2)


@functools.lru_cache(maxsize=16)
def _mix_table(gain_db: float) -> np.ndarray:
    """mixed[voice << 8 | ambience] for every pair of mu-law bytes at this gain (see Cost above)."""
    codes = bytes(range(256))
    lin = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16)
    scaled = np.clip(np.rint(lin * 10 ** (gain_db / 20)), -32768, 32767).astype(np.int16)  # as _prepare
    pairs = [audioop.add(bytes(np.full(256, v, np.int16).data), scaled.tobytes(), 2) for v in lin.tolist()]
    table = np.frombuffer(audioop.lin2ulaw(b"".join(pairs), 2), dtype=np.uint8).copy()
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=16)
def _ambience_codes(ambience_ulaw: bytes) -> np.ndarray:
    """The ambience's mu-law bytes as uint16 (the low byte of a table index), extended like _prepare."""
    codes = np.resize(np.frombuffer(ambience_ulaw, dtype=np.uint8), len(ambience_ulaw) + _EXTENSION).astype(np.uint16)
    codes.flags.writeable = False
    return codes


_VOICE_INDEX = np.arange(256, dtype=np.uint16) << 8  # a voice byte -> the high byte of a table index


class BackgroundMixer:
    """Ambience for one call: mixes a looping ambience under the assistant's audio.

    The loop position belongs to the mixer, so create one per call; chunk boundaries don't matter
    (mixing a stream in any split gives the same bytes as mixing it whole)."""

    __slots__ = ("_n", "_pos", "_lin", "_lin_bytes", "_ulaw", "_codes", "_table")

    def __init__(self, ambience_ulaw: bytes, gain_db: float = AMBIENCE_GAIN_DB) -> None:
        if not ambience_ulaw:
            raise ValueError("ambience is empty")
        self._n = len(ambience_ulaw)
        self._pos = 0
        self._lin, self._ulaw = _prepare(bytes(ambience_ulaw), float(gain_db))
        self._lin_bytes = memoryview(self._lin).cast("B")  # zero-copy byte view for audioop
        self._codes = _ambience_codes(bytes(ambience_ulaw))
        self._table = _mix_table(float(gain_db))

    @property
    def position(self) -> int:
        """Samples into the loop where the next chunk starts."""
        return self._pos

    def _ambience_lin(self, k: int):
        """k samples of ambience (int16 bytes or a view of them) from the loop position; advances it."""
        p = self._pos
        self._pos = (p + k) % self._n
        if k <= _EXTENSION:
            return self._lin_bytes[2 * p : 2 * (p + k)]
        return self._lin[: self._n].take(np.arange(p, p + k), mode="wrap").tobytes()

    def mix(self, voice_ulaw: bytes) -> bytes:
        """The voice with the ambience added under it; mu-law in, mu-law out, same length."""
        k = len(voice_ulaw)
        if not k:
            return b""
        if k <= _EXTENSION:  # every chunk of a call: the table (same bytes as the path below)
            p = self._pos
            self._pos = (p + k) % self._n
            index = _VOICE_INDEX.take(np.frombuffer(voice_ulaw, dtype=np.uint8))
            index |= self._codes[p : p + k]
            return self._table.take(index).tobytes()
        voice = audioop.ulaw2lin(voice_ulaw, 2)
        # audioop.add saturates at the int16 limits instead of wrapping: that's the clipping protection.
        return audioop.lin2ulaw(audioop.add(voice, self._ambience_lin(k), 2), 2)

    def mix_b64(self, voice_b64: str) -> str:
        """`mix` for base64 payloads, as the Realtime API sends them and Twilio expects them."""
        voice = binascii.a2b_base64(voice_b64)
        k = len(voice)
        if 0 < k <= _EXTENSION:  # mix's table path, inlined: this runs for every chunk of every call
            p = self._pos
            self._pos = (p + k) % self._n
            index = _VOICE_INDEX.take(np.frombuffer(voice, dtype=np.uint8))
            index |= self._codes[p : p + k]
            return binascii.b2a_base64(self._table.take(index), newline=False).decode("ascii")
        return binascii.b2a_base64(self.mix(voice), newline=False).decode("ascii")

    def silence(self, n_bytes: int) -> bytes:
        """n_bytes of ambience alone (what `mix` gives for mu-law silence), e.g. to fill gaps."""
        if n_bytes <= 0:
            return b""
        p = self._pos
        if n_bytes <= _EXTENSION:
            self._pos = (p + n_bytes) % self._n
            return self._ulaw[p : p + n_bytes]
        return audioop.lin2ulaw(self._ambience_lin(n_bytes), 2)


# --------------------------------------------------------------------------------------------------
# Fetching a background sound from a URL


_URL_CACHE: OrderedDict[str, bytes] = OrderedDict()


def clear_ambience_cache() -> None:
    _URL_CACHE.clear()


def public_url(url: str) -> str:
    """The URL as it may appear in messages and logs: no query string, fragment or user:password@
    (any of which could carry a token)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = parts.port
        netloc = f"{host}:{port}" if port is not None else host
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        cut = re.split(r"[?#]", url, maxsplit=1)[0]
        return re.sub(r"//[^/@]*@", "//", cut)


async def ambience_for(background_sound: str | None, client: httpx.AsyncClient) -> bytes | None:
    """The ambience for a `backgroundSound` value: None for "off"; the office loop for "office" or
    None (Vapi's default on phone calls); a fetched file for an http(s) URL. Raises AmbienceError."""
    if background_sound == "off":
        return None
    if background_sound is None or background_sound == "office":
        return load_office_ambience()
    return await fetch_ambience(background_sound, client)


async def fetch_ambience(
    url: str, client: httpx.AsyncClient, *, max_bytes: int = 5_000_000, timeout: float = 5.0
) -> bytes:
    """Download a background sound and return it as mu-law 8 kHz mono at the office loop's loudness.

    Reads WAV (PCM 8/16/24/32-bit, float, mu-law or A-law; any rate; any channel count, downmixed),
    Sun .au, and raw .ulaw/.mulaw (8 kHz). Anything else (MP3, Ogg, ...) raises AmbienceError, as do
    HTTP errors, timeouts (`timeout` bounds the whole download), bodies over `max_bytes` and silent
    audio. Results are cached per URL (the last few); failures are not."""
    cached = _URL_CACHE.get(url)
    if cached is not None:
        _URL_CACHE.move_to_end(url)
        return cached
    safe = public_url(url)
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme not in ("http", "https"):
        raise AmbienceError(f"background sound {safe}: not a valid http(s) URL")
    try:
        async with asyncio.timeout(timeout):
            data, content_type = await _download(url, safe, client, max_bytes, timeout)
    except TimeoutError:
        raise AmbienceError(f"background sound {safe}: download timed out after {timeout:g} s") from None
    except httpx.TimeoutException:
        raise AmbienceError(f"background sound {safe}: download timed out after {timeout:g} s") from None
    except httpx.HTTPError as exc:
        detail = str(exc).replace(url, safe)
        detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise AmbienceError(f"background sound {safe}: download failed ({detail})") from None
    # Decoding a long 48 kHz file takes tens of ms: keep it off the event loop that relays audio.
    ulaw = await asyncio.to_thread(decode_ambience, data, safe, content_type)
    _URL_CACHE[url] = ulaw
    while len(_URL_CACHE) > _URL_CACHE_SIZE:
        _URL_CACHE.popitem(last=False)
    return ulaw


async def _download(
    url: str, safe: str, client: httpx.AsyncClient, max_bytes: int, timeout: float
) -> tuple[bytes, str]:
    too_large = f"background sound {safe}: larger than {max_bytes:,} bytes"
    async with client.stream("GET", url, follow_redirects=True, timeout=timeout) as resp:
        if resp.status_code != 200:
            reason = f" {resp.reason_phrase}" if resp.reason_phrase else ""
            raise AmbienceError(f"background sound {safe}: HTTP {resp.status_code}{reason}")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise AmbienceError(too_large)
        body = bytearray()
        async for chunk in resp.aiter_bytes():  # decoded: the limit holds for gzip bombs too
            body += chunk
            if len(body) > max_bytes:
                raise AmbienceError(too_large)
        return bytes(body), resp.headers.get("content-type", "")


# --------------------------------------------------------------------------------------------------
# Decoding


_DECODERS_WE_LACK = (
    (lambda d: d[:3] == b"ID3", "MP3"),
    (lambda d: d[:4] == b"OggS", "Ogg (Vorbis/Opus)"),
    (lambda d: d[:4] == b"fLaC", "FLAC"),
    (lambda d: d[4:8] == b"ftyp", "MP4/M4A"),
    (lambda d: d[:4] == b"\x1aE\xdf\xa3", "WebM/Matroska"),
    (lambda d: d[:4] == b"FORM" and d[8:12] in (b"AIFF", b"AIFC"), "AIFF"),
    (lambda d: d[:4] == b"#!AM", "AMR"),
    (lambda d: len(d) > 1 and d[0] == 0xFF and d[1] & 0xF6 == 0xF0, "AAC (ADTS)"),
    (lambda d: len(d) > 1 and d[0] == 0xFF and d[1] & 0xE0 == 0xE0, "MP3"),
)


def decode_ambience(data: bytes, source: str = "", content_type: str = "") -> bytes:
    """Audio file bytes -> mu-law 8 kHz mono, at most MAX_AMBIENCE_SECONDS, at AMBIENCE_FILE_RMS_DBFS,
    its end crossfaded into its start. `source` (a query-less URL or a file name) names the file in
    error messages, and its extension marks raw mu-law (.ulaw/.mulaw/.ul)."""
    where = f"background sound {source}".rstrip()
    path = urllib.parse.urlsplit(source).path.lower() if "://" in source else source.lower()
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        samples, rate = _read_wav(data, where)
    elif data[:4] == b".snd":
        samples, rate = _read_au(data, where)
    elif path.endswith((".ulaw", ".mulaw", ".ul", ".u8")) or content_type.split(";")[0].strip() == "audio/basic":
        samples, rate = _mono(np.frombuffer(audioop.ulaw2lin(data, 2), np.int16), 1), RATE
    else:
        for test, name in _DECODERS_WE_LACK:
            if test(data):
                raise AmbienceError(f"{where}: expected a WAV file; {name} needs a decoder the shim does not ship")
        if path.endswith(".mp3"):
            raise AmbienceError(f"{where}: expected a WAV file; MP3 needs a decoder the shim does not ship")
        kind = content_type.split(";")[0].strip() or "unknown content"
        raise AmbienceError(f"{where}: expected a WAV file; got {kind}, which is not audio the shim can read")
    return _to_ambience(samples, rate, where)


def _mono(frames: np.ndarray, channels: int) -> np.ndarray:
    """Interleaved samples -> float64 mono (channel mean), int16 scale."""
    frames = frames[: frames.size - frames.size % channels]
    x = frames.astype(np.float64)
    return x if channels == 1 else x.reshape(-1, channels).mean(axis=1)


def _read_wav(data: bytes, where: str) -> tuple[np.ndarray, int]:
    fmt = pcm = None
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + size]  # a streaming writer's bogus size: take what is there
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            pcm = body
        if fmt is not None and pcm is not None:
            break
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16 or pcm is None:
        raise AmbienceError(f"{where}: not a valid WAV file (no fmt or data chunk)")
    tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the subformat GUID
        tag = int.from_bytes(fmt[24:26], "little")
    if not 1 <= channels <= 32 or not 1000 <= rate <= 384_000:
        raise AmbienceError(f"{where}: unsupported WAV ({channels} channels at {rate} Hz)")
    # Cut long files before converting anything (bounds CPU and memory).
    width = max(bits // 8, 1)
    pcm = pcm[: MAX_AMBIENCE_SECONDS * rate * channels * width]
    pcm = pcm[: len(pcm) - len(pcm) % (channels * width)]
    if tag == 1 and bits == 8:
        x = (np.frombuffer(pcm, np.uint8).astype(np.int16) - 128) * 256
    elif tag == 1 and bits == 16:
        x = np.frombuffer(pcm, "<i2")
    elif tag == 1 and bits == 24:
        b = np.frombuffer(pcm, np.uint8).reshape(-1, 3).astype(np.int32)
        x = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) ^ 0x800000) - 0x800000) / 256.0
    elif tag == 1 and bits == 32:
        x = np.frombuffer(pcm, "<i4") / 65536.0
    elif tag == 3 and bits in (32, 64):
        x = np.nan_to_num(np.frombuffer(pcm, "<f4" if bits == 32 else "<f8")) * FULL_SCALE
    elif tag == 7 and bits == 8:
        x = np.frombuffer(audioop.ulaw2lin(pcm, 2), np.int16)
    elif tag == 6 and bits == 8:
        x = np.frombuffer(audioop.alaw2lin(pcm, 2), np.int16)
    else:
        raise AmbienceError(f"{where}: unsupported WAV encoding (format {tag:#06x}, {bits}-bit)")
    return _mono(x, channels), rate


def _read_au(data: bytes, where: str) -> tuple[np.ndarray, int]:
    if len(data) < 24:
        raise AmbienceError(f"{where}: not a valid .au file")
    offset, size, encoding, rate, channels = (int.from_bytes(data[i : i + 4], "big") for i in range(4, 24, 4))
    body = data[offset:] if size == 0xFFFFFFFF else data[offset : offset + size]
    if not 1 <= channels <= 32 or not 1000 <= rate <= 384_000:
        raise AmbienceError(f"{where}: unsupported .au ({channels} channels at {rate} Hz)")
    body = body[: MAX_AMBIENCE_SECONDS * rate * channels * 4]
    if encoding == 1:
        x = np.frombuffer(audioop.ulaw2lin(body, 2), np.int16)
    elif encoding == 27:
        x = np.frombuffer(audioop.alaw2lin(body, 2), np.int16)
    elif encoding == 2:
        x = np.frombuffer(body, np.int8).astype(np.int16) * 256
    elif encoding == 3:
        x = np.frombuffer(body[: len(body) // 2 * 2], ">i2")
    elif encoding == 6:
        x = np.nan_to_num(np.frombuffer(body[: len(body) // 4 * 4], ">f4")) * FULL_SCALE
    else:
        raise AmbienceError(f"{where}: unsupported .au encoding {encoding}")
    return _mono(x, channels), rate


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _lowpass(x: np.ndarray, rate: int, cutoff: float = 3600.0, edge: float = 400.0) -> np.ndarray:
    """Anti-alias filter before audioop.ratecv (which doesn't filter): FFT, raised-cosine edge."""
    n = 1 << (x.size + 1024 - 1).bit_length()  # zero-padded: linear, not circular, and a fast size
    spec = np.fft.rfft(x, n)
    f = np.fft.rfftfreq(n, 1 / rate)
    spec *= 0.5 * (1 + np.cos(np.pi * np.clip((f - (cutoff - edge / 2)) / edge, 0, 1)))
    return np.fft.irfft(spec, n)[: x.size]


def _to_ambience(x: np.ndarray, rate: int, where: str) -> bytes:
    x = x[: MAX_AMBIENCE_SECONDS * rate]
    if x.size < rate // 10:
        raise AmbienceError(f"{where}: audio is shorter than 0.1 s")
    if rate > RATE:
        x = _lowpass(x, rate)
    target = FULL_SCALE * 10 ** (AMBIENCE_FILE_RMS_DBFS / 20)
    level = _rms(x)
    if level < 1.0:  # under -90 dBFS: nothing to loop
        raise AmbienceError(f"{where}: audio is silent")
    x = x * (target / level)  # normalize before quantising, so quiet files keep their resolution
    if rate != RATE:
        pcm, _ = audioop.ratecv(np.clip(np.rint(x), -32768, 32767).astype(np.int16).tobytes(), 2, 1, rate, RATE, None)
        x = np.frombuffer(pcm, np.int16).astype(np.float64)
    fade = int(_SEAM_FADE_SECONDS * RATE)
    if x.size > 4 * fade:
        # Loop seam: the last `fade` samples fade out while the first fade in over them (equal
        # power: ambience is mostly uncorrelated noise), then the overlap is dropped, so the loop's
        # end runs into its start with no step. The loop is `fade` samples shorter than the file.
        ramp = np.linspace(0.0, np.pi / 2, fade, endpoint=False)
        head = x[:fade] * np.sin(ramp) + x[-fade:] * np.cos(ramp)
        x = np.concatenate([head, x[fade:-fade]])
    level = _rms(x)
    if level < 1.0:
        raise AmbienceError(f"{where}: audio is silent")
    x *= target / level
    return audioop.lin2ulaw(np.clip(np.rint(x), -32768, 32767).astype(np.int16).tobytes(), 2)


__all__ = [
    "AMBIENCE_FILE_RMS_DBFS",
    "AMBIENCE_GAIN_DB",
    "AmbienceError",
    "BackgroundMixer",
    "ambience_for",
    "clear_ambience_cache",
    "decode_ambience",
    "fetch_ambience",
    "load_office_ambience",
    "public_url",
]
