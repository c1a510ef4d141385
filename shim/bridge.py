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
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Protocol

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
from twilio.request_validator import RequestValidator

from . import twilio_media as tw
from .assistant import AssistantError, CallContext, load_assistant, load_saved_tools
from .background import AmbienceError, BackgroundMixer, ambience_for, public_url
from .translate import CallSetup, translate
from .twilio_rest import TwilioRestError, start_recording
from .call import Call, RecordSink
from .config import Config

log = structlog.get_logger("shim.bridge")
TICK_SECONDS = 0.5


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
    validator: RequestValidator | None = None
    _http: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        """One HTTP client for the process (background sounds now, webhooks later)."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10, follow_redirects=True)
        return self._http

    def __post_init__(self) -> None:
        self.validator = RequestValidator(self.config.twilio_auth_token)

    def stream_signature_ok(self, signature: str | None) -> bool:
        """The upgrade is signed over the exact <Stream url> we rendered (from PUBLIC_URL, never
        from request headers); Twilio's docs suggest also trying it with a trailing slash."""
        if not signature or not self.config.twilio_auth_token:
            return False
        url = self.config.media_stream_url
        assert self.validator is not None
        return self.validator.validate(url, {}, signature) or self.validator.validate(url + "/", {}, signature)

    async def resolve_setup(self, start: tw.Start) -> CallSetup:
        """Load and translate the call's assistant (file reads and template rendering run in a
        worker thread: nothing slow on the event loop that carries every call's audio)."""
        return await asyncio.to_thread(self._resolve_setup, start)

    def _resolve_setup(self, start: tw.Start) -> CallSetup:
        params = start.custom_parameters
        assistant_id = params.get("assistant", "")
        assistant = load_assistant(self.config.assistants_dir, assistant_id)
        reserved = {"assistant", "from", "to"}
        ctx = CallContext(
            call_sid=start.call_sid,
            from_number=params.get("from", ""),
            to_number=params.get("to", ""),
            variables={k: v for k, v in params.items() if k not in reserved},
        )
        model = assistant.get("model")
        saved = load_saved_tools(self.config.assistants_dir, model.get("toolIds") if isinstance(model, dict) else None)
        return translate(
            assistant_id,
            assistant,
            ctx,
            model=self.config.openai_realtime_model,
            saved_tools=saved,
            transcription_model=self.config.transcription_model,
            voice_overrides=dict(self.config.voice_map),
        )

    def model_url(self) -> str:
        base = self.config.openai_realtime_url
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}model={self.config.openai_realtime_model}"


