"""The I/O shell around shim.call.Call: sockets in, sockets out, nothing else.

Both media sockets use picows (a Cython WebSocket whose callbacks run synchronously on the
event loop): a Twilio frame is parsed, turned into a model event and written to the model's
transport inside one callback, with no queue, task switch or await in between. The same holds
the other way. See ARCHITECTURE.md for why picows and not websockets/uvicorn here.

Per call: one CallRunner, one asyncio task (`run`: opens the model socket, ticks the call's
timers, and on the way out closes both sockets). Every task a call starts ends with it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Protocol

import httpx
import structlog
from picows import (
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_connect,
    ws_create_server,
)

from . import tool_kinds
from . import twilio_media as tw
from .aio import cancel_and_wait
from .assistant import AssistantError, load_assistant, load_saved_tools, render
from .background import BackgroundMixer, ambience_for, public_url
from shim_tools import envelope
from shim_tools.analysis import analyze
from shim_tools.delivery import WebhookSender
from shim_tools.egress import guarded_client, parse_allow_list
from shim_tools.results import delayed_messages, parse_tool_response
from shim_tools.secrets import SecretsBook, ServerTarget, resolve_server

from .translate import CallSetup, translate
from .twilio_rest import REST_TIMEOUT_S, TwilioRestError, start_recording
from .call import Call, RecordSink
from .call_work import (
    API_ANSWER_MAX_BYTES,
    analysis_row,
    api_answer,
    api_failure,
    api_request,
    choose_assistant,
    end_of_call_report,
    failed_outcome,
    should_analyze,
    vapi_tool_name,
)
from .call_effects import (
    CallEnded,
    ConnectModel,
    DeliverServerMessage,
    Effect,
    LoadBackground,
    ResolveAssistant,
    StartRecording,
    ToolRequest,
)
from .config import Config
from .prewarm_io import Prewarmer
from .twilio_signature import TwilioSignatures

log = structlog.get_logger("shim.bridge")
TICK_SECONDS = 0.5
# An assistant whose last resolution (file read + translation) took less CPU than this is resolved
# on the event loop (BridgeState.resolve_setup): less than the loop spends on one 100 ms chunk of
# a busy minute, and well under the thread hop it saves.
INLINE_RESOLVE_S = 0.001

# picows' message types as module constants: the per-frame code compares and sends with them, and
# an Enum member lookup (WSMsgType.TEXT) costs ~0.2 µs in Python 3.11.
TEXT, CONTINUATION, CLOSE, BINARY = WSMsgType.TEXT, WSMsgType.CONTINUATION, WSMsgType.CLOSE, WSMsgType.BINARY


class TwilioSink(Protocol):
    def send(self, frame: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class BridgeState:
    """What every call shares: configuration and the process-wide services."""

    config: Config
    records: RecordSink
    metrics: Any
    runners: set["CallRunner"] = field(default_factory=set)
    signatures: TwilioSignatures | None = None  # the one Twilio signature / stream token check
    secrets: SecretsBook = field(default_factory=SecretsBook)
    sender: WebhookSender | None = None  # set at start-up (needs the writer)
    # number -> {"assistant_id", "server_url"} from the numbers table (injected by the app)
    number_lookup: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None
    post_call: set[asyncio.Task] = field(default_factory=set)  # end-of-call work still running
    drain: Callable[[float], Awaitable[bool]] | None = None  # wait (bounded) until rows are written
    request_lookup: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None  # assistant-request answers
    model_health: dict[str, Any] = field(default_factory=dict)  # the last model connect, for /readyz
    live_calls: Any = None  # workers.LiveCalls under `shim serve --workers N`: the same check across workers
    resolve_cost: dict[str, float] = field(default_factory=dict)  # assistant id -> s its last resolution took (_timed_resolve)
    _http: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        """One HTTP client for the process (webhooks, apiRequest tools, background sounds, the
        analysis): every request and redirect hop passes SHIM_TOOL_URL_ALLOW (tools/egress.py)."""
        if self._http is None:
            policy = parse_allow_list(self.config.tool_url_allow, trusted_urls=[self.config.openai_base_url])
            self._http = guarded_client(policy, timeout=10, follow_redirects=True)
        return self._http

    def __post_init__(self) -> None:
        self.signatures = TwilioSignatures(self.config.twilio_auth_token)
        # model sessions opened from /twilio/voice, adopted by the call's first connect (SHIM_PREWARM)
        self.prewarm = Prewarmer(self, enabled=self.config.prewarm)

    async def tick_forever(self) -> None:
        """One timer for every call (max duration, silence, goodbyes, keypad timeouts): cheaper
        than a sleeping task per call, and a call's tick failing only ends that call."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            for runner in list(self.runners):
                if runner.task is not None and not runner.ended.is_set():
                    runner.tick()

    def stream_token(self, call_sid: str) -> str:
        assert self.signatures is not None
        return self.signatures.stream_token(call_sid)

    def start_token_ok(self, start: tw.Start) -> bool:
        assert self.signatures is not None
        return self.signatures.start_token_ok(start.call_sid, start.token)

    def admit_start(self, start: tw.Start) -> str | None:
        """Why a stream's `start` is refused (the call checks it before it writes or replaces
        anything), or None: a wrong token, or a second stream for a CallSid that is live."""
        if not self.start_token_ok(start):
            return "stream token does not match the CallSid"
        if any(runner.call.call_sid == start.call_sid and runner.call.end is None for runner in self.runners):
            return "a stream for this CallSid is already live"
        if self.live_calls is not None and not self.live_calls.claim(start.call_sid):
            return "a stream for this CallSid is already live on another worker (or it is not a CallSid)"
        return None

    def stream_signature_ok(self, signature: str | None) -> bool:
        """The upgrade is signed over the exact <Stream url> we rendered."""
        assert self.signatures is not None
        return self.signatures.valid(self.config.media_stream_url, {}, signature)

    async def resolve_setup(self, start: tw.Start) -> CallSetup:
        """Load and translate the call's assistant: in a worker thread (nothing slow on the event
        loop that carries every call's audio), unless this assistant's last resolution took less
        than INLINE_RESOLVE_S (_timed_resolve). A typical export takes ~0.2 ms, while the hop to a thread
        and back waits for the GIL behind the busy loop (up to its 5 ms switch interval): most of
        Twilio `start` → `session.update` under load. The assistant-request answer's always runs
        in the thread (it arrives over the network, any size)."""
        requested = None
        if start.custom_parameters.get("assistant") == "@request":
            requested = await self.request_lookup(start.call_sid) if self.request_lookup else None
            if not isinstance(requested, dict):
                raise AssistantError("assistant", "@request", "the number server's assistant-request answer (not found)")
            return await asyncio.to_thread(self._resolve_setup, start, requested)
        assistant_id = start.custom_parameters.get("assistant", "")
        if self.resolve_cost.get(assistant_id, INLINE_RESOLVE_S) < INLINE_RESOLVE_S:
            return self._timed_resolve(start, time.perf_counter)  # what it held the loop for
        return await asyncio.to_thread(self._timed_resolve, start, time.thread_time)  # not the GIL wait

    def _timed_resolve(self, start: tw.Start, timer: Callable[[], float]) -> CallSetup:
        """_resolve_setup, noting what it cost for the assistant, failed or not: on the loop its
        wall time (a slow disk read sends the next one back to the thread), in the thread its CPU
        time (the wait for the GIL is not the assistant's)."""
        started = timer()
        try:
            return self._resolve_setup(start)
        finally:
            if len(self.resolve_cost) >= 4096:  # ids come from signed stream parameters; bounded anyway
                self.resolve_cost.clear()
            self.resolve_cost[start.custom_parameters.get("assistant", "")] = timer() - started

    def _resolve_setup(self, start: tw.Start, requested: dict[str, Any] | None = None) -> CallSetup:
        chosen = choose_assistant(start, requested, lambda assistant_id: load_assistant(self.config.assistants_dir, assistant_id))
        model = chosen.assistant.get("model")
        saved = load_saved_tools(self.config.assistants_dir, model.get("toolIds") if isinstance(model, dict) else None)
        return translate(
            chosen.assistant_id,
            chosen.assistant,
            chosen.context,
            model=self.config.openai_realtime_model,
            saved_tools=saved,
            transcription_model=self.config.transcription_model,
            voice_overrides=dict(self.config.voice_map),
        )


