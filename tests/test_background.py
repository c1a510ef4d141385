"""shim.background: the office loop asset, the per-call mixer, and fetching a background sound by URL."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import warnings
import wave
from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # stdlib audioop on 3.11/3.12
    import audioop

from shim.background import (
    AMBIENCE_FILE_RMS_DBFS,
    AMBIENCE_GAIN_DB,
    AmbienceError,
    BackgroundMixer,
    ambience_for,
    clear_ambience_cache,
    decode_ambience,
    fetch_ambience,
    load_office_ambience,
    public_url,
)

RATE = 8000


def lin(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(audioop.ulaw2lin(ulaw, 2), np.int16).astype(np.float64)


def ulaw(samples: np.ndarray) -> bytes:
    return audioop.lin2ulaw(np.clip(np.rint(samples), -32768, 32767).astype(np.int16).tobytes(), 2)


def dbfs(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x))) / 32768)


def tone(seconds: float, hz: float = 440.0, rms_dbfs: float = -20.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 32768 * 10 ** (rms_dbfs / 20) * np.sqrt(2) * np.sin(2 * np.pi * hz * t)


SPEECH = ulaw(tone(1.0))  # a speech-level test signal: -20 dBFS RMS


# --------------------------------------------------------------------------------------------------
# The asset


def test_office_asset_loads_and_is_a_quiet_loop_of_whole_frames() -> None:
    amb = load_office_ambience()
    assert load_office_ambience() is amb  # cached
    assert 8 * RATE < len(amb) <= 12 * RATE and len(amb) < 100_000
    assert len(amb) % 160 == 0  # whole 20 ms frames
    assert dbfs(lin(amb)) == pytest.approx(AMBIENCE_FILE_RMS_DBFS, abs=0.5)


def test_office_asset_loops_without_a_step() -> None:
    x = lin(load_office_ambience())
    assert abs(x[0] - x[-1]) <= np.percentile(np.abs(np.diff(x)), 99.9)


# --------------------------------------------------------------------------------------------------
# Mixing


@pytest.mark.parametrize("n", [0, 1, 159, 160, 800, 12_345, 40_001])
def test_mix_preserves_length(n: int) -> None:
    voice = (SPEECH * 41)[:n]
    assert len(BackgroundMixer(load_office_ambience()).mix(voice)) == n


def test_mix_adds_ambience_and_the_voice_stays_dominant() -> None:
    mixed = BackgroundMixer(load_office_ambience()).mix(SPEECH)
    assert mixed != SPEECH
    voice = lin(SPEECH)
    added = lin(mixed) - voice
    # The ambience sits ~20 dB under speech-level audio: -38 dBFS file, -2 dB gain, -20 dBFS voice.
    assert dbfs(voice) - dbfs(added) == pytest.approx(20.0, abs=1.5)
    assert dbfs(added) == pytest.approx(AMBIENCE_FILE_RMS_DBFS + AMBIENCE_GAIN_DB, abs=1.5)


def test_gain_db_sets_the_level() -> None:
    amb = load_office_ambience()
    quiet = lin(BackgroundMixer(amb, gain_db=-12.0).silence(RATE))
    normal = lin(BackgroundMixer(amb, gain_db=0.0).silence(RATE))
    assert dbfs(normal) - dbfs(quiet) == pytest.approx(12.0, abs=0.5)


def test_chunk_boundaries_do_not_matter() -> None:
    voice = SPEECH * 3
    whole = BackgroundMixer(load_office_ambience()).mix(voice)
    m = BackgroundMixer(load_office_ambience())
    assert m.mix(voice[:7_777]) + m.mix(voice[7_777:]) == whole
    m = BackgroundMixer(load_office_ambience())
    sizes = [160, 800, 1, 3_333, 159, 20_000]
    parts, i = [], 0
    for size in sizes * 10:
        if i >= len(voice):
            break
        parts.append(m.mix(voice[i : i + size]))
        i += size
    assert b"".join(parts) == whole


def test_each_mixer_keeps_its_own_loop_position() -> None:
    amb = load_office_ambience()
    a, b = BackgroundMixer(amb), BackgroundMixer(amb)
    a.mix(SPEECH[:800])
    assert (a.position, b.position) == (800, 0)
    assert b.mix(SPEECH[:800]) == BackgroundMixer(amb).mix(SPEECH[:800])


def test_the_loop_wraps_around() -> None:
    rng = np.random.default_rng(1)
    amb = ulaw(rng.normal(0, 2000, 1_000))
    canon = np.frombuffer(ulaw(lin(amb)), np.uint8)  # what a 0 dB mix of silence gives back
    expected = np.resize(canon, 50_000).tobytes()  # the loop, repeated
    m = BackgroundMixer(amb, gain_db=0.0)
    got = b"".join(m.mix(b"\xff" * 700) for _ in range(5))  # 3_500 bytes: wraps three times
    assert got == expected[:3_500]
    assert m.position == 3_500 % 1_000
    got += m.mix(b"\xff" * 40_000)  # longer than the precomputed extension: the slow path
    got += m.silence(6_500)
    assert got == expected


def test_office_loop_wraps_seamlessly_in_the_mixer() -> None:
    amb = load_office_ambience()
    m = BackgroundMixer(amb, gain_db=0.0)
    first = m.silence(len(amb) - 100)
    across = m.silence(200)  # the last 100 samples of the loop, then its first 100
    assert across == amb[-100:] + amb[:100]
    assert first == amb[:-100]


def test_silence_is_the_ambience_alone_quiet_but_present() -> None:
    amb = load_office_ambience()
    fill = BackgroundMixer(amb).silence(RATE)
    assert fill == BackgroundMixer(amb).mix(b"\xff" * RATE)
    assert len(fill) == RATE and set(fill) != {0xFF}
    assert -44 < dbfs(lin(fill)) < -36
    assert BackgroundMixer(amb).silence(0) == b""


def test_loud_voice_clips_instead_of_wrapping() -> None:
    # Full-scale square wave plus loud ambience: the sum must saturate at the int16 limits.
    square = np.where(np.arange(RATE) % 40 < 20, 32767, -32768).astype(np.float64)
    amb = load_office_ambience()
    mixed = BackgroundMixer(amb, gain_db=12.0).mix(ulaw(square))
    ambience = np.clip(np.rint(lin(amb)[:RATE] * 10 ** (12 / 20)), -32768, 32767)  # as the mixer holds it
    assert mixed == ulaw(np.clip(lin(ulaw(square)) + ambience, -32768, 32767))
    assert np.all(np.sign(lin(mixed)) == np.sign(square))


@pytest.mark.parametrize("gain_db", [-2.0, 12.0, -30.0])
def test_mix_table_gives_the_bytes_of_mixing_sample_by_sample(gain_db: float) -> None:
    """Every (voice byte, ambience byte) pair: the precomputed table (chunks up to 2 s) gives
    exactly lin2ulaw(saturate(voice + ambience at the gain)), as the audioop path (longer
    chunks) does."""
    amb = bytes(range(256)) * 256  # ambience byte i % 256 under voice byte i // 256: all pairs
    voice = bytes(v for v in range(256) for _ in range(256))
    ambience = np.clip(np.rint(lin(amb) * 10 ** (gain_db / 20)), -32768, 32767)
    expected = ulaw(np.clip(lin(voice) + ambience, -32768, 32767))
    m = BackgroundMixer(amb, gain_db=gain_db)
    assert b"".join(m.mix(voice[i : i + 8_000]) for i in range(0, len(voice), 8_000)) == expected  # table
    assert BackgroundMixer(amb, gain_db=gain_db).mix(voice) == expected  # 65,536 bytes: the audioop path


def test_mix_b64() -> None:
    amb = load_office_ambience()
    payload = base64.b64encode(SPEECH[:800]).decode()
    out = BackgroundMixer(amb).mix_b64(payload)
    assert isinstance(out, str)
    assert base64.b64decode(out) == BackgroundMixer(amb).mix(SPEECH[:800])


def test_empty_ambience_is_refused() -> None:
    with pytest.raises(ValueError):
        BackgroundMixer(b"")


# --------------------------------------------------------------------------------------------------
# Fetching


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> bytes:
    """samples: (frames,) or (frames, channels), int16 scale."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.clip(np.rint(samples / 256), -128, 127) + 128).astype(np.uint8).tobytes())
        else:
            w.writeframes(np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes())
    return buf.getvalue()


