"""A local stand-in of Twilio's REST API (the parts the shim calls), served on 127.0.0.1.

It checks HTTP Basic auth like Twilio, answers in Twilio's JSON shapes, and records every
request so tests can assert what the shim asked for."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
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
        sid = "RE" + secrets.token_hex(16)
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

    async def start(self) -> str:
        app = Starlette(routes=[
            Route("/2010-04-01/Accounts/{account}/Calls/{call}/Recordings.json", self._recordings, methods=["POST"]),
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