class ModelListener(WSListener):
    """One model socket of a call. A call may have several in turn (reconnect, rollover): the
    runner detaches the old one (`runner = None`) before it opens the next, so nothing from an
    old socket reaches the call."""

    def __init__(self, runner: CallRunner):
        self.runner: CallRunner | None = runner
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    # A pre-warmed socket (shim/prewarm_io.py) has a listener of its own, which calls these.
    def relay_text(self, data: bytes) -> None:
        runner = self.runner
        if runner is not None:
            runner.on_model_text(data)

    def relay_closed(self, code: int | None, reason: str) -> None:
        if self.runner is not None:
            self.runner.on_model_disconnected(self, code, reason)

    def abandon(self) -> None:
        """This socket is not the call's (replaced, or its connect failed or was cancelled after
        the handshake went through): nothing more from it reaches the call, and it is closed."""
        self.runner = None
        if self.transport is not None:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is TEXT:
            runner = self.runner
            if runner is not None:  # runner.on_model_text, inlined (every model event passes here)
                try:
                    runner.call.on_model_text(frame.get_payload_as_bytes())
                    runner.pump()
                except Exception:
                    runner._fail("model event")
        elif kind is CLOSE:
            self.close_code = int(frame.get_close_code())
            self.close_reason = frame.get_close_message().decode("utf-8", "replace") if frame.get_close_message() else ""
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.runner is not None:
            self.runner.on_model_disconnected(self, self.close_code, self.close_reason)


