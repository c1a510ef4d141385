"""Fetching a call's recording from Twilio with the account's credentials, for `shim recording`
and the call browser's player (which proxies it, so the browser never sees the credentials).

Twilio serves a recording's media at `/2010-04-01/Accounts/{AC}/Recordings/{RE}.wav` or `.mp3`
with HTTP Basic auth (https://www.twilio.com/docs/voice/api/recording#fetch-a-recording-media-file).
The URL is rebuilt from TWILIO_API_BASE and the recording's sids, never taken whole from the
database: the credentials go to the configured Twilio API and nowhere else. Redirects are
followed (httpx drops the Authorization header when a redirect leaves the origin).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, BinaryIO

import httpx

from .config import Config
from .ops import recording_sid

FORMATS = {"wav": "audio/x-wav", "mp3": "audio/mpeg"}
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class RecordingError(RuntimeError):
    """The recording cannot be fetched. `usage` is True when the request itself was wrong (no
    recording for that call, credentials not configured) rather than a failure on the way."""

    def __init__(self, message: str, *, usage: bool = False, http_status: int | None = None):
        super().__init__(message)
        self.usage = usage
        self.http_status = http_status


@dataclass(frozen=True)
class MediaRequest:
    url: str
    auth: tuple[str, str]
    recording_sid: str


def media_request(config: Config, call_sid: str, recording_url: str | None, fmt: str) -> MediaRequest:
    """Where and how to fetch the media of the call's recording (raises RecordingError)."""
    if fmt not in FORMATS:
        raise RecordingError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}", usage=True)
    ids = recording_sid(recording_url)
    if ids is None:
        raise RecordingError(f"call {call_sid} has no recording (recording off for its assistant, or it never started: see its call_events)", usage=True)
    if not (config.twilio_account_sid and config.twilio_auth_token):
        raise RecordingError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set to fetch recordings from Twilio", usage=True)
    account, sid = ids
    return MediaRequest(f"{config.twilio_api_base}/2010-04-01/Accounts/{account}/Recordings/{sid}.{fmt}",
                        (config.twilio_account_sid, config.twilio_auth_token), sid)


def explain_status(status: int, sid: str) -> str:
    if status in (401, 403):
        return f"Twilio refused TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN for recording {sid} (HTTP {status}): check the credentials and that they belong to the account that owns the call"
    if status == 404:
        return f"Twilio has no media for recording {sid} (HTTP 404): it may still be processing (try again in a minute) or have been deleted"
    return f"Twilio answered HTTP {status} for recording {sid}"


def download(request: MediaRequest, dest: str) -> int:
    """Write the media to `dest` ('-' for stdout), atomically for files: a failed download leaves
    no partial file behind. Returns the number of bytes written."""
    try:
        with httpx.Client(auth=request.auth, follow_redirects=True, timeout=TIMEOUT) as client:
            with client.stream("GET", request.url, headers=_headers(None)) as response:
                if response.status_code != 200:
                    raise RecordingError(explain_status(response.status_code, request.recording_sid), http_status=response.status_code)
                if dest == "-":
                    import sys

                    return _copy(response, sys.stdout.buffer)
                target = Path(dest)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
                try:
                    with os.fdopen(fd, "wb") as out:
                        written = _copy(response, out)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                return written
    except httpx.HTTPError as exc:
        raise RecordingError(f"fetching recording {request.recording_sid} from Twilio: {type(exc).__name__}: {exc}") from None


def _headers(range_header: str | None) -> dict[str, str]:
    # identity: the bytes are passed on as they come, so they must not be content-encoded
    headers = {"Accept-Encoding": "identity"}
    if range_header:
        headers["Range"] = range_header
    return headers


def _copy(response: httpx.Response, out: BinaryIO) -> int:
    written = 0
    for chunk in response.iter_bytes(64 * 1024):
        out.write(chunk)
        written += len(chunk)
    return written


# Headers passed from Twilio to the browser (the player seeks with Range requests).
PASSED_HEADERS = ("content-type", "content-length", "content-range", "accept-ranges", "etag", "last-modified")


@dataclass
class UpstreamMedia:
    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]
    close: object  # async callable


async def open_media(request: MediaRequest, range_header: str | None) -> UpstreamMedia:
    """Start streaming the media (for the call browser's proxy). The caller must await
    `close()` when done; raises RecordingError on anything but 200/206/416."""
    client = httpx.AsyncClient(auth=request.auth, follow_redirects=True, timeout=TIMEOUT)
    try:
        upstream = await client.send(
            client.build_request("GET", request.url, headers=_headers(range_header)), stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise RecordingError(f"fetching recording {request.recording_sid} from Twilio: {type(exc).__name__}") from None

    async def close() -> None:
        await upstream.aclose()
        await client.aclose()

    if upstream.status_code not in (200, 206, 416):
        await close()
        raise RecordingError(explain_status(upstream.status_code, request.recording_sid), http_status=upstream.status_code)
    headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
    return UpstreamMedia(upstream.status_code, headers, upstream.aiter_raw(64 * 1024), close)
