"""`shim serve`: one public port, routed by path, and a drain on SIGTERM.

One port. Twilio's Media Streams docs name only TCP 443 for the stream ("allow secure WebSocket
connections (TCP port 443) from Twilio", https://www.twilio.com/docs/global-infrastructure/
firewall-configurations/media-streams-configuration), so webhooks and media share the public URL. A front listener accepts each connection, peeks (MSG_PEEK, nothing
consumed) at its request line, and hands the socket over with `loop.connect_accepted_socket`:
`GET /twilio/media` to the picows WebSocket protocol (the fast path: its callbacks run the call
core synchronously), anything else to uvicorn's HTTP protocol (Starlette: webhooks, health,
metrics). After the hand-off the front is out of the path: frames go socket -> picows exactly as
on a picows-only port (`make bench`, README "One port").

The drain. SIGTERM (the platform's deploy) makes /readyz answer 503 at once; the port stays
open, so `/twilio/stream-ended` and `/twilio/status` of calls that end during the drain are
still answered; live calls get SHIM_DRAIN_TIMEOUT minus DRAIN_RESERVE_S to finish; the rest
hear the apology and end with `ended_reason` worker-shutdown; then rows, reports and the
database close, all within SHIM_DRAIN_TIMEOUT (set it to the platform's kill timeout).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
import uvicorn
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from . import twilio_media as tw
from .aio import cancel_and_wait
from .config import Config

log = structlog.get_logger("shim.serve")

MEDIA_PATH = b"/twilio/media"
REQUEST_LINE_MAX = 8192  # a request line longer than this is not ours: HTTP answers it (414/400)
SNIFF_TIMEOUT_S = 10.0  # a client that sends no request line in this long is dropped
# The picows settings of the media protocol (as bridge.start_media_server uses them).
MEDIA_HANDSHAKE_TIMEOUT_S = 10
MEDIA_MAX_FRAME_BYTES = tw.MAX_FRAME_BYTES  # per connection: a huge frame closes that stream only


def media_protocol_factory(listener_factory: Callable[[Any], Any]) -> Callable[[], asyncio.BaseProtocol]:
    """picows' server protocol, built the way `picows.ws_create_server` builds it (picows 2.x)."""
    logger = logging.getLogger("picows.server")

    def factory() -> asyncio.BaseProtocol:
        return WSProtocol(
            None, None, False, listener_factory, logger, True, MEDIA_HANDSHAKE_TIMEOUT_S,
            False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE,  # no auto ping: Twilio sends media every 20 ms
            True,  # auto pong
            MEDIA_MAX_FRAME_BYTES, None, 16 * 1024,
        )

    return factory


try:
    import aiofastnet
except ImportError:  # pragma: no cover - picows pulls it in
    aiofastnet = None


async def _connect_media(loop: asyncio.AbstractEventLoop, factory, conn: socket.socket) -> None:
    if aiofastnet is not None:
        await aiofastnet.connect_accepted_socket(loop, factory, conn)
    else:  # pragma: no cover
        await loop.connect_accepted_socket(factory, conn)


def request_path(head: bytes) -> bytes | None:
    """The path of an HTTP request line (`GET /x?y HTTP/1.1`), without the query; None if the
    line is incomplete."""
    end = head.find(b"\r\n")
    if end < 0:
        end = head.find(b"\n")
        if end < 0:
            return None
    parts = head[:end].split(b" ")
    if len(parts) < 2:
        return b""
    return parts[1].split(b"?", 1)[0].rstrip(b"/")


