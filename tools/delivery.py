"""HTTP delivery of Vapi webhooks (tool calls, server messages), off the audio path.

    sender = WebhookSender(httpx.AsyncClient(), recorder)
    d = await sender.post(target, envelope, kind="tool-calls", call_sid=sid)          # no retry (Vapi)
    sender.send_in_background(target, envelope, kind="status-update", call_sid=sid)   # retries=3
    await sender.close()                                                               # at shutdown

Transport (https://docs.vapi.ai/server-url): ``POST <url>``, JSON body (orjson), the target's headers, no
redirects followed, a total deadline per attempt of ``server.timeoutSeconds`` (default 20 s). A 2xx is
``ok``; anything else is ``error`` (the body is still returned: Vapi parses error bodies for tool
results) or ``timeout``. Retries (only when asked: ``retries > 0``) happen on timeouts, connection
errors, 5xx and 429, with exponential backoff (``Retry-After`` honoured up to the cap).

Every attempt is one ``webhook_deliveries`` row (via the injected RecordSink, which only enqueues).
Rows and log lines carry the URL without its query string and never a header value: error texts are
scrubbed of the target's secrets, its query string and userinfo.

Background messages run on at most ``max_concurrency`` worker tasks fed from a bounded backlog
(``max_backlog``); when it is full the oldest message is dropped (warning + a row with attempt 0).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson
import structlog

from shim.aio import cancel_and_wait
from shim_tools.secrets import ServerTarget

log = structlog.get_logger(__name__)

__all__ = ["Delivery", "RecordSink", "WebhookSender"]

MAX_RESPONSE_BYTES = 1 << 20  # a webhook answer larger than this is an error (memory bound)
MAX_ERROR_CHARS = 300
BACKOFF_CAP_S = 10.0
_RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))


class RecordSink(Protocol):  # same shape as shim.call.RecordSink (kept local: tools/ has no socket code deps)
    def upsert(self, table: str, row: dict[str, Any], *, keep_existing: tuple[str, ...] = ()) -> None: ...
    def insert(self, table: str, row: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Delivery:
    status: str  # "ok" | "error" | "timeout"
    http_status: int | None
    body: bytes | None  # the response body (also for non-2xx answers), None when none arrived
    latency_ms: int  # of the last attempt
    error: str | None  # scrubbed; None when ok
    attempts: int

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def json(self) -> Any:
        """The body parsed as JSON, or None when there is none or it is not JSON."""
        if not self.body:
            return None
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


@dataclass
class _Job:
    target: ServerTarget
    body: dict
    kind: str
    call_sid: str | None
    retries: int


class _TooLarge(Exception):
    pass


def _scrub(text: str, target: ServerTarget) -> str:
    """`text` without the target's secrets, query string or credentials; bounded length."""
    if target.url in text:
        text = text.replace(target.url, target.safe_url)
    for value in sorted(target.sensitive_values(), key=len, reverse=True):
        if value in text:
            text = text.replace(value, "[redacted]")
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _ms_since(t0: float) -> int:
    return min(int((time.monotonic() - t0) * 1000), 2**31 - 1)


def _retry_after(headers: httpx.Headers | None) -> float | None:
    raw = headers.get("retry-after") if headers is not None else None
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # HTTP-date form: fall back to the computed backoff


