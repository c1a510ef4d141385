"""The call browser: a small read-only web view of calls, served by the shim under /admin.

Off unless SHIM_ADMIN_TOKEN is set (the routes are not mounted: /admin answers 404). The token is
accepted as `Authorization: Bearer <token>` or typed once into /admin/login, which sets an
HttpOnly, SameSite=Strict session cookie (an expiring HMAC keyed by the token, never the token
itself; changing the token ends every session). Comparisons are constant-time.

Pages are rendered on the server with Jinja2, autoescaped (transcripts, tool arguments and
results are untrusted input), under a Content-Security-Policy that allows no script at all. The
recording is proxied with the account's Twilio credentials, Range requests passed through so the
player can seek; the browser never sees the credentials or Twilio's URL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlencode

import asyncpg
import jinja2
import structlog
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from . import ops, recordings

log = structlog.get_logger("shim.admin")

ADMIN_TOKEN_ENV = "SHIM_ADMIN_TOKEN"
COOKIE = "shim_admin"
SESSION_SECONDS = 12 * 3600
PREFIX = "/admin"
SECURITY_HEADERS = {
    # No script anywhere; inline <style> only; images may be data: URLs (the parity plots).
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "media-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


# --- parity report hook ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One figure of the parity report: an image (SVG or PNG bytes), shown as a data: URL, so
    whatever it contains cannot run in the page."""

    title: str
    image: bytes
    mime: str = "image/svg+xml"

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.image).decode()}"


ParityPlots = Callable[[asyncpg.Connection], Awaitable[list[Plot]]]


def register_parity_plots(make_plots: ParityPlots | None) -> None:
    """The parity report registers the function that draws its plots from Postgres; the
    /admin/parity page shows them under its table of runs (None unregisters)."""
    global _parity_plots
    _parity_plots = make_plots


async def parity_available(conn) -> bool:
    """True once `shim parity run`/`replay` has stored a run (the table itself always exists)."""
    if not await conn.fetchval("SELECT to_regclass('parity_runs') IS NOT NULL"):
        return False
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM parity_runs)"))


async def report_plots(conn) -> list[Plot]:
    """The parity report's own figures (shim/parity/report.py), drawn from the same SQL."""
    from .parity.report import svg_plots

    return [Plot(title, svg.encode()) for title, svg in await svg_plots(conn) if svg.startswith("<svg")]


_parity_plots: ParityPlots | None = report_plots


async def parity_runs(conn, limit: int = 50) -> tuple[list[str], list[list[Any]]]:
    """The latest parity runs, whatever columns the table has: newest first by its first
    timestamp column when it has one."""
    columns = await conn.fetch(
        """SELECT column_name, data_type FROM information_schema.columns
            WHERE table_name = 'parity_runs' AND table_schema = current_schema() ORDER BY ordinal_position""")
    names = [c["column_name"] for c in columns]
    stamp = next((c["column_name"] for c in columns if c["data_type"].startswith("timestamp")), None)
    order = f' ORDER BY "{stamp.replace(chr(34), chr(34) * 2)}" DESC NULLS LAST' if stamp else ""
    rows = await conn.fetch(f"SELECT * FROM parity_runs{order} LIMIT {int(limit)}")
    return names, [[r[n] for n in names] for r in rows]


# --- authentication -------------------------------------------------------------------------