class FrontDoor:
    """The one public listener: routes each accepted connection by its request path."""

    def __init__(self) -> None:
        self.http_factory: Callable[[], asyncio.BaseProtocol] | None = None
        self.media_factory: Callable[[], asyncio.BaseProtocol] | None = None
        self.sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._routing: set[asyncio.Task] = set()
        self.routed = {"media": 0, "http": 0, "dropped": 0}

    def bind(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Take the port (before anything starts: a busy port fails the start at once).
        reuse_port: one of `shim serve --workers` (the parent holds the port, shim/workers.py)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
        self.sock.setblocking(False)

    def start(self, http_factory: Callable[[], asyncio.BaseProtocol], media_factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.http_factory, self.media_factory = http_factory, media_factory
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever(), name="front-door")

    @property
    def port(self) -> int:
        assert self.sock is not None
        return self.sock.getsockname()[1]

    async def close(self) -> None:
        """Stop accepting (connections already handed over live on)."""
        await cancel_and_wait(self._accepting)
        if self.sock is not None:
            self.sock.close()
        for task in list(self._routing):
            task.cancel()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            try:
                conn, _addr = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.error("accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._route(conn))
            self._routing.add(task)
            task.add_done_callback(self._routing.discard)

    async def _route(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(SNIFF_TIMEOUT_S):  # (not wait_for: no task, no extra turn of the loop)
                head = await self._peek_request_line(loop, conn)
        except (OSError, TimeoutError, asyncio.CancelledError):
            self.routed["dropped"] += 1
            conn.close()
            return
        if head is None:  # closed before saying anything
            self.routed["dropped"] += 1
            conn.close()
            return
        media = request_path(head) == MEDIA_PATH
        self.routed["media" if media else "http"] += 1
        try:
            if media and self.media_factory != self.http_factory:
                # The same transport picows' own server uses (aiofastnet when installed).
                await _connect_media(loop, self.media_factory, conn)
            else:
                await loop.connect_accepted_socket(self.http_factory, conn)
        except OSError:
            conn.close()

    @staticmethod
    async def _peek_request_line(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes | None:
        fd = conn.fileno()
        while True:
            try:  # peek first: the request line is usually there already (sent with the handshake)
                head = conn.recv(REQUEST_LINE_MAX, socket.MSG_PEEK)
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)
                continue
            if not head:
                return None
            if b"\n" in head or len(head) >= REQUEST_LINE_MAX:
                return head
            # Part of a request line: the data stays unread, so the socket stays readable;
            # wait a little for the rest instead of spinning.
            await asyncio.sleep(0.005)


class DrainingServer(uvicorn.Server):
    """uvicorn, with the shim's drain between the signal and uvicorn's own shutdown, and with
    the front door as its only listener."""

    def __init__(self, config: uvicorn.Config, shim: Any, front: FrontDoor, *, media_via_picows: bool = True):
        super().__init__(config)
        self.shim = shim
        self.front = front
        # False: /twilio/media goes to Starlette's WebSocket route too (the portable ASGI path).
        self.media_via_picows = media_via_picows

    def http_protocol(self) -> asyncio.BaseProtocol:
        return self.config.http_protocol_class(  # what uvicorn's own create_server builds
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # lifespan (the shim starts), no uvicorn listener
        if self.should_exit:
            return
        from .bridge import media_listener_factory

        media = media_protocol_factory(media_listener_factory(self.shim.bridge)) if self.media_via_picows else self.http_protocol
        self.front.start(self.http_protocol, media)
        # Everything loaded at start (modules, assistants, tables: ~75k objects) lives as long as
        # the process: out of the collector's sight, a full collection no longer walks it with
        # every call's audio waiting (one took 63 ms at 100 calls before this).
        # https://docs.python.org/3/library/gc.html#gc.freeze
        gc.collect()
        gc.freeze()
        log.info("listening", port=self.front.port, media_url=self.shim.config.media_stream_url)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not re-raised after shutdown (uvicorn's default): we exit 0 once everything is written.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self.shim.draining = True  # /readyz says 503 from this instant

    async def main_loop(self) -> None:
        await super().main_loop()
        if not self.force_exit:
            await self.shim.drain_calls()  # the port still answers webhooks meanwhile
        await self.front.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.front.close()
        # uvicorn's own grace for open HTTP requests comes out of what is left of the drain time.
        loop = asyncio.get_running_loop()
        exit_by = (self.shim.drain_started or loop.time()) + self.shim.config.drain_timeout_s
        self.config.timeout_graceful_shutdown = max(0.1, min(5.0, (exit_by - loop.time()) / 3))
        await super().shutdown(sockets=sockets)


async def serve(config: Config, host: str, port: int, media_port: int | None, worker: Any = None) -> None:
    """One process serving; `worker` (a workers.WorkerSlot): one of `shim serve --workers N`."""
    from .app import create_app
    from .errors import Failure

    front = FrontDoor()
    try:
        front.bind(host, port, reuse_port=worker is not None)
    except OSError as exc:
        raise Failure(f"--port {port} on {host}: {exc.strerror or exc}") from None
    if worker is not None:
        from .workers import die_with_parent

        die_with_parent(worker)
    app = create_app(config, media_host=host, media_port=media_port, worker=worker)
    server = DrainingServer(
        uvicorn.Config(
            app, host=host, port=port, lifespan="on", log_config=None, access_log=False,
            ws="websockets-sansio",
            ws_max_size=tw.MAX_FRAME_BYTES,  # the Starlette media route: Twilio frames are small
            proxy_headers=False,  # signatures use PUBLIC_URL, never forwarded headers
            timeout_graceful_shutdown=5,  # calls are drained before uvicorn's shutdown starts
        ),
        app.state.shim, front,
    )
    await server.serve()
    if worker is not None and os.getppid() != worker.parent:
        # The parent was killed (this drain came from PR_SET_PDEATHSIG): nobody else removes it.
        shutil.rmtree(worker.run_dir, ignore_errors=True)
