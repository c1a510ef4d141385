"""A local stand-in for OpenAI's speech endpoint (``POST /v1/audio/speech``), as `shim parity run`
uses it to render `say:` turns.

Requests are validated with the openai SDK's own request type (`SpeechCreateParams`, a TypedDict,
checked with pydantic, unknown keys refused); a missing or wrong ``Authorization: Bearer`` gets
401, a bad body 400 in OpenAI's error shape. ``response_format: "pcm"`` answers raw 24 kHz 16-bit
mono PCM (as the real endpoint does), ``"wav"`` the same in a WAV container. The "speech" is a
voiced two-tone hum, `ms_per_char` long per character (bounded), so energy-based turn detection
on the other side hears a caller. ``requests`` lists every request (to check the cache).
"""

from __future__ import annotations

import io
import math
import wave
from typing import Any

import numpy as np
import pydantic
from openai.types.audio.speech_create_params import SpeechCreateParams
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shim.testing._serve import LocalServer, ServedStandIn

_PARAMS = pydantic.TypeAdapter(SpeechCreateParams)
_KNOWN = frozenset(SpeechCreateParams.__annotations__)


def speech_pcm24k(ms: int) -> bytes:
    t = np.arange(int(24 * ms)) / 24000
    wave_ = 0.25 * np.sin(2 * math.pi * 180 * t) + 0.15 * np.sin(2 * math.pi * 720 * t)
    return (wave_ * 32767).astype("<i2").tobytes()


class FakeOpenAISpeech(ServedStandIn):
    def __init__(self, *, api_key: str = "test-openai-key", ms_per_char: float = 12.0, min_ms: int = 300, max_ms: int = 1200):
        self.api_key = api_key
        self.ms_per_char, self.min_ms, self.max_ms = ms_per_char, min_ms, max_ms
        self.requests: list[dict[str, Any]] = []
        self.base_url = ""
        self._http: LocalServer | None = None
        self.app = Starlette(routes=[Route("/v1/audio/speech", self._speech, methods=["POST"])])

    async def start(self) -> str:
        self._http = LocalServer(self.app, "fake OpenAI speech server")
        self.base_url = (await self._http.start()) + "/v1"
        return self.base_url

    async def _speech(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = await request.json()
            _PARAMS.validate_python(body)
            unknown = set(body) - _KNOWN
            if unknown:
                raise ValueError(f"unknown parameters {sorted(unknown)}")
        except (ValueError, pydantic.ValidationError) as exc:
            return _error(400, f"Invalid request: {str(exc)[:300]}", "invalid_request_error")
        self.requests.append(body)
        ms = int(min(self.max_ms, max(self.min_ms, len(body["input"]) * self.ms_per_char)))
        pcm = speech_pcm24k(ms)
        fmt = body.get("response_format", "mp3")
        if fmt == "pcm":
            return Response(pcm, media_type="audio/pcm")
        if fmt == "wav":
            buf = io.BytesIO()
            with wave.open(buf, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(24000)
                w.writeframes(pcm)
            return Response(buf.getvalue(), media_type="audio/wav")
        return _error(400, f"this stand-in serves pcm and wav, not {fmt!r}", "invalid_request_error")


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=status)