class AdminAuth:
    def __init__(self, token: str, *, secure_cookie: bool, clock: Callable[[], float] = time.time):
        self._token = token.encode()
        self.secure_cookie = secure_cookie
        self.clock = clock

    def token_ok(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def _mac(self, expires: int) -> str:
        return hmac.new(self._token, f"shim-admin-session:{expires}".encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        expires = int(self.clock()) + SESSION_SECONDS
        return f"{expires}.{self._mac(expires)}"

    def session_ok(self, value: str | None) -> bool:
        if not value:
            return False
        expires_raw, _, mac = value.partition(".")
        if not expires_raw.isdigit():
            return False
        expires = int(expires_raw)
        return hmac.compare_digest(mac, self._mac(expires)) and expires > self.clock()

    def authorized(self, request: Request) -> bool | None:
        """True / False; None when the request carries no credentials at all."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            return scheme.lower() == "bearer" and self.token_ok(value.strip())
        cookie = request.cookies.get(COOKIE)
        if cookie is None:
            return None
        return self.session_ok(cookie)


# --- the pages ------------------------------------------------------------------------------

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,  # every template, whatever its name: transcripts are untrusted input
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_TEMPLATES.filters["utc"] = ops.utc_text
_TEMPLATES.filters["duration"] = ops.format_duration
_TEMPLATES.filters["compact"] = lambda v, limit=2000: ops.compact_text(v, limit)
_TEMPLATES.filters["path"] = lambda v: quote(str(v), safe="")
_TEMPLATES.globals["tool_outcome"] = ops.tool_outcome


def _offset_seconds(ts: datetime | None, start: datetime | None) -> str:
    if ts is None or start is None:
        return ""
    return f"{(ts - start).total_seconds():+.1f}s"


_TEMPLATES.filters["offset"] = _offset_seconds


class Admin:
    """The /admin routes of one shim process (`db` gives its asyncpg pool)."""

    def __init__(self, token: str, config, db: Callable[[], Awaitable[asyncpg.Pool]]):
        self.auth = AdminAuth(token, secure_cookie=config.public_url.startswith("https://"))
        self.config = config
        self.db = db

    def routes(self) -> list[BaseRoute]:
        # /admin → /admin/ with a relative Location (Starlette's own slash redirect would build
        # an absolute URL from the Host header, wrong behind a TLS-terminating proxy).
        return [Route(PREFIX, lambda request: self._secure(RedirectResponse(PREFIX + "/", status_code=307))),
                Mount(PREFIX, routes=[
            Route("/", self.guard(self.calls_page)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/calls/{call_sid}", self.guard(self.call_page)),
            Route("/calls/{call_sid}/recording.{fmt}", self.guard(self.recording)),
            Route("/parity", self.guard(self.parity_page)),
        ])]

    # -- plumbing --

    def guard(self, endpoint):
        async def guarded(request: Request) -> Response:
            ok = self.auth.authorized(request)
            if ok:
                try:
                    return await endpoint(request)
                except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
                    log.error("admin_database_unavailable", error=str(exc)[:300])
                    return self._secure(PlainTextResponse("the database is unreachable right now; try again shortly", status_code=503))
            if ok is None and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return self._secure(RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303))
            return self._secure(PlainTextResponse("unauthorized: send Authorization: Bearer <SHIM_ADMIN_TOKEN> or log in at /admin/login",
                                                  status_code=401, headers={"WWW-Authenticate": 'Bearer realm="shim admin"'}))
        return guarded

    @staticmethod
    def _secure(response: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def page(self, template: str, status_code: int = 200, **context: Any) -> Response:
        html = _TEMPLATES.get_template(template).render(prefix=PREFIX, **context)
        return self._secure(HTMLResponse(html, status_code=status_code))

    @staticmethod
    def _safe_next(value: str | None) -> str:
        # Only our own pages: no scheme, no host, no protocol-relative //evil.example.
        if value and value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value:
            return value
        return PREFIX + "/"

    # -- login --

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.page("login.html", next=self._safe_next(request.query_params.get("next")), error=None)
        form = await request.form()
        target = self._safe_next(str(form.get("next") or ""))
        if not self.auth.token_ok(str(form.get("token") or "")):
            log.warning("admin_login_failed", client=request.client.host if request.client else None)
            await asyncio.sleep(0.5)  # slows guessing; the token itself should be long and random
            return self.page("login.html", status_code=401, next=target, error="That token is not right.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, self.auth.new_session(), max_age=SESSION_SECONDS, path=PREFIX,
                            httponly=True, samesite="strict", secure=self.auth.secure_cookie)
        return self._secure(response)

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=self.auth.secure_cookie)
        return self._secure(response)

    # -- pages --

    async def calls_page(self, request: Request) -> Response:
        q = request.query_params
        form = {k: q.get(k, "").strip() for k in ("since", "number", "assistant", "ended_reason", "limit")}
        try:
            limit = int(form["limit"]) if form["limit"] else ops.DEFAULT_LIMIT
        except ValueError:
            limit = -1
        try:
            flt = ops.CallFilter(
                since=ops.parse_since(form["since"], datetime.now(timezone.utc)) if form["since"] else None,
                number=form["number"] or None, assistant=form["assistant"] or None,
                ended_reason=form["ended_reason"] or None, limit=limit,
            )
        except ops.UsageError as exc:
            return self.page("calls.html", status_code=400, form=form, error=str(exc).replace("--limit -1", f"--limit {form['limit']!r}"),
                             rows=[], parity=False)
        pool = await self.db()
        async with pool.acquire() as conn:
            rows = await ops.fetch_calls(conn, flt)
            parity = await parity_available(conn)
        return self.page("calls.html", form=form, error=None, parity=parity,
                         rows=[{"sid": r["call_sid"], "cells": ops.call_table_cells(r), "has_recording": bool(r.get("recording_url"))} for r in rows])

    async def call_page(self, request: Request) -> Response:
        call_sid = request.path_params["call_sid"]
        pool = await self.db()
        async with pool.acquire() as conn:
            transcript = await ops.fetch_transcript(conn, call_sid)
        if transcript is None:
            return self.page("not_found.html", status_code=404, what=f"No call {call_sid} was recorded.")
        call = transcript.call
        return self.page(
            "call.html", call=call, timeline=ops.timeline(transcript),
            recording=ops.recording_sid(call.get("recording_url")) is not None,
            duration=(call["ended_at"] - call["started_at"]).total_seconds() if call.get("ended_at") and call.get("started_at") else None,
        )

    async def recording(self, request: Request) -> Response:
        call_sid, fmt = request.path_params["call_sid"], request.path_params["fmt"]
        if fmt not in recordings.FORMATS:
            return self._secure(PlainTextResponse(f"no .{fmt} form: .wav or .mp3", status_code=404))
        pool = await self.db()
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT recording_url FROM calls WHERE call_sid = $1", call_sid)
        if row is None:
            return self._secure(PlainTextResponse(f"no call {call_sid}", status_code=404))
        try:
            media = recordings.media_request(self.config, call_sid, row["recording_url"], fmt)
            upstream = await recordings.open_media(media, request.headers.get("range"))
        except recordings.RecordingError as exc:
            if exc.usage:  # no recording (404), or the credentials are not configured (503)
                status = 404 if ops.recording_sid(row["recording_url"]) is None else 503
            else:
                status = 404 if exc.http_status == 404 else 502
            log.warning("admin_recording_failed", call_sid=call_sid, error=str(exc))
            return self._secure(PlainTextResponse(str(exc), status_code=status))
        headers = dict(upstream.headers)
        disposition = "attachment" if request.query_params.get("download") else "inline"
        headers["Content-Disposition"] = f'{disposition}; filename="{quote(call_sid, safe="")}.{fmt}"'
        return self._secure(StreamingResponse(upstream.body, status_code=upstream.status, headers=headers,
                                              background=BackgroundTask(upstream.close)))

    async def parity_page(self, request: Request) -> Response:
        pool = await self.db()
        async with pool.acquire() as conn:
            if not await parity_available(conn):
                return self.page("not_found.html", status_code=404, what="No parity runs yet (run `shim parity run` or `shim parity replay`).")
            columns, rows = await parity_runs(conn)
            plots = await _parity_plots(conn) if _parity_plots is not None else []
        return self.page("parity.html", columns=columns, rows=rows, plots=plots)


def routes(shim) -> list[BaseRoute]:
    """The /admin routes for the app (none when SHIM_ADMIN_TOKEN is unset: /admin is then 404)."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        return []
    if len(token) < 16:
        log.warning("admin_token_short", hint="use a long random token, e.g. `openssl rand -hex 32`")
    return Admin(token, shim.config, shim.db).routes()
