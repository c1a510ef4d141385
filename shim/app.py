"""HTTP side of the shim (Starlette): Twilio webhooks, health, metrics, and the single-port
fallback of the media stream. Every Twilio request is checked against its X-Twilio-Signature
over a URL built from PUBLIC_URL, never from request headers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from datetime import datetime, timezone
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.twiml.voice_response import Connect, VoiceResponse

from . import admin
from .aio import cancel_and_wait
from .assistant import ASSISTANT_ID_RE
from .bridge import BridgeState, CallRunner, start_media_server
from .config import Config
from .db import redact_dsn, resolve_dsn
from .metrics import ShimMetrics, WorkerMetrics
from . import store_queries
from .numbers import redact_url
from .routes import SNAPSHOT_NAME, NumberRoutes, RoutingUnavailable
from .store import Recorder, migrate, orphan_spools, replay_orphan_spools, spool_path
from .workers import LiveCalls, read_drain_answers, share_drain_answer
from shim_tools import envelope
from shim_tools.delivery import WebhookSender
from shim_tools.secrets import SecretsBook, resolve_server

from .call import transfer_action

log = structlog.get_logger("shim.app")
SORRY_NO_ASSISTANT = "Sorry, this number is not in service. Goodbye."
ASSISTANT_REQUEST_BUDGET_S = 7.5  # Vapi's fixed budget for assistant-request
# Of SHIM_DRAIN_TIMEOUT, what live calls do NOT get: Twilio's callbacks after the apology (2/3)
# and the last rows and end-of-call reports (1/3). At most a quarter of the drain time.
DRAIN_RESERVE_S = 15.0

# Twilio's final call statuses -> Vapi endedReason (only used when the stream did not already
# record a more precise reason).
STATUS_ENDED_REASON = {
    "completed": "customer-ended-call",
    "busy": "customer-busy",
    "no-answer": "customer-did-not-answer",
    "failed": "twilio-failed-to-connect-call",
    "canceled": "customer-ended-call",
}


def twiml(response: VoiceResponse) -> Response:
    return Response(str(response), media_type="application/xml")


def hangup_twiml(say: str | None = None) -> Response:
    vr = VoiceResponse()
    if say:
        vr.say(say)
    vr.hangup()
    return twiml(vr)


class Shim:
    """The process: configuration, database, writer, metrics and the media listeners."""

    def __init__(self, config: Config, *, media_host: str = "0.0.0.0", media_port: int | None = None,
                 worker: Any = None):
        self.config = config
        self.worker = worker  # workers.WorkerSlot under `shim serve --workers N`, else None
        self.media_host = media_host
        self.media_port = media_port if media_port is not None else config.media_port
        self.embedded = None
        self.dsn = ""
        self.pool: asyncpg.Pool | None = None
        self.recorder: Recorder | None = None
        self.media_server: asyncio.Server | None = None
        self.metrics = ShimMetrics(lambda: [r.call for r in self.bridge.runners])
        # Secrets for the customer's webhooks: a bad file stops the start, naming file and key.
        secrets = SecretsBook.load(config.secrets_file or None, {"SHIM_VAPI_SECRET": os.environ.get("SHIM_VAPI_SECRET", "")})
        self.bridge = BridgeState(config=config, records=_DeferredRecords(self), metrics=self.metrics, secrets=secrets)
        self.endings: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.assistant_requests: dict[str, dict[str, Any]] = {}  # this instance's recent answers
        self.ticker: asyncio.Task | None = None
        # The voice webhook routes from this in-memory copy of the numbers table (shim/routes.py).
        self.routes = NumberRoutes(lambda: self.dsn, config.data_dir / SNAPSHOT_NAME, self.db)
        self.started = False
        self.db_ok_at_start = False
        self.draining = False  # SIGTERM seen: /readyz 503
        self.drain_started: float | None = None
        self.stream_ended_answered: set[str] = set()  # during a drain: whose apology/<Dial> went out
        self.status_answered: set[str] = set()  # during a drain: whose final status arrived
        self.metrics_server: asyncio.Server | None = None
        # --workers: this worker's metrics snapshot (the scrape sums all workers'), orphan spools
        self.worker_metrics = WorkerMetrics(self.metrics.registry, worker.run_dir, worker.index) if worker else None
        if worker is not None:  # a second stream for a live CallSid is refused on any worker
            self.bridge.live_calls = LiveCalls(worker.run_dir, worker.index)
        self.worker_tasks: list[asyncio.Task] = []
        self.lag_monitor: asyncio.Task | None = None

    async def startup(self) -> None:
        config = self.config
        self.dsn, self.embedded = await asyncio.to_thread(resolve_dsn, config.database_url, config.data_dir)
        log.info("database", dsn=redact_dsn(self.dsn), embedded=self.embedded is not None)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        # The writer migrates on every (re)connect and spools while Postgres is away, so calls
        # work even when the database is down at boot.
        index, count = (self.worker.index, self.worker.count) if self.worker else (0, 1)
        self.recorder = Recorder(self.dsn, spool_path=spool_path(config.data_dir, index),
                                 max_memory_rows=config.writer_max_memory_rows)
        await self.recorder.start()
        self.bridge.sender = WebhookSender(self.bridge.http(), self.recorder)
        self.bridge.drain = self.recorder.drain
        self.bridge.number_lookup = self.lookup_number
        self.bridge.request_lookup = lambda call_sid: load_assistant_request(self, call_sid)
        self.ticker = asyncio.get_running_loop().create_task(self.bridge.tick_forever(), name="call-timers")
        try:
            await asyncio.wait_for(migrate(self.dsn), 15)
            self.db_ok_at_start = True
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.error("database_unavailable_at_start", error=str(exc))
        await self.routes.start()
        loop = asyncio.get_running_loop()
        if orphans := orphan_spools(config.data_dir, index, count):
            self.worker_tasks.append(loop.create_task(replay_orphan_spools(self.dsn, orphans), name="orphan-spools"))
        if self.worker_metrics is not None:
            self.worker_tasks.append(loop.create_task(self.worker_metrics.run(), name="metrics-snapshot"))
        reuse_port = self.worker is not None  # the workers share every port (shim/workers.py)
        if self.media_port:
            self.media_server = await start_media_server(self.bridge, self.media_host, self.media_port, reuse_port=reuse_port)
            log.info("media_listener", host=self.media_host, port=self.media_port, url=config.media_stream_url)
        if config.metrics_port:
            self.metrics_server = await start_metrics_server(self, self.media_host, config.metrics_port)
            log.info("metrics_listener", host=self.media_host, port=config.metrics_port)
        self.lag_monitor = asyncio.get_running_loop().create_task(self.metrics.watch_loop_lag(), name="loop-lag")
        self.started = True

    def drain_plan(self) -> tuple[float, float]:
        """(seconds live calls may go on, seconds for Twilio's callbacks after the apology),
        both inside SHIM_DRAIN_TIMEOUT; the rest is for rows and end-of-call reports."""
        total = self.config.drain_timeout_s
        reserve = min(DRAIN_RESERVE_S, total / 4)
        return total - reserve, reserve * 2 / 3

    async def drain_calls(self) -> None:
        """SIGTERM: take no new calls (/readyz 503), let live calls finish, end the rest with
        the apology. The HTTP port stays open all along: /twilio/stream-ended (which plays the
        apology or the <Dial>) and /twilio/status of these calls are still answered."""
        if self.drain_started is not None:
            return
        loop = asyncio.get_running_loop()
        self.draining = True
        self.drain_started = loop.time()
        calls_s, callbacks_s = self.drain_plan()
        seen = {r.call.call_sid for r in self.bridge.runners}
        log.info("drain_started", live_calls=len(seen), wait_s=calls_s)
        while self.bridge.runners and loop.time() < self.drain_started + calls_s:
            seen |= {r.call.call_sid for r in self.bridge.runners}
            await asyncio.sleep(0.1)
        aborted = 0
        for runner in list(self.bridge.runners):
            seen.add(runner.call.call_sid)
            runner.call.abort("worker-shutdown")  # Twilio says the apology, then hangs up
            runner.pump()
            aborted += 1
        seen.discard("")
        until = self.drain_started + calls_s + callbacks_s
        # Twilio asks /twilio/stream-ended right after the stream closes (its answer is the
        # apology or the <Dial>), and /twilio/status once the call is over: answer both.
        while (self.bridge.runners or not seen <= self.stream_ended_answered or not seen <= self.status_answered) \
                and loop.time() < until:
            await asyncio.sleep(0.05)
            if self.worker is not None:  # under --workers, another worker may have answered them
                read_drain_answers(self.worker.run_dir, self.stream_ended_answered, self.status_answered)
        log.info("drain_done", calls=len(seen), ended_by_shutdown=aborted,
                 unanswered_stream_ended=len(seen - self.stream_ended_answered),
                 unanswered_status=len(seen - self.status_answered),
                 seconds=round(loop.time() - self.drain_started, 2))

    async def shutdown(self) -> None:
        await self.drain_calls()  # a no-op when `shim serve` drained already
        self.bridge.prewarm.close_all()
        if self.media_server is not None:
            self.media_server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        loop = asyncio.get_running_loop()
        exit_by = (self.drain_started or loop.time()) + self.config.drain_timeout_s

        def left(cap: float) -> float:
            return max(0.5, min(cap, exit_by - loop.time()))

        if self.bridge.post_call:  # end-of-call reports of calls that just ended (bounded)
            await asyncio.wait(list(self.bridge.post_call), timeout=left(10))
        if self.bridge.sender is not None:
            await self.bridge.sender.close(timeout=left(10))
        # (an orphan spool's replay closes its recorder after the cancel: give it the time left)
        await cancel_and_wait(self.ticker, self.lag_monitor, *self.worker_tasks, recancel_after=left(5))
        await self.routes.stop()
        if self.recorder is not None:
            await self.recorder.close(timeout=left(10))
        if self.pool is not None:
            await self.pool.close()
        if self.bridge._http is not None:
            await self.bridge._http.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        if self.worker_metrics is not None:  # the final counts, for the totals after this worker exits
            with contextlib.suppress(OSError):
                await self.worker_metrics.publish()

    async def metrics_text(self) -> bytes:
        """GET /metrics: this process's registry, or under --workers the totals of all workers."""
        if self.worker_metrics is None:
            return generate_latest(self.metrics.registry)
        return await self.worker_metrics.exposition()

    def note_drain_answer(self, kind: str, call_sid: str) -> None:
        """During a drain: Twilio's callback `kind` of this call was answered (here, or under
        --workers by any worker: every worker drains at once and waits for its calls' callbacks)."""
        (self.stream_ended_answered if kind == "stream-ended" else self.status_answered).add(call_sid)
        if self.worker is not None:
            share_drain_answer(self.worker.run_dir, kind, call_sid)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this instance takes new calls, and why (GET /readyz). A database outage or
        a failing model does not make it unready (every instance shares them, and calls still
        run on the spool and the in-memory routes); they are reported as degraded."""
        recorder = self.recorder
        health = recorder.health() if recorder is not None else None
        if health is None:
            database = "starting"
        elif health.connected or (health.state == "connecting" and self.db_ok_at_start):
            database = "up"  # (the writer connects on its first row; the start-up migration reached it)
        else:
            database = str(health)  # "degraded: spooling N rows"
        model = self.bridge.model_health
        ready = self.started and not self.draining
        body = {
            "ready": ready,
            "status": "draining" if self.draining else "starting" if not self.started else
                      "ok" if database == "up" and model.get("ok", True) else "degraded",
            "draining": self.draining,
            "live_calls": len(self.bridge.runners),  # this process's (under --workers: this worker's)
            **({"worker": self.worker.index} if self.worker is not None else {}),
            "database": {"state": database, "pending_rows": recorder.pending if recorder else 0,
                         "spooled_rows": recorder.spooled if recorder else 0},
            "model": model or {"ok": None, "detail": "no call has connected yet"},
        }
        return ready, body

    async def db(self) -> asyncpg.Pool:
        if self.pool is None:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=2)
        return self.pool

    async def lookup_number(self, number: str) -> dict[str, Any] | None:
        """The numbers row for `number` ({assistant_id, server_url}) from the in-memory routing
        table; None when unknown or when it cannot be known (the call then runs on what the
        stream says)."""
        try:
            route = await self.routes.lookup(number)
        except RoutingUnavailable:
            return None
        return route.as_number() if route else None

    def remember_end(self, call_sid: str, action: dict[str, Any]) -> None:
        self.endings[call_sid] = action
        while len(self.endings) > 10_000:
            self.endings.popitem(last=False)


class _DeferredRecords:
    """RecordSink handed to calls: forwards to the Recorder, and notes how each call ended so
    this instance can answer its own <Connect action> without a database round trip."""

    def __init__(self, shim: Shim):
        self.shim = shim

    def upsert(self, table: str, row: dict[str, Any], *, keep_existing: tuple[str, ...] = ()) -> None:
        if table == "calls" and "next_action" in row and row["call_sid"] not in self.shim.endings:
            self.shim.remember_end(row["call_sid"], row["next_action"])
        try:
            self.shim.recorder.upsert(table, row, keep_existing=keep_existing)
        except ValueError as exc:  # a value Postgres cannot take: lose the row, never the call
            log.error("row_refused", table=table, call_sid=row.get("call_sid"), error=str(exc)[:300])
            return
        if table == "calls" and row.get("next_action") is not None:
            self.shim.recorder.flush_soon()  # stream-ended may ask another worker for it

    def insert(self, table: str, row: dict[str, Any]) -> None:
        try:
            self.shim.recorder.insert(table, row)
        except ValueError as exc:
            log.error("row_refused", table=table, call_sid=row.get("call_sid"), error=str(exc)[:300])


# --- routes -------------------------------------------------------------------------------


# Twilio's webhook forms are a few KB; a body is capped before it is parsed (or its signature
# checked), so an unsigned flood cannot stall the event loop that carries every call's audio.
MAX_WEBHOOK_BODY = 64 * 1024


async def _capped_body(request: Request) -> bytes:
    """The body, or 413 as soon as it is known to exceed MAX_WEBHOOK_BODY (Content-Length, or
    while a chunked body streams in)."""
    too_large = HTTPException(413, f"webhook body over {MAX_WEBHOOK_BODY} bytes")
    declared = request.headers.get("content-length", "")
    if declared and (not declared.isascii() or not declared.isdigit() or int(declared) > MAX_WEBHOOK_BODY):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_WEBHOOK_BODY:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _signed_form(request: Request, path: str) -> dict[str, str] | None:
    shim: Shim = request.app.state.shim
    body = await _capped_body(request)
    try:
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200))
    except ValueError:
        raise HTTPException(400, "webhook form has more than 200 fields") from None
    url = shim.config.http_url(path) + (f"?{request.url.query}" if request.url.query else "")
    signature = request.headers.get("x-twilio-signature", "")
    if not shim.bridge.signatures.valid(url, params, signature):
        log.warning("twilio_signature_rejected", path=path)
        return None
    return params


async def twilio_voice(request: Request) -> Response:
    shim: Shim = request.app.state.shim
    params = await _signed_form(request, "/twilio/voice")
    if params is None:
        return PlainTextResponse("invalid X-Twilio-Signature", status_code=403)
    call_sid, to, from_ = params.get("CallSid", ""), params.get("To", ""), params.get("From", "")
    bound = log.bind(call_sid=call_sid)
    row = {"call_sid": call_sid, "from_number": from_ or None, "to_number": to or None,
           "account_sid": params.get("AccountSid") or None, "status": "ringing", "stack": "shim"}
    try:
        route = await shim.routes.lookup(to)  # memory; Postgres only for a number not in the table
    except RoutingUnavailable:
        if not shim.config.default_assistant:
            # Never "not in service" for a number we may well serve: an error makes Twilio fetch
            # the number's VoiceFallbackUrl (Vapi, after `shim numbers migrate`).
            bound.error("number_routing_unavailable", to=to)
            return PlainTextResponse("routing table unavailable", status_code=503)
        route = None
    if route is not None and not route.on_shim(from_):
        # A split number's caller on the Vapi side: hand the call, still ringing, to the recorded
        # previous Voice URL (Vapi's inbound_call accepts only ringing calls, so nothing may answer first).
        if call_sid:
            shim.recorder.upsert("calls", {**row, "stack": "vapi-redirect", "status": "redirected"})
        bound.info("call_redirected", to=to, url=redact_url(route.redirect_url), split_percent=route.split_percent)
        vr = VoiceResponse()
        vr.redirect(route.redirect_url, method=route.redirect_method)
        return twiml(vr)
    number = route.as_number() if route is not None else {}
    assistant_id = number.get("assistant_id") or ""
    if not assistant_id and number.get("server_url"):
        # Vapi's assistant-request: the number's server picks the assistant (7.5 s budget).
        answer, reason = await assistant_request(shim, params, number["server_url"])
        if reason is not None:
            bound.warning("assistant_request_failed", ended_reason=reason)
            shim.recorder.upsert("calls", {**row, "status": "ended", "ended_reason": reason,
                                           "ended_at": datetime.now(timezone.utc)}, keep_existing=("ended_reason",))
            spoken = answer.get("error") if isinstance(answer.get("error"), str) else SORRY_NO_ASSISTANT
            return hangup_twiml(spoken)
        if isinstance(answer.get("destination"), dict):
            shim.recorder.upsert("calls", {**row, "status": "forwarding", "ended_reason": "assistant-forwarded-call",
                                           "ended_at": datetime.now(timezone.utc), "assistant_request": answer})
            return twiml(dial_twiml(transfer_action(answer["destination"], {}), fallback_caller_id=to))
        assistant_id = "@request"
        await store_assistant_request(shim, {**row, "assistant_request": answer})
    elif not assistant_id:
        assistant_id = shim.config.default_assistant
    if assistant_id != "@request" and (
        not ASSISTANT_ID_RE.match(assistant_id) or not (shim.config.assistants_dir / f"{assistant_id}.json").is_file()
    ):
        bound.warning("no_assistant_for_number", to=to, assistant_id=assistant_id)
        return hangup_twiml(SORRY_NO_ASSISTANT)
    if call_sid and assistant_id != "@request":
        shim.recorder.upsert("calls", {**row, "assistant_id": assistant_id})
    vr = VoiceResponse()
    connect = Connect(action=shim.config.http_url("/twilio/stream-ended"), method="POST")
    stream = connect.stream(url=shim.config.media_stream_url)
    parameters = {"assistant": assistant_id, "from": from_, "to": to}  # the stream's `start` carries them back
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    stream.parameter(name="token", value=shim.bridge.stream_token(call_sid))
    vr.append(connect)
    bound.info("call_answered", assistant_id=assistant_id)
    if not shim.draining:  # open the model session while Twilio sets up the stream (background task)
        shim.bridge.prewarm.start(call_sid, params.get("AccountSid", ""), parameters)
    return twiml(vr)


async def assistant_request(shim: Shim, params: dict[str, str], server_url: str) -> tuple[dict[str, Any], str | None]:
    """Ask the number's server which assistant runs this call. Returns (answer, None) or
    (answer, Vapi endedReason) when the call cannot go on."""
    info = envelope.CallInfo(
        call_sid=params.get("CallSid", ""), account_sid=params.get("AccountSid", ""), assistant_id="", assistant={},
        from_number=params.get("From", ""), to_number=params.get("To", ""), started_at=datetime.now(timezone.utc),
    )
    target = resolve_server(tool=None, assistant={}, assistant_id="", number_server_url=server_url,
                            secrets=shim.bridge.secrets)
    if target is None or shim.bridge.sender is None:
        return {}, "assistant-request-failed"
    delivery = await shim.bridge.sender.post(
        target, envelope.assistant_request(info, int(datetime.now(timezone.utc).timestamp() * 1000)),
        kind="assistant-request", call_sid=info.call_sid, retries=0, timeout_s=ASSISTANT_REQUEST_BUDGET_S,
    )
    answer = delivery.json() if delivery.ok else None
    if not isinstance(answer, dict):
        return {}, "assistant-request-failed"
    if answer.get("error"):
        return answer, "assistant-request-returned-error"
    if isinstance(answer.get("destination"), dict):
        return answer, None
    if isinstance(answer.get("assistant"), dict):
        return answer, None
    assistant_id = answer.get("assistantId")
    if isinstance(assistant_id, str) and ASSISTANT_ID_RE.match(assistant_id) and (
        shim.config.assistants_dir / f"{assistant_id}.json"
    ).is_file():
        return answer, None
    if assistant_id:
        return answer, "assistant-request-returned-invalid-assistant"
    return answer, "assistant-request-returned-no-assistant"


async def store_assistant_request(shim: Shim, row: dict[str, Any]) -> None:
    """The server's answer must reach whichever instance gets the media stream: write it before
    answering Twilio (and keep it in memory for this instance, in case Postgres is away)."""
    shim.assistant_requests[row["call_sid"]] = row["assistant_request"]
    while len(shim.assistant_requests) > 10_000:
        shim.assistant_requests.pop(next(iter(shim.assistant_requests)))
    try:
        pool = await asyncio.wait_for(shim.db(), 2)
        await store_queries.save_assistant_request(pool, row)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        log.error("assistant_request_not_stored", call_sid=row["call_sid"], error=str(exc))


async def load_assistant_request(shim: Shim, call_sid: str) -> dict[str, Any] | None:
    if call_sid in shim.assistant_requests:
        return shim.assistant_requests[call_sid]
    try:
        pool = await asyncio.wait_for(shim.db(), 2)
        return await store_queries.assistant_request(pool, call_sid)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        log.error("assistant_request_lookup_failed", call_sid=call_sid, error=str(exc))
        return None


async def stream_ended(request: Request) -> Response:
    """<Connect action>: the stream is over; answer what the call decided (kept in Postgres so
    any instance can answer; this instance's own recent decisions are read from memory)."""
    shim: Shim = request.app.state.shim
    params = await _signed_form(request, "/twilio/stream-ended")
    if params is None:
        return PlainTextResponse("invalid X-Twilio-Signature", status_code=403)
    call_sid = params.get("CallSid", "")
    action = shim.endings.get(call_sid) or await _stored_action(shim, call_sid)
    if shim.draining:
        shim.note_drain_answer("stream-ended", call_sid)
    if action and action.get("verb") == "dial":
        return twiml(dial_twiml(action, fallback_caller_id=params.get("To", "")))
    if action and action.get("verb") == "hangup":
        return hangup_twiml(action.get("say"))
    return hangup_twiml()


def dial_twiml(action: dict[str, Any], *, fallback_caller_id: str) -> VoiceResponse:
    """A transfer (Vapi transferCall, blind): <Dial> the number or SIP URI, caller id as
    configured or the shim's own number, ringing until answered; if nobody answers, a short
    apology rather than dead air."""
    vr = VoiceResponse()
    if action.get("say"):  # e.g. a fallback transfer after a model failure: tell the caller why they wait
        vr.say(action["say"])
    dial = vr.dial(caller_id=action.get("callerId") or fallback_caller_id or None, answer_on_bridge=True, timeout=60)
    if action.get("sip"):
        uri = action["sip"]
        headers = action.get("sipHeaders") or {}
        if headers:
            uri += ("&" if "?" in uri else "?") + "&".join(f"{k}={v}" for k, v in headers.items())
        dial.sip(uri)
    else:
        extension = action.get("extension")
        dial.number(action.get("number", ""), send_digits=f"ww{extension}" if extension else None)
    vr.say("Sorry, nobody is available to take your call. Goodbye.")
    vr.hangup()
    return vr


async def _stored_action(shim: Shim, call_sid: str) -> dict[str, Any] | None:
    # The deciding instance writes next_action through its batching writer: allow it a moment.
    for _ in range(10):
        try:
            pool = await asyncio.wait_for(shim.db(), 2)
            action = await store_queries.next_action(pool, call_sid)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        if action:
            return action
        await asyncio.sleep(0.2)
    return None


async def twilio_status(request: Request) -> Response:
    shim: Shim = request.app.state.shim
    params = await _signed_form(request, "/twilio/status")
    if params is None:
        return PlainTextResponse("invalid X-Twilio-Signature", status_code=403)
    call_sid, status = params.get("CallSid", ""), params.get("CallStatus", "")
    if shim.draining and status in STATUS_ENDED_REASON:
        shim.note_drain_answer("status", call_sid)
    if call_sid and status in STATUS_ENDED_REASON:
        from datetime import datetime, timezone

        shim.recorder.upsert(
            "calls",
            {"call_sid": call_sid, "status": status, "ended_at": datetime.now(timezone.utc),
             "ended_reason": STATUS_ENDED_REASON[status]},
            keep_existing=("ended_at", "ended_reason"),
        )
    return Response(status_code=204)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Whether it takes calls is /readyz."""
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    ready, body = request.app.state.shim.readiness()
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")


async def metrics(request: Request) -> Response:
    shim: Shim = request.app.state.shim
    if shim.config.metrics_port:  # private port only
        return PlainTextResponse("Not Found", status_code=404)
    token = shim.config.metrics_token
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return PlainTextResponse("unauthorized", status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return Response(await shim.metrics_text(), media_type=CONTENT_TYPE_LATEST)


async def start_metrics_server(shim: Shim, host: str, port: int) -> asyncio.Server:
    """SHIM_METRICS_PORT: /metrics alone on a port the platform keeps private (Fly scrapes it
    over its private network through fly.toml's [metrics]). One request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = line.split(b" ", 2)[1].split(b"?", 1)[0] if line.count(b" ") >= 2 else b""
            if path == b"/metrics":
                body, status, ctype = await shim.metrics_text(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, ctype = b"Not Found", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_port=shim.worker is not None)


class QueueTwilioSink:
    """Adapter for the single-port fallback: Starlette's send is async, the call core is not."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

    def send(self, frame: str) -> None:
        self.queue.put_nowait(frame)

    def close(self) -> None:
        self.queue.put_nowait(None)


async def media_stream(websocket: WebSocket) -> None:
    shim: Shim = websocket.app.state.shim
    if not shim.bridge.stream_signature_ok(websocket.headers.get("x-twilio-signature")):
        log.warning("media_stream_signature_rejected")
        await websocket.close(code=1008)  # before accept(): the upgrade is refused with 403
        return
    await websocket.accept()
    sink = QueueTwilioSink()
    runner = CallRunner(shim.bridge, sink)

    async def sender() -> None:
        while (frame := await sink.queue.get()) is not None:
            await websocket.send_text(frame)
        await websocket.close()

    send_task = asyncio.create_task(sender())
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                if message.get("code") == 1012 and shim.draining:
                    # Our own server closing this socket at shutdown (uvicorn sends 1012), not
                    # Twilio hanging up: the call ends as any call the drain ends.
                    runner.call.abort("worker-shutdown")
                    runner.pump()
                break
            data = message.get("text") or message.get("bytes")
            if data is not None:
                runner.on_twilio_text(data)
    except WebSocketDisconnect:
        pass
    finally:
        runner.on_twilio_closed()
        if runner.task is not None:
            await runner.task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(send_task, 2)
        send_task.cancel()


def create_app(config: Config, *, media_host: str = "0.0.0.0", media_port: int | None = None,
               worker: Any = None) -> Starlette:
    shim = Shim(config, media_host=media_host, media_port=media_port, worker=worker)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await shim.startup()
        try:
            yield
        finally:
            await shim.shutdown()

    app = Starlette(
        routes=[
            Route("/twilio/voice", twilio_voice, methods=["POST"]),
            Route("/twilio/stream-ended", stream_ended, methods=["POST"]),
            Route("/twilio/status", twilio_status, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            WebSocketRoute("/twilio/media", media_stream),
            *admin.routes(shim),  # the call browser under /admin (404 unless SHIM_ADMIN_TOKEN is set)
        ],
        lifespan=lifespan,
    )
    app.state.shim = shim
    return app