class CallRunner:
    def __init__(self, state: BridgeState, twilio: TwilioSink):
        self.state = state
        self.twilio = twilio
        self.model: WSTransport | None = None
        self._model_listener: ModelListener | None = None
        self._connecting: asyncio.Task | None = None
        self._pending_listener: ModelListener | None = None  # the socket being opened
        self._setup_done = asyncio.Event()  # the assistant is resolved (or could not be)
        self.call = Call(state.records, log=log, metrics=state.metrics, admit_start=state.admit_start)
        self.task: asyncio.Task | None = None
        self.ended = asyncio.Event()
        self._twilio_closed = False
        self._tasks: set[asyncio.Task] = set()  # the call's own work (webhooks): ends with the call
        self._recording: asyncio.Task | None = None
        self.number_server_url: str | None = None
        state.runners.add(self)

    # picows / Starlette callbacks (synchronous). A bug in the call core ends this call, with
    # the error recorded, and never propagates into the socket library or another call.
    def on_twilio_text(self, data: str | bytes) -> None:
        try:
            self.call.on_twilio_text(data)
            self.pump()
        except Exception:
            self._fail("twilio frame")

    def on_twilio_closed(self) -> None:
        self._twilio_closed = True
        try:
            self.call.on_twilio_closed()
            self.pump()
        except Exception:
            self._fail("twilio close")
        if self.task is None:
            self._forget()

    def on_model_text(self, data: bytes) -> None:
        try:
            self.call.on_model_text(data)
            self.pump()
        except Exception:
            self._fail("model event")

    def on_model_disconnected(self, listener: ModelListener, code: int | None, reason: str) -> None:
        if listener is not self._model_listener:
            return  # a socket being opened (its connect reports the failure) or one already replaced
        self.model, self._model_listener = None, None
        try:
            self.call.on_model_closed(code, reason)
            self.pump()
        except Exception:
            self._fail("model close")

    def _fail(self, where: str) -> None:
        log.exception("call_failed", call_sid=self.call.call_sid, where=where)
        if self.call.end is None:
            try:
                self.call.abort("call.in-progress.error-vapifault-worker-died")
            except Exception:
                log.exception("call_finish_failed", call_sid=self.call.call_sid)
        if not self.ended.is_set():
            self.ended.set()
            if self.task is None:
                self._close_twilio()

    def tick(self) -> None:
        try:
            self.call.tick()
            self.pump()
        except Exception:
            self._fail("tick")

    def pump(self) -> None:
        # Runs after every frame: take_twilio_out / take_model_out inlined (a call each fewer).
        call = self.call
        out = call.twilio_out
        if out and not self._twilio_closed:
            call.twilio_out = []
            twilio = self.twilio
            if type(twilio) is PicowsTwilioSink:  # straight to picows: a Python call fewer per frame
                send = twilio.transport.send
                for frame in out:
                    send(TEXT, frame.encode())
            else:
                for frame in out:
                    twilio.send(frame)
        backend = call.backend
        out = backend.out
        if out and self.model is not None:
            backend.out = []
            send = self.model.send
            for event in out:
                send(TEXT, event.encode())
        if call.effects:
            self._run_effects(call.take_effects())

    def _run_effects(self, effects: list[Effect]) -> None:
        """Carry out what the core asked for, in order (shim.call_effects)."""
        tools: list[ToolRequest] = []
        loop = asyncio.get_running_loop()
        for effect in effects:
            kind = type(effect)
            if kind is ToolRequest:
                tools.append(effect)
            elif kind is DeliverServerMessage:
                self._deliver(effect.kind, effect.body)
            elif kind is ResolveAssistant:
                if self.task is None:
                    self.task = loop.create_task(self.run(effect.start), name=f"call:{self.call.call_sid}")
            elif kind is ConnectModel:
                self._drop_model()  # a reconnect or rollover: the old socket is closed, not heard from again
                if self._connecting is not None:
                    self._connecting.cancel()  # one model connection attempt at a time
                self._connecting = self._start_side_task(self._connect_model(effect.delay_s, effect.timeout_s), "model connect")
            elif kind is StartRecording:
                self._recording = loop.create_task(self._start_recording(effect.account_sid, effect.call_sid))
            elif kind is LoadBackground:
                self._start_side_task(self._load_background(effect.sound), "background sound")
            elif kind is CallEnded:
                if not self.ended.is_set():
                    self.ended.set()
                    if self.task is None:
                        self._close_twilio()
        if tools:
            self._dispatch_tools(tools)

    def _start_side_task(self, coro, where: str) -> asyncio.Task:
        """Set-up work of this call (model socket, background sound): ends with the call, and an
        unexpected failure ends this call only."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                self._fail(where)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, start: tw.Start) -> None:
        call = self.call
        try:
            await self._resolve(start)
            await self.ended.wait()  # timers: BridgeState.tick_forever ticks every live call
        except Exception:
            log.exception("call_runner_failed", call_sid=call.call_sid)
            call.abort("call.in-progress.error-vapifault-worker-died")
        finally:
            # Set-up work and webhooks nobody is waiting for any more.
            await cancel_and_wait(*self._tasks, recancel_after=2.0)
            self._drop_model()
            end = call.end
            if end is not None and end.next_action.get("verb") == "dial" and self.state.drain is not None:
                # The <Connect action> request may reach another instance: make the transfer
                # decision durable before Twilio asks for it (bounded).
                await self.state.drain(2.0)
            self._close_twilio()
            if self._recording is not None:
                # A recording being started is let finish (bounded), so its URL is kept.
                await asyncio.wait({self._recording}, timeout=REST_TIMEOUT_S + 1)
                self._recording.cancel()
            self._forget()
            if call.info is not None and call.setup is not None:
                post = asyncio.get_running_loop().create_task(self._after_call(), name=f"post-call:{call.call_sid}")
                self.state.post_call.add(post)
                post.add_done_callback(self.state.post_call.discard)

    async def _resolve(self, start: tw.Start) -> None:
        call = self.call
        fallback = None
        if self.state.number_lookup is not None:
            number = await self.state.number_lookup(start.custom_parameters.get("to", ""))
            self.number_server_url = (number or {}).get("server_url")
            fallback = (number or {}).get("fallback_destination")
        try:
            setup = await self.state.resolve_setup(start)
        except AssistantError as exc:
            call.on_setup_failed(exc)
        else:
            call.on_setup(setup, fallback)
        finally:
            self._setup_done.set()
        self.pump()

    def _drop_model(self) -> None:
        listener, self._model_listener = self._model_listener, None
        self.model = None
        for old in (listener, self._pending_listener):
            if old is not None:
                old.abandon()
        self._pending_listener = None

    def _abandon_pending(self) -> None:
        listener, self._pending_listener = self._pending_listener, None
        if listener is not None:
            listener.abandon()

    async def _connect_model(self, delay_s: float = 0.0, timeout_s: float | None = None) -> None:
        call, config = self.call, self.state.config
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        timeout_s = min(timeout_s or config.model_connect_timeout_s, config.model_connect_timeout_s)
        if call.call_sid in self.state.prewarm.registry and call.setup is None:
            # A session was pre-warmed for this call: adopting it needs the call's own set-up
            # (shim/prewarm.py compares the two), so wait for the assistant instead of connecting.
            await self._setup_done.wait()
        warm = await self.state.prewarm.take(call)  # first connect only (shim/prewarm_io.py); else None
        if warm is not None:  # opened from /twilio/voice: its frames so far are replayed into the call
            self.state.model_health = {"ok": True, "at": _now_ms(), "detail": "connected (pre-warmed)"}
            call.on_model_connected()
            handle = ModelListener(self)  # the runner's handle on that socket, as for one it opens
            self.model = handle.transport = warm.adopt(call, handle.relay_text, handle.relay_closed)
            self._model_listener = handle
            self.pump()
            return
        url, headers = call.backend.connect_target(config.openai_realtime_url, config.openai_realtime_model,
                                                   config.openai_api_key)

        def listener_factory() -> ModelListener:
            self._pending_listener = ModelListener(self)
            return self._pending_listener

        try:
            # asyncio.timeout, not wait_for: wait_for (3.11) runs the connect as a task of its
            # own, one more turn of the loop before the SYN, behind every frame of that turn
            # and the call's own set-up (the assistant's resolution, queued just after this).
            async with asyncio.timeout(timeout_s):
                transport, listener = await ws_connect(
                    listener_factory,
                    url,
                    extra_headers=headers,
                    websocket_handshake_timeout=timeout_s,
                    max_frame_size=16 * 1024 * 1024,
                    # A socket that stays open but goes dead: picows pings after 5 s without a
                    # frame and disconnects (-> on_model_closed) if no pong comes within 5 s.
                    enable_auto_ping=True, auto_ping_idle_timeout=5, auto_ping_reply_timeout=5,
                )
        except asyncio.CancelledError:
            self._abandon_pending()
            raise
        except WSHandshakeError as exc:
            self._abandon_pending()
            status = int(exc.response.status) if exc.response is not None else None
            self.state.model_health = {"ok": False, "at": _now_ms(), "detail": f"HTTP {status}"}
            call.on_model_connect_failed(status, str(exc))
            self.pump()
            return
        except (OSError, TimeoutError) as exc:
            self._abandon_pending()
            self.state.model_health = {"ok": False, "at": _now_ms(), "detail": type(exc).__name__}
            call.on_model_connect_failed(None, f"{type(exc).__name__}: {exc}")
            self.pump()
            return
        self._pending_listener = None
        if call.end is not None:  # the caller hung up while we were connecting
            listener.abandon()
            return
        self.model, self._model_listener = transport, listener
        self.state.model_health = {"ok": True, "at": _now_ms(), "detail": "connected"}
        call.on_model_connected()
        self.pump()

    async def _start_recording(self, account_sid: str, call_sid: str) -> None:
        """artifactPlan.recordingEnabled (Vapi's default): Twilio records the live call in two
        channels; the URL goes on the call row."""
        call, config = self.call, self.state.config
        if not (config.twilio_account_sid and config.twilio_auth_token):
            call.record_event("recording_skipped", reason="TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN not set")
            return
        try:
            url = await asyncio.to_thread(start_recording, config, account_sid, call_sid)
        except TwilioRestError as exc:
            log.warning("recording_failed", call_sid=call.call_sid, error=str(exc))
            call.record_event("recording_failed", error=str(exc))
            return
        call.on_recording_started(url)

    async def _load_background(self, sound: str) -> None:
        try:
            ambience = await ambience_for(sound, self.state.http())
        except Exception as exc:  # AmbienceError, and anything unexpected: the call goes on
            # Vapi would play *something*; the office loop is the closest honest fallback.
            log.warning("background_sound_unavailable", call_sid=self.call.call_sid, url=public_url(sound), error=str(exc))
            self.call.record_event("background_sound_unavailable", error=str(exc))
            ambience = await ambience_for("office", self.state.http())
        if ambience:
            self.call.on_background_ready(BackgroundMixer(ambience))

    # --- webhooks (off the audio path: tasks of this call, fed back through the core) ----------

    def _spawn(self, coro, answers: list[str] = ()) -> None:
        """Run webhook work as a task of this call. Should it fail unexpectedly, the calls it
        was to answer get an error output: the model is never left waiting."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook_task_failed", call_sid=self.call.call_sid)
                for call_id in answers:
                    self.call.on_tool_outcome(failed_outcome(call_id, "Error: the tool could not be reached."))
                self.pump()

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _target(self, tool: dict[str, Any] | None) -> ServerTarget | None:
        setup = self.call.setup
        assert setup is not None
        return resolve_server(tool=tool, assistant=setup.assistant, assistant_id=setup.assistant_id,
                              number_server_url=self.number_server_url, secrets=self.state.secrets)

    def _deliver(self, kind: str, body: dict[str, Any]) -> None:
        sender = self.state.sender
        target = self._target(None) if self.call.setup is not None else None
        if sender is not None and target is not None:
            sender.send_in_background(target, body, kind=kind, call_sid=self.call.call_sid)

    def _dispatch_tools(self, requests: list[ToolRequest]) -> None:
        """One tool-calls message per server (Vapi batches the calls of a turn that go to the
        same URL); transfer-destination-request and apiRequest tools on their own."""
        groups: dict[str, tuple[ServerTarget, list[ToolRequest]]] = {}
        for request in requests:
            if request.kind == "transfer-destination-request":
                self._spawn(self._transfer_destination(request), [request.call_id])
                continue
            if tool_kinds.SUPPORTED[request.binding.kind].run_by is tool_kinds.RunBy.SHIM_HTTP:
                self._spawn(self._api_request(request), [request.call_id])
                continue
            target = self._target(request.binding.vapi_tool)
            if target is None:
                self.call.on_tool_outcome(failed_outcome(request.call_id, "No server URL is configured for this tool."))
                continue
            groups.setdefault(target.url, (target, []))[1].append(request)
        for target, batch in groups.values():
            self._spawn(self._post_tool_calls(target, batch), [r.call_id for r in batch if not r.fire_and_forget])
        self.pump()

    async def _post_tool_calls(self, target: ServerTarget, requests: list[ToolRequest]) -> None:
        call = self.call
        assert call.info is not None and call.setup is not None and self.state.sender is not None
        variables = call.setup.variables

        def render_static(text: str) -> str:
            try:
                return render(text, variables, "tool.parameters")
            except AssistantError:
                return text

        calls = [
            envelope.ToolCallRequest(
                id=r.call_id, name=vapi_tool_name(r.binding.vapi_tool, r.binding.realtime_name),
                arguments=envelope.with_static_parameters(r.binding.vapi_tool, r.arguments, render_static),
                tool=r.binding.vapi_tool,
            )
            for r in requests
        ]
        body = envelope.tool_calls_message(call.info, calls, call.artifact_messages(), _now_ms())
        timers = [
            asyncio.get_running_loop().create_task(self._delayed(r.call_id, ms, text))
            for r in requests if not r.fire_and_forget
            for ms, text in delayed_messages(r.binding.vapi_tool, r.arguments)
        ]
        try:
            delivery = await self.state.sender.post(target, body, kind="tool-calls", call_sid=call.call_sid,
                                                    retries=0, timeout_s=target.timeout_s)
        finally:
            for timer in timers:
                timer.cancel()
        outcomes = parse_tool_response(
            [r.call_id for r in requests], http_status=delivery.http_status, body=delivery.body,
            timed_out=delivery.status == "timeout", transport_error=delivery.error if delivery.http_status is None else None,
        )
        for request in requests:
            if not request.fire_and_forget:
                call.on_tool_outcome(outcomes[request.call_id], url=target.safe_url)
        self.pump()

    async def _delayed(self, call_id: str, after_ms: int, text: str) -> None:
        await asyncio.sleep(after_ms / 1000)
        self.call.on_tool_delayed(call_id, text)
        self.pump()

    async def _transfer_destination(self, request: ToolRequest) -> None:
        """A transferCall without destinations: ask the server (transfer-destination-request)."""
        call = self.call
        assert call.info is not None and self.state.sender is not None
        target = self._target(None)
        if target is None:
            call.on_transfer_destination(request.call_id, None, "No server URL to ask for a transfer destination.")
        else:
            body = envelope.transfer_destination_request(call.info, call.artifact_messages(), _now_ms())
            delivery = await self.state.sender.post(target, body, kind="transfer-destination-request",
                                                    call_sid=call.call_sid, retries=0, timeout_s=target.timeout_s)
            answer = delivery.json() if delivery.ok else None
            call.on_transfer_destination(request.call_id, answer if isinstance(answer, dict) else None,
                                         None if delivery.ok else (delivery.error or f"HTTP {delivery.http_status}"))
        self.pump()

    async def _api_request(self, request: ToolRequest) -> None:
        """Vapi's apiRequest tool (shim.call_work.api_request says what is sent, and why the
        model's arguments cannot redirect it)."""
        call = self.call
        assert call.setup is not None
        try:
            spec = api_request(request.binding.vapi_tool, request.arguments, call.setup.variables)
        except (AssistantError, TypeError, ValueError) as exc:
            call.on_tool_outcome(failed_outcome(request.call_id, f"Error: {exc}"))
            self.pump()
            return
        started = asyncio.get_running_loop().time()
        try:
            # No redirects (headers may carry the customer's secrets); the answer is capped, and
            # the timeout is a total deadline (a server dripping bytes cannot hold the call).
            async with asyncio.timeout(spec.timeout_s), self.state.http().stream(
                spec.method, spec.url, json=spec.json, headers=spec.headers, timeout=spec.timeout_s,
                follow_redirects=False,
            ) as response:
                raw = bytearray()
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) >= API_ANSWER_MAX_BYTES:
                        break
            text = bytes(raw[:API_ANSWER_MAX_BYTES]).decode(response.encoding or "utf-8", "replace")
            outcome = api_answer(request.call_id, response.status_code, text)
        except (httpx.TimeoutException, TimeoutError) as exc:
            outcome = api_failure(request.call_id, exc, timed_out=True)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            outcome = api_failure(request.call_id, exc, timed_out=False)
        log.info("api_request", call_sid=call.call_sid, status=outcome.status,
                 latency_ms=int((asyncio.get_running_loop().time() - started) * 1000))
        call.on_tool_outcome(outcome, url=public_url(spec.url))
        self.pump()

    async def _after_call(self) -> None:
        """Vapi's post-call work: analysisPlan (summary, structured data, success evaluation),
        stored on the call row, then the end-of-call-report to the server. Bounded by timeouts."""
        call, state = self.call, self.state
        setup, info, end = call.setup, call.info, call.end
        assert setup is not None and info is not None and end is not None
        messages = call.artifact_messages()
        transcript = envelope.artifact(messages)["transcript"]
        analysis: dict[str, Any] | None = None
        plan = setup.policy.analysis_plan
        if should_analyze(api_key=state.config.openai_api_key, hipaa=setup.policy.hipaa):
            try:
                analysis = await analyze(
                    plan, transcript, ended_reason=end.reason, client=state.http(), base_url=state.config.openai_base_url,
                    api_key=state.config.openai_api_key, model=state.config.analysis_model, timeout_s=5,
                    system_prompt=setup.session.get("instructions"),
                )
            except Exception:  # analysis must never lose the report
                log.exception("analysis_failed", call_sid=call.call_sid)
        row = analysis_row(call.call_sid, analysis)
        if row is not None:
            state.records.upsert("calls", row)
        if "end-of-call-report" in setup.policy.server_messages:
            target = self._target(None)
            if target is not None and state.sender is not None:
                body = end_of_call_report(info, ended_reason=end.reason, ended_at=end.ended_at, messages=messages,
                                          now_ms=_now_ms(), recording_url=call.recording_url, analysis=analysis)
                state.sender.send_in_background(target, body, kind="end-of-call-report", call_sid=call.call_sid)

    def _close_twilio(self) -> None:
        if not self._twilio_closed:
            self._twilio_closed = True
            self.twilio.close()

    def _forget(self) -> None:
        if self in self.state.runners:
            self.state.runners.discard(self)
            if self.state.live_calls is not None:
                self.state.live_calls.release(self.call.call_sid)
            self.state.metrics.call_finished(self.call)


