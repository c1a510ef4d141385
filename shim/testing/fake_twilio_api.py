"""A local stand-in of Twilio's REST API (the parts the shim calls), served on 127.0.0.1.

It checks HTTP Basic auth like Twilio, answers in Twilio's JSON shapes, and records every
request so tests can assert what the shim asked for."""

from __future__ import annotations

import base64
import io
import re
import secrets
import wave
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shim.testing._serve import LocalServer


@dataclass
class Seen:
    method: str
    path: str
    form: dict[str, str]


@dataclass
class FakeTwilioApi:
    account_sid: str
    auth_token: str
    requests: list[Seen] = field(default_factory=list)
    fail_status: int | None = None  # answer every request with this error status
    url: str = ""
    # Recordings this account holds: sid -> (call sid, seconds of audio); media is served for them.
    recordings: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._http: LocalServer | None = None

    def _authorized(self, request: Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return secrets.compare_digest(request.headers.get("authorization", ""), f"Basic {expected}")

    async def _recordings(self, request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        self.requests.append(Seen(request.method, request.url.path, form))
        if not self._authorized(request):
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
        if self.fail_status:
            return JSONResponse({"code": 21220, "message": "Call is not in-progress", "status": self.fail_status},
                                status_code=self.fail_status)
        account, call = request.path_params["account"], request.path_params["call"]
        sid = self.add_recording(call)
        return JSONResponse(
            {
                "account_sid": account, "api_version": "2010-04-01", "call_sid": call, "sid": sid,
                "conference_sid": None, "channels": 2 if form.get("RecordingChannels") == "dual" else 1,
                "status": "in-progress", "source": "StartCallRecordingAPI", "start_time": None,
                "date_created": None, "date_updated": None, "duration": None, "price": None,
                "price_unit": None, "error_code": None, "track": form.get("RecordingTrack", "both"),
                "uri": f"/2010-04-01/Accounts/{account}/Calls/{call}/Recordings/{sid}.json",
                "encryption_details": None,
            },
            status_code=201,
        )

    def add_recording(self, call_sid: str, seconds: float = 1.0) -> str:
        """A completed recording of `call_sid` whose media this stand-in serves; returns its sid."""
        sid = "RE" + secrets.token_hex(16)
        self.recordings[sid] = (call_sid, seconds)
        return sid

    def media(self, sid: str, fmt: str) -> bytes:
        """The bytes served for a recording: a dual-channel 8 kHz 16-bit WAV (as Twilio's .wav),
        or for .mp3 an ID3-tagged stand-in (no MP3 encoder here; nothing decodes it)."""
        call_sid, seconds = self.recordings[sid]
        if fmt == "mp3":
            return b"ID3\x04\x00\x00\x00\x00\x00\x00" + sid.encode() + bytes(1024)
        frames = int(8000 * seconds)
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(8000)
            # left (caller) and right (assistant) differ, so a test can tell the channels apart
            w.writeframes(b"".join((i % 200).to_bytes(2, "little") + (-(i % 200)).to_bytes(2, "little", signed=True)
                                   for i in range(frames)))
        return buf.getvalue()

    async def _recording_media(self, request: Request) -> Response:
        self.requests.append(Seen(request.method, request.url.path, {}))
        if not self._authorized(request):
            return JSONResponse({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003",
                                 "status": 401}, status_code=401)
        sid, fmt = request.path_params["sid"], request.path_params["fmt"]
        if self.fail_status:
            return JSONResponse({"code": 20500, "message": "Internal Server Error", "status": self.fail_status},
                                status_code=self.fail_status)
        if sid not in self.recordings or fmt not in ("wav", "mp3"):
            return JSONResponse({"code": 20404, "message": f"The requested resource {request.url.path} was not found",
                                 "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}, status_code=404)
        body = self.media(sid, fmt)
        media_type = "audio/x-wav" if fmt == "wav" else "audio/mpeg"
        headers = {"Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("range", "").strip())
        if match and (match.group(1) or match.group(2)):
            first, last = match.group(1), match.group(2)
            if first:
                start, end = int(first), min(int(last) if last else len(body) - 1, len(body) - 1)
            else:  # suffix range: the last N bytes
                start, end = max(0, len(body) - int(last)), len(body) - 1
            if start >= len(body) or start > end:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            return Response(body[start:end + 1], status_code=206, media_type=media_type, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    async def start(self) -> str:
        app = Starlette(routes=[
            Route("/2010-04-01/Accounts/{account}/Calls/{call}/Recordings.json", self._recordings, methods=["POST"]),
            Route("/2010-04-01/Accounts/{account}/Recordings/{sid}.{fmt}", self._recording_media, methods=["GET"]),
        ])
        self._http = LocalServer(app, "fake Twilio API")
        self.url = await self._http.start()
        return self.url

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None

    def of(self, suffix: str) -> list[Seen]:
        return [r for r in self.requests if r.path.endswith(suffix)]

    def __repr__(self) -> str:  # never print the token
        return f"FakeTwilioApi(url={self.url!r}, requests={len(self.requests)})"

    async def __aenter__(self) -> "FakeTwilioApi":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
