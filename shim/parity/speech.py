"""`say:` turns as caller audio: OpenAI's speech endpoint, rendered once and cached on disk.

``POST {OPENAI_BASE_URL}/audio/speech`` (https://platform.openai.com/docs/api-reference/audio/createSpeech)
with ``response_format: "pcm"`` answers raw 24 kHz 16-bit mono PCM; it is resampled to 8 kHz and
encoded as mu-law (what Twilio carries). The cache key is (model, voice, text), so a scenario run 50
times on two stacks costs one request per sentence.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import httpx

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

TTS_MODEL = os.environ.get("SHIM_PARITY_TTS_MODEL", "gpt-4o-mini-tts")
TTS_VOICE = os.environ.get("SHIM_PARITY_TTS_VOICE", "alloy")


class SpeechError(RuntimeError):
    pass


def pcm24k_to_ulaw8k(pcm: bytes) -> bytes:
    if len(pcm) % 2:
        pcm = pcm[:-1]
    down, _ = audioop.ratecv(pcm, 2, 1, 24000, 8000, None)
    return audioop.lin2ulaw(down, 2)


async def render(text: str, *, base_url: str, api_key: str, cache_dir: Path, client: httpx.AsyncClient,
                 model: str = TTS_MODEL, voice: str = TTS_VOICE) -> bytes:
    key = hashlib.sha256(f"{model}\0{voice}\0{text}".encode()).hexdigest()[:32]
    path = cache_dir / f"{key}.ulaw"
    if path.is_file():
        return path.read_bytes()
    try:
        resp = await client.post(f"{base_url.rstrip('/')}/audio/speech",
                                 json={"model": model, "voice": voice, "input": text, "response_format": "pcm"},
                                 headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
    except httpx.HTTPError as exc:
        raise SpeechError(f"POST {base_url}/audio/speech failed: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise SpeechError(f"POST {base_url}/audio/speech -> {resp.status_code}: {resp.text[:200]}")
    ulaw = pcm24k_to_ulaw8k(resp.content)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(ulaw)
    os.replace(tmp, path)
    return ulaw
