"""Serving a stand-in's ASGI app on 127.0.0.1 inside the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started as subprocesses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def raw_http_server(response: bytes) -> tuple[asyncio.AbstractServer, int]:
    """A server that answers every connection with `response` (a redirect, or plain HTTP where
    TLS is expected)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.read(4096), 2)
            writer.write(response)
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # leave the test runner's signal handlers alone
        yield


class LocalServer:
    """uvicorn on an ephemeral 127.0.0.1 port: `base = await LocalServer(app).start()`."""

    def __init__(self, app, name: str):
        self.app, self.name = app, name
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> str:
        """Returns "http://127.0.0.1:PORT"."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=1)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError(f"{self.name} exited during startup")
            await asyncio.sleep(0.005)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(self._task, 5)
            except asyncio.TimeoutError:  # pragma: no cover
                self._server.force_exit = True
                await self._task
        if self._sock is not None:
            self._sock.close()
        self._server = self._task = self._sock = None


class ServedStandIn:
    """Lifecycle shared by the HTTP stand-ins: `start()` (theirs) sets `_http`; this stops it,
    and makes them async context managers."""

    _http: LocalServer | None = None

    async def start(self) -> str:  # pragma: no cover - every stand-in defines it
        raise NotImplementedError

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