# --- the picows media listener --------------------------------------------------------------


class PicowsTwilioSink:
    __slots__ = ("transport",)

    def __init__(self, transport: WSTransport):
        self.transport = transport

    def send(self, frame: str) -> None:
        self.transport.send(TEXT, frame.encode())

    def close(self) -> None:
        self.transport.send_close(WSCloseCode.OK)
        self.transport.disconnect()


class TwilioListener(WSListener):
    def __init__(self, state: BridgeState):
        self.state = state
        self.runner: CallRunner | None = None
        self._fragments: list[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.runner = CallRunner(self.state, PicowsTwilioSink(transport))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is TEXT and frame.fin:
            runner = self.runner  # runner.on_twilio_text, inlined (50 frames a second per call)
            try:
                data = frame.get_payload_as_bytes()
                model = runner.model
                if model is not None:
                    # The caller's audio while the call is live: straight to the model socket
                    # (pump is needed only after frames that can queue something else).
                    wire = runner.call.relay_caller_frame(data)
                    if wire is not None:
                        model.send(TEXT, wire)
                        return
                runner.call.on_twilio_text(data)
                runner.pump()
            except Exception:
                runner._fail("twilio frame")
        elif kind is TEXT or kind is CONTINUATION:
            # Twilio frames are small and unfragmented; reassemble anyway rather than misparse.
            if kind is TEXT:
                self._fragments = []
            if self._fragments is not None:
                self._fragments.append(frame.get_payload_as_bytes())
                if sum(map(len, self._fragments)) > tw.MAX_FRAME_BYTES:  # memory stays bounded
                    log.warning("twilio_message_too_large", call_sid=self.runner.call.call_sid)
                    transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
                    transport.disconnect()
                    self._fragments = None
                elif frame.fin:
                    data, self._fragments = b"".join(self._fragments), None
                    self.runner.on_twilio_text(data)
        elif kind is CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif kind is BINARY:
            self.runner.on_twilio_text(b"\x00binary frame")  # rejected and counted like any bad frame

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.runner is not None:
            self.runner.on_twilio_closed()


def media_listener_factory(state: BridgeState) -> Callable[[WSUpgradeRequest], Any]:
    def factory(request: WSUpgradeRequest) -> Any:
        path = request.path.split(b"?", 1)[0].rstrip(b"/")
        if path == b"/healthz":
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(b"ok"), None)
        if path != b"/twilio/media":
            return None  # 404
        if not state.stream_signature_ok(request.headers.get("x-twilio-signature")):
            # Refused before any model connection is opened (Twilio logs error 31920).
            log.warning("media_stream_signature_rejected")
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(HTTPStatus.FORBIDDEN, b"invalid X-Twilio-Signature"), None
            )
        return TwilioListener(state)

    return factory


async def start_media_server(state: BridgeState, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
    return await ws_create_server(
        media_listener_factory(state),
        host,
        port,
        websocket_handshake_timeout=10,
        enable_auto_pong=True,
        max_frame_size=tw.MAX_FRAME_BYTES,  # per connection: a huge frame closes that stream only
        reuse_port=reuse_port,  # `shim serve --workers`: every worker listens on the port
    )


def _now_ms() -> int:
    return int(time.time() * 1000)