class WebhookSender:
    def __init__(self, client: httpx.AsyncClient, records: RecordSink, *, max_concurrency: int = 20,
                 max_backlog: int = 1000, max_response_bytes: int = MAX_RESPONSE_BYTES,
                 background_backoff_s: float = 0.5, max_per_host: int = 5) -> None:
        if max_concurrency < 1 or max_backlog < 1:
            raise ValueError("max_concurrency and max_backlog must be >= 1")
        self._client = client
        self._records = records
        self.max_concurrency = max_concurrency
        self.max_backlog = max_backlog
        self.max_response_bytes = max_response_bytes
        self.background_backoff_s = background_backoff_s
        self._backlog: deque[_Job] = deque()
        self._workers: set[asyncio.Task] = set()
        # One customer server that hangs must not hold every worker: at most max_per_host
        # deliveries in flight per host; its other messages wait, the other hosts' go on.
        self.max_per_host = max_per_host
        self._per_host: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        # counters (for /metrics)
        self.attempts = 0
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    # ---------------------------------------------------------------- counters

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def in_flight(self) -> int:
        return len(self._workers)

    def stats(self) -> dict[str, int]:
        return {"attempts": self.attempts, "delivered": self.delivered, "failed": self.failed,
                "dropped": self.dropped, "backlog": self.backlog, "workers": self.in_flight}

    # ---------------------------------------------------------------- one message

    async def post(self, target: ServerTarget, body: dict, *, kind: str, call_sid: str | None, retries: int = 0,
                   backoff_s: float = 0.5, timeout_s: float | None = None) -> Delivery:
        """POST `body` to `target`; never raises for HTTP/network trouble (see Delivery.status).

        `timeout_s` overrides the target's timeout (e.g. 7.5 s for assistant-request). Cancelling the
        caller cancels the request; the attempt is recorded as an error ("cancelled")."""
        if not kind:
            raise ValueError("kind is required (the Vapi message type)")
        payload = orjson.dumps(body)
        timeout = float(timeout_s if timeout_s is not None else target.timeout_s)
        retries = max(0, int(retries))
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(target, payload, kind=kind, call_sid=call_sid, attempt=attempt,
                                         timeout=timeout)
            status, http_status = result.status, result.http_status
            if status == "ok" or not result.retryable or attempt > retries:
                delivery = Delivery(status, http_status, result.body, result.latency_ms, result.error, attempt)
                if delivery.ok:
                    self.delivered += 1
                else:
                    self.failed += 1
                return delivery
            delay = min(BACKOFF_CAP_S, backoff_s * (2 ** (attempt - 1))) * (0.8 + 0.4 * random.random())
            hinted = result.retry_after
            if hinted is not None:
                delay = min(BACKOFF_CAP_S, max(delay, hinted))
            log.info("webhook.retry", kind=kind, call_sid=call_sid, url=target.safe_url, attempt=attempt,
                     status=status, http_status=http_status, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _attempt(self, target: ServerTarget, payload: bytes, *, kind: str, call_sid: str | None,
                       attempt: int, timeout: float) -> _Attempt:
        at = _dt.datetime.now(_dt.UTC)
        t0 = time.monotonic()
        self.attempts += 1
        res: _Attempt
        try:
            async with asyncio.timeout(timeout):
                async with self._client.stream(
                    "POST", target.url, content=payload, headers=target.headers, follow_redirects=False,
                    timeout=httpx.Timeout(timeout),
                ) as response:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_response_bytes:
                            raise _TooLarge(response.status_code)
                        chunks.append(chunk)
                    data = b"".join(chunks)
            code = response.status_code
            if 200 <= code < 300:
                res = _Attempt("ok", code, data, None)
            else:
                if 300 <= code < 400:
                    what = f"HTTP {code} redirect not followed"
                else:
                    snippet = data[:200].decode("utf-8", "replace")
                    what = f"HTTP {code}" + (f": {snippet}" if snippet.strip() else "")
                res = _Attempt("error", code, data, _scrub(what, target), retryable=code in _RETRY_STATUSES,
                               retry_after=_retry_after(response.headers))
        except TimeoutError:
            res = _Attempt("timeout", None, None, f"no complete response within {timeout:g} s", retryable=True)
        except httpx.TimeoutException as exc:
            res = _Attempt("timeout", None, None, _scrub(f"{type(exc).__name__}: {exc}", target), retryable=True)
        except _TooLarge as exc:
            res = _Attempt("error", exc.args[0], None, f"response body larger than {self.max_response_bytes} bytes")
        except asyncio.CancelledError:
            self._record(target, kind, call_sid, attempt, "error", None, _ms_since(t0), at, "cancelled")
            raise
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:  # refused/reset, protocol errors, bad URL
            text = _scrub(f"{type(exc).__name__}: {exc}", target)
            res = _Attempt("error", None, None, text, retryable=isinstance(exc, (httpx.TransportError, OSError)))
        except Exception as exc:  # never let a surprise from the HTTP stack escape to the call
            res = _Attempt("error", None, None, _scrub(f"{type(exc).__name__}: {exc}", target))
            log.error("webhook.unexpected_error", kind=kind, call_sid=call_sid, url=target.safe_url, error=res.error)
        res.latency_ms = _ms_since(t0)
        self._record(target, kind, call_sid, attempt, res.status, res.http_status, res.latency_ms, at, res.error)
        event = "webhook.ok" if res.status == "ok" else "webhook.failed"
        (log.debug if res.status == "ok" else log.warning)(
            event, kind=kind, call_sid=call_sid, url=target.safe_url, attempt=attempt, status=res.status,
            http_status=res.http_status, latency_ms=res.latency_ms, error=res.error)
        return res

    def _record(self, target: ServerTarget, kind: str, call_sid: str | None, attempt: int, status: str,
                http_status: int | None, latency_ms: int | None, at: _dt.datetime, error: str | None) -> None:
        row = {
            "call_sid": call_sid, "kind": kind, "url": target.safe_url, "attempt": attempt, "status": status,
            "http_status": http_status, "latency_ms": latency_ms, "error": error, "at": at,
        }
        try:
            self._records.insert("webhook_deliveries", row)
        except Exception as exc:  # a closed or failing recorder must not break a delivery
            log.warning("webhook.record_failed", kind=kind, call_sid=call_sid, error=f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- background messages

    def send_in_background(self, target: ServerTarget, body: dict, *, kind: str, call_sid: str | None,
                           retries: int = 3) -> None:
        """Queue an informational message (status-update, transcript, hang, end-of-call-report...)
        and return at once. Must be called from the event loop's thread."""
        if not kind:
            raise ValueError("kind is required (the Vapi message type)")
        job = _Job(target, body, kind, call_sid, retries)
        if self._closed:
            self._drop(job, "not sent: sender closed")
            return
        if len(self._backlog) >= self.max_backlog:
            self._drop(self._backlog.popleft(), f"dropped: webhook backlog full ({self.max_backlog})")
        self._backlog.append(job)
        self._idle.clear()
        self._spawn_worker()

    def _spawn_worker(self) -> None:
        if len(self._workers) < self.max_concurrency and self._has_eligible_job():
            task = asyncio.get_running_loop().create_task(self._worker(), name="shim-webhook-worker")
            self._workers.add(task)
            task.add_done_callback(self._worker_done)

    def _has_eligible_job(self) -> bool:
        return any(self._per_host.get(_host(job), 0) < self.max_per_host for job in self._backlog)

    def _take_job(self) -> _Job | None:
        for index, job in enumerate(self._backlog):
            if self._per_host.get(_host(job), 0) < self.max_per_host:
                del self._backlog[index]
                return job
        return None

    def _drop(self, job: _Job, why: str) -> None:
        self.dropped += 1
        log.warning("webhook.dropped", kind=job.kind, call_sid=job.call_sid, url=job.target.safe_url, reason=why)
        self._record(job.target, job.kind, job.call_sid, 0, "error", None, None, _dt.datetime.now(_dt.UTC), why)

    async def _worker(self) -> None:
        while (job := self._take_job()) is not None:
            host = _host(job)
            self._per_host[host] = self._per_host.get(host, 0) + 1
            try:
                await self.post(job.target, job.body, kind=job.kind, call_sid=job.call_sid, retries=job.retries,
                                backoff_s=self.background_backoff_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker silently with work queued
                log.exception("webhook.worker_error", kind=job.kind, call_sid=job.call_sid)
            finally:
                self._per_host[host] -= 1
                if not self._per_host[host]:
                    del self._per_host[host]
            self._spawn_worker()  # a host slot freed: messages that waited for it can go

    def _worker_done(self, task: asyncio.Task) -> None:
        self._workers.discard(task)
        if not self._closed:
            self._spawn_worker()  # raced with an enqueue after the loop ended
        if not self._workers and not self._backlog:
            self._idle.set()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued background message has been handled. False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 10) -> None:
        """Stop accepting, wait up to `timeout` for background deliveries, then cancel the rest
        (in-flight attempts and queued messages are recorded as errors). Does not close the client."""
        if self._closed:
            return
        drained = await self.drain(timeout) if self._workers or self._backlog else True
        self._closed = True
        if not drained:
            log.warning("webhook.close_timeout", backlog=len(self._backlog), in_flight=len(self._workers))
        # Not gather: a worker that swallowed the cancel (Python 3.11's wait_for can) is cancelled
        # again instead of holding the shutdown for ever; a worker's failure is logged.
        await cancel_and_wait(*self._workers)
        while self._backlog:
            self._drop(self._backlog.popleft(), "not sent: shutdown")
        self._idle.set()


class _Attempt:
    __slots__ = ("status", "http_status", "body", "error", "retryable", "retry_after", "latency_ms")

    def __init__(self, status: str, http_status: int | None, body: bytes | None, error: str | None, *,
                 retryable: bool = False, retry_after: float | None = None) -> None:
        self.status = status
        self.http_status = http_status
        self.body = body
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after
        self.latency_ms = 0


def _host(job: _Job) -> str:
    return httpx.URL(job.target.url).host or job.target.url