class ModelListener(WSListener):
    def __init__(self, runner: CallRunner):
        self.runner = runner
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.runner.on_model_text(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            self.close_reason = frame.get_close_message().decode("utf-8", "replace") if frame.get_close_message() else ""
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.runner.on_model_disconnected(self.close_code, self.close_reason)


class CallRunner:
    def __init__(self, state: BridgeState, twilio: TwilioSink):
        self.state = state
        self.twilio = twilio
        self.model: WSTransport | None = None
        self.call = Call(state.records, log=log, metrics=state.metrics)
        self.task: asyncio.Task | None = None
        self.ended = asyncio.Event()
        self._twilio_closed = False
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

    def on_model_disconnected(self, code: int | None, reason: str) -> None:
        self.model = None
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

    def pump(self) -> None:
        call = self.call
        if call.twilio_out and not self._twilio_closed:
            send = self.twilio.send
            for frame in call.take_twilio_out():
                send(frame)
        if call.model_out and self.model is not None:
            model = self.model
            for event in call.take_model_out():
                model.send(WSMsgType.TEXT, event.encode())
        if call.start is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run(), name=f"call:{call.call_sid}")
        if call.end is not None and not self.ended.is_set():
            self.ended.set()
            if self.task is None:
                self._close_twilio()

    async def run(self) -> None:
        call = self.call
        try:
            await self._resolve()
            if call.end is None:
                # The background sound loads while the model socket opens (a URL can take seconds).
                await asyncio.gather(self._connect_model(), self._load_background(), self._start_recording())
            while not self.ended.is_set():
                try:
                    await asyncio.wait_for(self.ended.wait(), TICK_SECONDS)
                except TimeoutError:
                    call.tick()
                    self.pump()
        except Exception:
            log.exception("call_runner_failed", call_sid=call.call_sid)
            call.abort("call.in-progress.error-vapifault-worker-died")
        finally:
            model, self.model = self.model, None
            if model is not None:
                model.send_close(WSCloseCode.OK)
                model.disconnect()
            self._close_twilio()
            self._forget()

    async def _resolve(self) -> None:
        call = self.call
        assert call.start is not None
        try:
            setup = await self.state.resolve_setup(call.start)
        except AssistantError as exc:
            call.on_setup_failed(exc)
        else:
            call.on_setup(setup)
        self.pump()

    async def _connect_model(self) -> None:
        call, config = self.call, self.state.config
        headers = {"Authorization": f"Bearer {config.openai_api_key}"}
        try:
            transport, _listener = await asyncio.wait_for(
                ws_connect(
                    lambda: ModelListener(self),
                    self.state.model_url(),
                    extra_headers=headers,
                    websocket_handshake_timeout=config.model_connect_timeout_s,
                    max_frame_size=16 * 1024 * 1024,
                ),
                config.model_connect_timeout_s,
            )
        except WSHandshakeError as exc:
            status = int(exc.response.status) if exc.response is not None else None
            call.on_model_connect_failed(status, str(exc))
            self.pump()
            return
        except (OSError, TimeoutError) as exc:
            call.on_model_connect_failed(None, f"{type(exc).__name__}: {exc}")
            self.pump()
            return
        if call.end is not None:  # the caller hung up while we were connecting
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        self.model = transport
        call.on_model_connected()
        self.pump()

    async def _start_recording(self) -> None:
        """artifactPlan.recordingEnabled (Vapi's default): Twilio records the live call in two
        channels; the URL goes on the call row."""
        call, config = self.call, self.state.config
        if call.setup is None or not call.setup.policy.recording:
            return
        if not (config.twilio_account_sid and config.twilio_auth_token):
            call.record_event("recording_skipped", reason="TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN not set")
            return
        try:
            url = await asyncio.to_thread(start_recording, config, call.account_sid, call.call_sid)
        except TwilioRestError as exc:
            log.warning("recording_failed", call_sid=call.call_sid, error=str(exc))
            call.record_event("recording_failed", error=str(exc))
            return
        call.on_recording_started(url)

    async def _load_background(self) -> None:
        setup = self.call.setup
        if setup is None or setup.policy.background_sound == "off":
            return
        sound = setup.policy.background_sound
        try:
            ambience = await ambience_for(sound, self.state.http())
        except AmbienceError as exc:
            # Vapi would play *something*; the office loop is the closest honest fallback.
            log.warning("background_sound_unavailable", call_sid=self.call.call_sid, url=public_url(sound), error=str(exc))
            self.call.record_event("background_sound_unavailable", error=str(exc))
            ambience = await ambience_for("office", self.state.http())
        if ambience:
            self.call.mixer = BackgroundMixer(ambience)

    def _close_twilio(self) -> None:
        if not self._twilio_closed:
            self._twilio_closed = True
            self.twilio.close()

    def _forget(self) -> None:
        if self in self.state.runners:
            self.state.runners.discard(self)
            self.state.metrics.call_finished(self.call)


# --- the picows media listener --------------------------------------------------------------


class PicowsTwilioSink:
    __slots__ = ("transport",)

    def __init__(self, transport: WSTransport):
        self.transport = transport

    def send(self, frame: str) -> None:
        self.transport.send(WSMsgType.TEXT, frame.encode())

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
        if kind == WSMsgType.TEXT and frame.fin:
            self.runner.on_twilio_text(frame.get_payload_as_bytes())
        elif kind in (WSMsgType.TEXT, WSMsgType.CONTINUATION):
            # Twilio frames are small and unfragmented; reassemble anyway rather than misparse.
            if kind == WSMsgType.TEXT:
                self._fragments = []
            if self._fragments is not None:
                self._fragments.append(frame.get_payload_as_bytes())
                if frame.fin:
                    data, self._fragments = b"".join(self._fragments), None
                    self.runner.on_twilio_text(data)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif kind == WSMsgType.BINARY:
            log.warning("twilio_binary_frame_ignored", call_sid=self.runner.call.call_sid)

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


async def start_media_server(state: BridgeState, host: str, port: int) -> asyncio.Server:
    return await ws_create_server(
        media_listener_factory(state),
        host,
        port,
        websocket_handshake_timeout=10,
        enable_auto_pong=True,
    )
