"""The few Vapi API calls parity needs: list calls (paged), get a call, start a websocket call.

https://docs.vapi.ai/api-reference/calls/list — ``GET /call`` answers a plain JSON array of calls;
``limit`` defaults to 100; filters ``assistantId``, ``createdAtGe`` / ``createdAtLe`` … (ISO). We
page backwards by moving ``createdAtLe`` to the oldest ``createdAt`` seen and skip ids already
seen, so calls sharing a timestamp across a page boundary are neither lost nor duplicated.
https://docs.vapi.ai/calls/websocket-transport — ``POST /call`` with the ``vapi.websocket``
transport answers ``transport.websocketCallUrl``.

429 and 5xx are retried (``Retry-After`` honoured, seconds or HTTP date; exponential backoff
otherwise), up to ``retries`` times; 401/403 raise `VapiAuthError` at once. Errors never carry
the API key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, AsyncIterator

import httpx
import structlog

from ..vapi_api import VapiApiError, VapiAuthError, _retry_after, retry_delay

log = structlog.get_logger(__name__)

PAGE_LIMIT = 100


class VapiClient:
    def __init__(self, base_url: str, api_key: str, *, client: httpx.AsyncClient | None = None,
                 retries: int = 6, backoff: float = 0.5, max_retry_delay: float = 60.0, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retries = retries
        self.backoff = backoff
        self.max_retry_delay = max_retry_delay
        self.timeout = timeout
        self._client = client or httpx.AsyncClient()
        self._own = client is None

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()

    async def __aenter__(self) -> VapiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                      json: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        attempt = 0
        while True:
            delay: float | None = None
            status: int | None = None
            try:
                resp = await self._client.request(method, self.base_url + path, params=params, json=json,
                                                  headers=headers, timeout=self.timeout)
            except httpx.TimeoutException:
                raise VapiApiError(f"{method} {path} timed out after {self.timeout:g}s", method=method, path=path) from None
            except httpx.TransportError as exc:
                failure = f"{method} {path} failed: {type(exc).__name__}: {self._redact(str(exc))[:200]}"
            else:
                status = resp.status_code
                excerpt = " ".join(self._redact(resp.text[:300]).split())
                if status in (401, 403):
                    raise VapiAuthError(f"VAPI_API_KEY rejected: {method} {path} -> {status}: {excerpt}",
                                        method=method, path=path, status=status)
                if status < 300:
                    try:
                        return resp.json()
                    except ValueError:
                        raise VapiApiError(f"{method} {path} -> {status} but the body is not JSON: {excerpt}",
                                           method=method, path=path, status=status) from None
                if status != 429 and status < 500:
                    raise VapiApiError(f"{method} {path} -> {status}: {excerpt}", method=method, path=path, status=status)
                failure = f"{method} {path} -> {status}: {excerpt}"
                delay = _retry_after(resp.headers.get("Retry-After"))
            if attempt >= self.retries:
                raise VapiApiError(f"{failure} (after {attempt + 1} attempts)", method=method, path=path, status=status)
            delay = retry_delay(attempt, delay, self.backoff, self.max_retry_delay)
            attempt += 1
            log.info("vapi.retry", path=path, status=status, attempt=attempt, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def list_calls(self, *, since: dt.datetime, assistant_id: str | None = None,
                         limit: int = PAGE_LIMIT) -> AsyncIterator[dict[str, Any]]:
        """Every call created at or after `since` (of `assistant_id`), newest pages first."""
        seen: set[str] = set()
        upper: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit, "createdAtGe": since.isoformat()}
            if assistant_id:
                params["assistantId"] = assistant_id
            if upper:
                params["createdAtLe"] = upper
            page = await self.request("GET", "/call", params=params)
            if not isinstance(page, list):
                raise VapiApiError(f"GET /call -> 200 but the body is a JSON {type(page).__name__}, expected an array",
                                   method="GET", path="/call", status=200)
            fresh = [c for c in page if isinstance(c, dict) and isinstance(c.get("id"), str) and c["id"] not in seen]
            for call in fresh:
                seen.add(call["id"])
                yield call
            if len(page) < limit or not fresh:
                if page and not fresh and len(page) >= limit:
                    log.warning("vapi.list_calls.stuck", detail=f"more than {limit} calls share createdAt {upper}; "
                                "some may be missing: import again with a smaller window")
                return
            upper = min(str(c.get("createdAt")) for c in page if c.get("createdAt"))

    async def get_call(self, call_id: str) -> dict[str, Any]:
        body = await self.request("GET", f"/call/{call_id}")
        if not isinstance(body, dict) or body.get("id") != call_id:
            raise VapiApiError(f"GET /call/{call_id} -> 200 but not that call", method="GET", path=f"/call/{call_id}")
        return body

    async def start_websocket_call(self, *, assistant_id: str | None, assistant: dict | None = None,
                                   overrides: dict | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"transport": {"provider": "vapi.websocket",
                                              "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000}}}
        if assistant is not None:
            body["assistant"] = assistant
        elif assistant_id:
            body["assistantId"] = assistant_id
        if overrides:
            body["assistantOverrides"] = overrides
        call = await self.request("POST", "/call", json=body)
        url = ((call or {}).get("transport") or {}).get("websocketCallUrl") if isinstance(call, dict) else None
        if not url:
            raise VapiApiError("POST /call -> no transport.websocketCallUrl in the answer", method="POST", path="/call")
        return call
