"""Pre-warmed model sessions, the I/O shell (the policy is in shim/prewarm.py).

`Prewarmer.start` runs from the signed `/twilio/voice` once the shim answers with `<Stream>`:
a background task (the webhook never waits for it) resolves and translates the assistant exactly
as the stream's `start` will (`BridgeState.resolve_setup`), opens the model socket and sends
`session.update`. `Prewarmer.take` is asked by `CallRunner._connect_model` for a call's first
model connect only (after its `start` was admitted: stream token checked); it waits for a socket
still opening (bounded), and the runner adopts it. Anything else (no session on this process,
expired, failed, closed, a different session) falls back to the fresh connect, unchanged.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, Callable

import structlog
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from . import twilio_media as tw
from .openai_realtime import OpenAIRealtime
from .prewarm import Registry, WarmSession

log = structlog.get_logger("shim.prewarm")


class _Listener(WSListener):
    """The pre-warmed socket's listener: frames go to the WarmSession until the call adopts it,
    then to the call's runner (as shim.bridge.ModelListener does)."""

    def __init__(self, warm: Warm):
        self.warm = warm
        self.transport: WSTransport | None = None
        self.on_text: Callable[[bytes], None] | None = None
        self.on_closed: Callable[[int | None, str], None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            data = frame.get_payload_as_bytes()
            if self.on_text is not None:
                self.on_text(data)
            else:
                self.warm.on_frame(transport, data)
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            self.close_reason = frame.get_close_message().decode("utf-8", "replace") if frame.get_close_message() else ""
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.on_closed is not None:
            self.on_closed(self.close_code, self.close_reason)
        else:
            self.warm.on_lost(self.close_code, self.close_reason)


class Warm:
    """One pre-warmed session: its task, socket and outcome (counted once)."""

    def __init__(self, owner: Prewarmer, call_sid: str):
        self.owner, self.call_sid = owner, call_sid
        self.born = time.monotonic()
        self.session: WarmSession | None = None
        self.transport: WSTransport | None = None
        self.listener: _Listener | None = None
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task | None = None
        self.outcome: str | None = None
        self.waited_ms = 0  # how long the call waited for the socket to open

    def on_frame(self, transport: WSTransport, data: bytes) -> None:
        session = self.session
        if session is None or self.outcome is not None:
            return
        session.on_model_text(data)
        for frame in session.take_out():
            transport.send(WSMsgType.TEXT, frame.encode())
        if session.problem is not None:
            self.owner.fail(self, session.problem)

    def on_lost(self, code: int | None, reason: str) -> None:
        self.transport = None
        if self.outcome is None:
            self.owner.fail(self, f"the model closed the socket before the call adopted it (code {code}) {reason[:200]}")

    def finish(self, outcome: str, **fields: Any) -> bool:
        """Record how this session ended (once); False if it already had an outcome."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.owner.metrics_inc(outcome)
        if not self.opened.done():
            self.opened.set_result(False)
        emit = log.warning if outcome == "failed" else log.info
        emit(f"prewarm_{outcome}", call_sid=self.call_sid, age_ms=int((time.monotonic() - self.born) * 1000), **fields)
        return True

    def close(self) -> None:
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        transport, self.transport = self.transport, None  # (None once adopted: the call owns it)
        if transport is not None:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def adopt(self, call: Any, on_text: Callable[[bytes], None],
              on_closed: Callable[[int | None, str], None]) -> WSTransport:
        """The call takes the socket: from here its frames go to `on_text`; the frames received
        so far are replayed into `call` and what it queues in answer is sent (minus what was sent
        from here already). Synchronous: no frame can slip in between."""
        assert self.transport is not None and self.listener is not None and self.session is not None
        transport, self.transport = self.transport, None
        self.listener.on_text, self.listener.on_closed = on_text, on_closed
        try:
            frames, diverged = self.session.hand_over(call)
        except BaseException:  # the call failed on a replayed frame: the socket is nobody's
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            raise
        if diverged:
            log.error("prewarm_replay_diverged", call_sid=self.call_sid)
        for frame in frames:
            transport.send(WSMsgType.TEXT, frame.encode())
        self.finish("adopted", waited_ms=self.waited_ms, replayed=len(self.session.frames), ready=self.session.ready)
        return transport


class Prewarmer:
    """The process's pre-warmed sessions. `state` is the BridgeState (config, resolve_setup,
    metrics); `enabled` is SHIM_PREWARM."""

    def __init__(self, state: Any, *, enabled: bool, registry: Registry[Warm] | None = None):
        self.state = state
        self.enabled = enabled
        self.registry: Registry[Warm] = registry or Registry()
        self._asked: weakref.WeakSet[Any] = weakref.WeakSet()  # calls that had their one chance
        self._sweep: asyncio.TimerHandle | None = None

    def metrics_inc(self, outcome: str) -> None:
        prewarm = getattr(self.state.metrics, "prewarm", None)
        if prewarm is not None:
            prewarm(outcome)

    # --- from the voice webhook -----------------------------------------------------------

    def start(self, call_sid: str, account_sid: str, parameters: dict[str, str]) -> None:
        """Open a session for this call in the background. `parameters` are the <Stream>'s
        <Parameter>s but the token, i.e. the custom parameters its `start` will carry."""
        if not self.enabled or not call_sid:
            return
        warm = Warm(self, call_sid)
        for old in self.registry.add(call_sid, warm):
            if old.finish("expired", reason="displaced (cap or a repeated webhook)"):
                old.close()
        start = tw.Start(stream_sid="", call_sid=call_sid, account_sid=account_sid, custom_parameters=dict(parameters))
        warm.task = asyncio.get_running_loop().create_task(self._open(warm, start), name=f"prewarm:{call_sid}")
        self._schedule_sweep()

    async def _open(self, warm: Warm, start: tw.Start) -> None:
        config = self.state.config
        created: list[_Listener] = []

        def listener() -> _Listener:
            created.append(_Listener(warm))
            return created[-1]

        try:
            setup = await self.state.resolve_setup(start)  # the very path the stream's start takes
            backend = OpenAIRealtime()  # the class CallRunner's Call runs (its default backend)
            warm.session = WarmSession(backend, setup.session)
            url, headers = backend.connect_target(config.openai_realtime_url, config.openai_realtime_model,
                                                  config.openai_api_key)
            transport, opened = await asyncio.wait_for(
                ws_connect(
                    listener, url, extra_headers=headers,
                    websocket_handshake_timeout=config.model_connect_timeout_s,
                    max_frame_size=16 * 1024 * 1024,
                    enable_auto_ping=True, auto_ping_idle_timeout=5, auto_ping_reply_timeout=5,
                ),
                config.model_connect_timeout_s,
            )
        except BaseException as exc:
            # A handshake that went through as the wait was given up or cancelled: close that socket.
            for orphan in created:
                if orphan.transport is not None:
                    orphan.transport.send_close(WSCloseCode.OK)
                    orphan.transport.disconnect()
            if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            self.fail(warm, f"{type(exc).__name__}: {str(exc)[:200]}")  # the call connects afresh
            return
        warm.listener = opened
        if warm.outcome is not None:  # expired, displaced or failed while connecting
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        warm.transport = transport
        for frame in warm.session.take_out():
            transport.send(WSMsgType.TEXT, frame.encode())
        if not warm.opened.done():
            warm.opened.set_result(True)

    def fail(self, warm: Warm, reason: str) -> None:
        self.registry.discard(warm.call_sid, warm)
        if warm.finish("failed", reason=reason):
            warm.close()

    # --- TTL ------------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        """One timer, at the oldest session's expiry (entries are oldest first, so a timer
        already set is due no later than a newer entry's; if its entry was taken meanwhile it
        fires early, finds nothing and sets the next)."""
        due = self.registry.next_expiry()
        if due is None or self._sweep is not None:
            return
        delay = max(0.0, due - self.registry.clock()) + 0.01
        self._sweep = asyncio.get_running_loop().call_later(delay, self.sweep)

    def sweep(self) -> None:
        """Close the sessions past their TTL (a call that never streamed keeps no model session)."""
        self._sweep = None
        for warm in self.registry.expired():
            if warm.finish("expired", reason=f"no stream within {self.registry.ttl_s:g} s"):
                warm.close()
        if len(self.registry):
            self._schedule_sweep()

    def close_all(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for warm in self.registry.drain():
            if warm.finish("expired", reason="shutdown"):
                warm.close()

    # --- from the call's first model connect ----------------------------------------------

    async def take(self, call: Any) -> Warm | None:
        """The session pre-warmed for `call`, ready to adopt, or None (connect afresh). Only a
        call's first ask can get one: a reconnect never adopts a pre-warmed session."""
        if not self.enabled or call in self._asked:
            return None
        self._asked.add(call)
        warm = self.registry.take(call.call_sid)
        if warm is None:
            self.metrics_inc("missed")
            return None
        asked = time.monotonic()
        try:
            timeout = max(0.0, warm.born + self.state.config.model_connect_timeout_s - asked)
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that lands as the
            # session opens, and a superseded connect attempt would adopt it (shim/aio.py).
            async with asyncio.timeout(timeout):
                opened = await asyncio.shield(warm.opened)
        except TimeoutError:
            opened = False
        except asyncio.CancelledError:  # the call ended while its session was still opening
            if warm.finish("failed", reason="the call ended before adopting it"):
                warm.close()
            raise
        if warm.outcome is not None:  # failed or closed while the call waited
            return None
        if not opened or warm.transport is None or warm.session is None:
            problem: str | None = "the session did not open in time"
        elif call.end is not None:
            problem = "the call ended before adopting it"
        else:
            problem = warm.session.adoptable(call)
        if problem is not None:
            self.fail(warm, problem)
            return None
        warm.waited_ms = int((time.monotonic() - asked) * 1000)
        return warm