STEREO_16K = wav_bytes(np.stack([tone(1.0, 440, -12, 16_000), tone(1.0, 440, -30, 16_000)], axis=1), 16_000, 2)
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(400)


class Server:
    """A tiny in-process HTTP server (Starlette over httpx.ASGITransport) that counts requests."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.app = Starlette(routes=[Route("/{name}", self.serve)])

    async def serve(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name == "stereo16k.wav":
            return Response(STEREO_16K, media_type="audio/wav")
        if name == "hold.mp3":
            return Response(MP3, media_type="audio/mpeg")
        if name == "page.wav":
            return Response(b"<!doctype html><title>Sign in</title>", media_type="text/html")
        if name == "loop.ulaw":
            return Response(ulaw(tone(2.0, 300, -10)), media_type="application/octet-stream")
        if name == "slow.wav":
            await asyncio.sleep(2)
            return Response(STEREO_16K, media_type="audio/wav")
        return Response(b"not found", status_code=404)


@pytest.fixture
def server() -> Iterator[Server]:
    clear_ambience_cache()
    yield Server()
    clear_ambience_cache()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://127.0.0.1") as c:
        yield c


async def test_fetch_wav_16k_stereo_becomes_8k_mono_mulaw_at_office_loudness(client, server) -> None:
    amb = await fetch_ambience("http://127.0.0.1/stereo16k.wav", client)
    # 1 s at 16 kHz -> 8,000 samples at 8 kHz, minus the 50 ms (400-sample) crossfade of the loop seam.
    assert len(amb) == RATE - 400
    x = lin(amb)
    assert dbfs(x) == pytest.approx(dbfs(lin(load_office_ambience())), abs=0.5)
    spectrum = np.abs(np.fft.rfft(x))
    assert np.fft.rfftfreq(x.size, 1 / RATE)[spectrum.argmax()] == pytest.approx(440, abs=2)
    # usable as-is
    assert len(BackgroundMixer(amb).mix(SPEECH)) == len(SPEECH)


async def test_fetch_is_cached_per_url(client, server) -> None:
    first = await fetch_ambience("http://127.0.0.1/stereo16k.wav", client)
    assert await fetch_ambience("http://127.0.0.1/stereo16k.wav", client) is first
    assert server.hits["stereo16k.wav"] == 1


async def test_fetch_raw_ulaw_by_extension(client) -> None:
    amb = await fetch_ambience("http://127.0.0.1/loop.ulaw", client)
    assert len(amb) == 2 * RATE - 400
    assert dbfs(lin(amb)) == pytest.approx(AMBIENCE_FILE_RMS_DBFS, abs=0.5)


async def test_fetch_mp3_is_refused_with_a_reason(client, server) -> None:
    with pytest.raises(AmbienceError, match="expected a WAV file; MP3 needs a decoder the shim does not ship"):
        await fetch_ambience("http://127.0.0.1/hold.mp3", client)
    with pytest.raises(AmbienceError, match="not audio"):
        await fetch_ambience("http://127.0.0.1/page.wav", client)
    # failures are not cached
    with pytest.raises(AmbienceError):
        await fetch_ambience("http://127.0.0.1/hold.mp3", client)
    assert server.hits["hold.mp3"] == 2


async def test_fetch_404_names_the_url_without_its_query_string(client) -> None:
    with pytest.raises(AmbienceError) as err:
        await fetch_ambience("http://127.0.0.1/missing.wav?token=s3cret&sig=abc#frag", client)
    msg = str(err.value)
    assert "http://127.0.0.1/missing.wav" in msg and "404" in msg
    assert "s3cret" not in msg and "?" not in msg and "frag" not in msg


async def test_fetch_too_large_and_timeout(client) -> None:
    with pytest.raises(AmbienceError, match="larger than 1,000 bytes"):
        await fetch_ambience("http://127.0.0.1/stereo16k.wav?k=v", client, max_bytes=1_000)
    with pytest.raises(AmbienceError, match="timed out after 0.1 s") as err:
        await fetch_ambience("http://127.0.0.1/slow.wav?k=v", client, timeout=0.1)
    assert "k=v" not in str(err.value)


async def test_fetch_refuses_other_schemes_and_reports_connection_errors() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(AmbienceError, match="not a valid http"):
            await fetch_ambience("file:///etc/passwd", client)
        with socket.socket() as s:  # a port nothing listens on: connection refused at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(AmbienceError, match="download failed") as err:
            await fetch_ambience(f"http://127.0.0.1:{port}/x.wav?token=s3cret", client, timeout=2)
        assert "s3cret" not in str(err.value)


async def test_ambience_for(client) -> None:
    assert await ambience_for("off", client) is None
    assert await ambience_for("office", client) is load_office_ambience()
    assert await ambience_for(None, client) is load_office_ambience()
    assert len(await ambience_for("http://127.0.0.1/stereo16k.wav", client)) == RATE - 400


def test_public_url_strips_secrets() -> None:
    assert public_url("https://user:pw@Example.com:8443/a/b.wav?X-Amz-Signature=1#t") == "https://example.com:8443/a/b.wav"
    assert public_url("https://cdn.example.com/x.wav") == "https://cdn.example.com/x.wav"


@pytest.mark.parametrize(
    "data",
    [
        wav_bytes(tone(0.5, 500, -6, 44_100), 44_100, width=1),  # 8-bit unsigned, 44.1 kHz
        wav_bytes(tone(0.5, 500, -50, 8_000), 8_000),  # very quiet: normalized up
        # Sun .au header: magic, data offset, data bytes, encoding 3 (16-bit PCM), rate, channels
        b".snd" + b"".join(v.to_bytes(4, "big") for v in (24, 16_000, 3, 16_000, 1))
        + tone(0.5, 500, -6, 16_000).astype(">i2").tobytes(),
    ],
    ids=["wav-8bit-44k", "wav-quiet", "au-16bit-16k"],
)
def test_decode_formats(data: bytes) -> None:
    amb = decode_ambience(data, "x")
    assert len(amb) == RATE // 2 - 400
    x = lin(amb)
    assert dbfs(x) == pytest.approx(AMBIENCE_FILE_RMS_DBFS, abs=0.5)
    assert np.fft.rfftfreq(x.size, 1 / RATE)[np.abs(np.fft.rfft(x)).argmax()] == pytest.approx(500, abs=3)


def test_decode_refuses_silence_and_other_codecs() -> None:
    with pytest.raises(AmbienceError, match="silent"):
        decode_ambience(wav_bytes(np.zeros(8_000), 8_000), "x")
    with pytest.raises(AmbienceError, match="Ogg"):
        decode_ambience(b"OggS" + bytes(100), "x")
    with pytest.raises(AmbienceError, match="MP3"):
        decode_ambience(bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(100), "https://h/x")
