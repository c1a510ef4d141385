"""A local stand-in of Twilio's REST API (the parts the shim calls), served on 127.0.0.1.

It checks HTTP Basic auth like Twilio, answers in Twilio's JSON shapes (errors as
{code, message, more_info, status}), and records every request so tests can assert what the
shim asked for. IncomingPhoneNumbers: list (PhoneNumber filter with Twilio's partial match and
`*` wildcard, PageSize/Page/PageToken paging with next_page_uri), fetch and update by SID.
Shapes: https://www.twilio.com/docs/phone-numbers/api/incomingphonenumber-resource"""

from __future__ import annotations

import base64
import io
import re
import secrets
import wave
from datetime import datetime, timezone
from email.utils import format_datetime
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

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
    phone_numbers: dict[str, dict[str, Any]] = field(default_factory=dict)  # sid -> Twilio's JSON
    # Errors the IncomingPhoneNumbers endpoints answer next, one per request, in order: (status, code, message).
    faults: list[tuple[int, int, str]] = field(default_factory=list)
    update_faults: list[tuple[int, int, str]] = field(default_factory=list)  # the same, for updates only
    # Updates that are applied and then answered with an error anyway (a 5xx after the write).
    fail_after_update: list[tuple[int, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._http: LocalServer | None = None

    def _authorized(self, request: Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return secrets.compare_digest(request.headers.get("authorization", ""), f"Basic {expected}")

    async def _recordings(self, request: Request) -> JSONResponse:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        self.requests.append(Seen(request.method, request.url.path, form))
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        if self.fail_status:
            return self._error(self.fail_status, 21220, "Call is not in-progress")
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
            return self._error(401, 20003, "Authenticate")
        sid, fmt = request.path_params["sid"], request.path_params["fmt"]
        if self.fail_status:
            return self._error(self.fail_status, 20500, "Internal Server Error")
        if sid not in self.recordings or fmt not in ("wav", "mp3"):
            return self._error(404, 20404, f"The requested resource {request.url.path} was not found")
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

    # --- IncomingPhoneNumbers -----------------------------------------------------------------

    def add_number(self, phone_number: str, **settings: Any) -> str:
        """A number on the account, as Vapi leaves it after an import unless overridden
        (snake_case Twilio fields, e.g. voice_url=…, voice_fallback_url=None)."""
        sid = "PN" + secrets.token_hex(16)
        now = format_datetime(datetime.now(timezone.utc), usegmt=False).replace("-0000", "+0000")
        digits = phone_number[2:] if phone_number.startswith("+1") else phone_number
        self.phone_numbers[sid] = {
            "account_sid": self.account_sid, "address_requirements": "none", "address_sid": None,
            "api_version": "2010-04-01", "beta": False,
            "capabilities": {"fax": False, "mms": True, "sms": True, "voice": True},
            "date_created": now, "date_updated": now, "emergency_status": "Inactive",
            "emergency_address_sid": None, "emergency_address_status": "unregistered",
            "friendly_name": f"({digits[:3]}) {digits[3:6]}-{digits[6:]}" if len(digits) == 10 else phone_number,
            "identity_sid": None, "origin": "twilio", "phone_number": phone_number, "sid": sid,
            "sms_application_sid": "", "sms_fallback_method": "POST", "sms_fallback_url": "",
            "sms_method": "POST", "sms_url": "https://api.vapi.ai/twilio/sms",
            "status_callback": "", "status_callback_method": "POST", "trunk_sid": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/IncomingPhoneNumbers/{sid}.json",
            "voice_receive_mode": "voice", "voice_application_sid": "", "voice_caller_id_lookup": False,
            "voice_fallback_method": "POST", "voice_fallback_url": "", "voice_method": "POST",
            "voice_url": "https://api.vapi.ai/twilio/inbound_call", "bundle_sid": None, "status": "in-use",
            "type": "local",
            "subresource_uris": {
                "assigned_add_ons": f"/2010-04-01/Accounts/{self.account_sid}/IncomingPhoneNumbers/{sid}/AssignedAddOns.json",
            },
        }
        self.phone_numbers[sid].update(settings)
        return sid

    def number(self, phone_number: str) -> dict[str, Any]:
        return next(n for n in self.phone_numbers.values() if n["phone_number"] == phone_number)

    @staticmethod
    def _error(status: int, code: int, message: str) -> JSONResponse:
        return JSONResponse({"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                             "status": status}, status_code=status)

    async def _numbers_gate(self, request: Request) -> JSONResponse | None:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        self.requests.append(Seen(request.method, request.url.path + (f"?{request.url.query}" if request.url.query else ""), form))
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        if request.path_params["account"] != self.account_sid:
            return self._error(404, 20404, f"The requested resource {request.url.path} was not found")
        if self.faults:
            status, code, message = self.faults.pop(0)
            return self._error(status, code, message)
        return None

    async def _list_numbers(self, request: Request) -> JSONResponse:
        if (refused := await self._numbers_gate(request)) is not None:
            return refused
        query = request.query_params
        items = sorted(self.phone_numbers.values(), key=lambda n: n["sid"])
        if query.get("PhoneNumber"):
            # Twilio matches partial numbers, with `*` standing for one digit.
            pattern = re.compile("".join("[0-9]" if c == "*" else re.escape(c) for c in query["PhoneNumber"]))
            items = [n for n in items if pattern.search(n["phone_number"])]
        if query.get("FriendlyName"):
            items = [n for n in items if query["FriendlyName"] in n["friendly_name"]]
        try:
            page_size = min(int(query.get("PageSize", "50")), 1000)
            page = int(query.get("Page", "0"))
        except ValueError:
            return self._error(400, 20001, "Invalid paging parameters")
        token = query.get("PageToken", "")
        if token:  # PA + the last SID of the previous page: resume after it
            items = [n for n in items if n["sid"] > token[2:]]
        elif page:
            items = items[page * page_size:]
        chunk, more = items[:page_size], len(items) > page_size
        base = f"/2010-04-01/Accounts/{self.account_sid}/IncomingPhoneNumbers.json?"
        filters = "".join(f"{k}={quote(v, safe='')}&" for k, v in query.items() if k in ("PhoneNumber", "FriendlyName"))
        uri = f"{base}{filters}PageSize={page_size}&Page={page}" + (f"&PageToken={token}" if token else "")
        start = page * page_size
        return JSONResponse({
            "end": start + max(len(chunk) - 1, 0),
            "first_page_uri": f"{base}{filters}PageSize={page_size}&Page=0",
            "incoming_phone_numbers": chunk,
            "next_page_uri": f"{base}{filters}PageSize={page_size}&Page={page + 1}&PageToken=PA{chunk[-1]['sid']}" if more else None,
            "page": page,
            "page_size": page_size,
            "previous_page_uri": f"{base}{filters}PageSize={page_size}&Page={page - 1}" if page else None,
            "start": start,
            "uri": uri,
        })

    async def _one_number(self, request: Request) -> JSONResponse:
        if (refused := await self._numbers_gate(request)) is not None:
            return refused
        sid = request.path_params["sid"]
        number = self.phone_numbers.get(sid)
        if number is None:
            return self._error(404, 20404, f"The requested resource {request.url.path} was not found")
        if request.method == "POST":
            if self.update_faults:
                return self._error(*self.update_faults.pop(0))
            form = self.requests[-1].form
            for name, value in form.items():
                key = _SNAKE.get(name)
                if key is None:
                    continue  # a field this stand-in does not model is accepted and ignored
                number[key] = value.upper() if key.endswith("_method") else value
            number["date_updated"] = format_datetime(datetime.now(timezone.utc), usegmt=False).replace("-0000", "+0000")
            if self.fail_after_update:
                return self._error(*self.fail_after_update.pop(0))
        return JSONResponse(number)

    async def start(self) -> str:
        numbers = "/2010-04-01/Accounts/{account}/IncomingPhoneNumbers"
        app = Starlette(routes=[
            Route("/2010-04-01/Accounts/{account}/Calls/{call}/Recordings.json", self._recordings, methods=["POST"]),
            Route("/2010-04-01/Accounts/{account}/Recordings/{sid}.{fmt}", self._recording_media, methods=["GET"]),
            Route(numbers + ".json", self._list_numbers, methods=["GET"]),
            Route(numbers + "/{sid}.json", self._one_number, methods=["GET", "POST"]),
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

    def updates(self) -> list[Seen]:
        """The POSTs that changed a phone number."""
        return [r for r in self.requests if r.method == "POST" and "/IncomingPhoneNumbers/" in r.path]

    def __repr__(self) -> str:  # never print the token
        return f"FakeTwilioApi(url={self.url!r}, requests={len(self.requests)})"

    async def __aenter__(self) -> "FakeTwilioApi":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


# Twilio's form names -> its JSON fields, for the settings the stand-in lets an update change.
_SNAKE = {
    "VoiceUrl": "voice_url", "VoiceMethod": "voice_method", "VoiceFallbackUrl": "voice_fallback_url",
    "VoiceFallbackMethod": "voice_fallback_method", "StatusCallback": "status_callback",
    "StatusCallbackMethod": "status_callback_method", "FriendlyName": "friendly_name",
    "SmsUrl": "sms_url", "SmsMethod": "sms_method", "VoiceApplicationSid": "voice_application_sid",
    "TrunkSid": "trunk_sid",
}
