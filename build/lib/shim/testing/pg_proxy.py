"""A TCP proxy in front of Postgres, for outage tests: pause() = "the database just went away".

    proxy = PgProxy.from_dsn(dsn)          # unix-socket DSN (embedded server) or host:port
    await proxy.start()
    rec = Recorder(proxy.dsn_for(dsn), ...)
    await proxy.pause()                    # live connections are aborted, new ones reset at once
    await proxy.resume()
    await proxy.stall()                    # a network partition: sockets stay open, nothing flows
    await proxy.resume()                   # (stalled connections are aborted, new ones flow)

The embedded server listens only on a unix socket (<socket dir>/.s.PGSQL.<port>); the proxy listens
on 127.0.0.1:<random port> and forwards bytes unchanged (the server then sees a local connection,
so trust auth still applies, whatever password the client sends).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

log = structlog.get_logger(__name__)

__all__ = ["PgProxy"]


class PgProxy:
    def __init__(
        self, host: str | None = None, port: int = 5432, *, unix_socket: str | Path | None = None
    ) -> None:
        if (host is None) == (unix_socket is None):
            raise ValueError("PgProxy needs exactly one target: host (+port) or unix_socket")
        self.target_host = host
        self.target_port = port
        self.unix_socket = Path(unix_socket) if unix_socket is not None else None
        self.port: int | None = None
        self.paused = False
        self.connections_total = 0  # client connections accepted (including refused ones)
        self.stalled = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.AbstractServer | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._stalled_clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_dsn(cls, dsn: str) -> PgProxy:
        """Target taken from a URL-form DSN: ?host=/dir (unix socket dir) or host[:port]."""
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "localhost"
        port = int(query.get("port") or parts.port or 5432)
        if host.startswith("/"):
            return cls(unix_socket=Path(host) / f".s.PGSQL.{port}")
        return cls(host, port)

    @property
    def live_connections(self) -> int:
        return len(self._live)

    async def start(self) -> int:
        """Listen on 127.0.0.1:<free port>; returns the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def pause(self) -> None:
        """Abort every live connection (both sides) and reset new ones until resume()."""
        self.paused = True
        await self._abort_all()
        log.info("pg_proxy.paused", port=self.port)

    async def stall(self) -> None:
        """Stop forwarding without closing anything (both directions, new connections too), like a
        network partition: clients see their queries and connection attempts hang until they time out."""
        self.stalled = True
        self._flowing.clear()
        log.info("pg_proxy.stalled", port=self.port)

    async def resume(self) -> None:
        """Back to normal. Connections that lived through a stall are aborted (their streams are
        out of step); new ones flow."""
        if self.stalled:
            await self._abort_all()
            self.stalled = False
            self._flowing.set()
        self.paused = False
        log.info("pg_proxy.resumed", port=self.port)

    async def _abort_all(self) -> None:
        for client, upstream in list(self._live):
            client.transport.abort()
            upstream.transport.abort()
        self._live.clear()
        for client in list(self._stalled_clients):
            client.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        await self.pause()
        self.stalled = False
        self._flowing.set()  # releases connections still waiting out a stall
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def dsn_for(self, base_dsn: str) -> str:
        """base_dsn (URL form) rewritten to go through the proxy: same user, password, database."""
        if self.port is None:
            raise RuntimeError("start() the proxy first")
        parts = urlsplit(base_dsn)
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("host", "port", "hostaddr")]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.paused:
            writer.transport.abort()
            return
        if self.stalled:
            self._stalled_clients.add(writer)
            try:
                await self._flowing.wait()
            finally:
                self._stalled_clients.discard(writer)
            writer.transport.abort()  # it waited through a stall: drop it, as resume() does
            return
        try:
            if self.unix_socket is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(str(self.unix_socket))
            else:
                up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError as exc:
            log.warning("pg_proxy.upstream_unreachable", error=str(exc))
            writer.transport.abort()
            return
        if self.paused:  # paused while we were connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._live.add(pair)
        t1 = asyncio.create_task(self._pump(reader, up_writer))
        t2 = asyncio.create_task(self._pump(up_reader, writer))
        self._tasks.update((t1, t2))
        try:
            await asyncio.wait((t1, t2), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (t1, t2):
                t.cancel()
            await asyncio.gather(t1, t2, return_exceptions=True)
            self._tasks.difference_update((t1, t2))
            self._live.discard(pair)
            for w in (writer, up_writer):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
