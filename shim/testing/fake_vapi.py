"""A local stand-in for the parts of the Vapi API that `shim assistants pull` uses.

    fake = FakeVapi(assistants={id: body}, tools={id: body}, api_key="test-key")
    base_url = await fake.start()          # real HTTP server (uvicorn) on 127.0.0.1:<ephemeral>
    ...                                    # shim.vapi_api.pull_assistants(..., base_url=base_url)
    await fake.stop()

Endpoints (https://docs.vapi.ai/api-reference/assistants/get): ``GET /assistant/{id}``, ``GET /assistant`` (array),
``GET /tool/{id}``, ``GET /tool`` (array). Every request needs ``Authorization: Bearer <api_key>``
(401 otherwise); unknown ids are 404. Error bodies use the NestJS shape Vapi's API answers with
(``{"message", "error", "statusCode"}``; the exact wording is not Vapi's).

Bodies are validated against vapi-server-sdk 3.0.0 when they are added (`Assistant` for
assistants, the `GetToolsResponse` union — what ``GET /tool/{id}`` returns — for tools, with the
concrete member picked by ``type`` for readable errors). An invalid body raises
`FakeVapiValidationError` at once, so a test can't serve something Vapi would never return. The
SDK rejects some valid Vapi JSON (its models are stricter than the API on a few fields); `sdk_view()` rewrites those
constructs in a *copy* before validating, and the body is served unchanged.

Served bytes are the compact JSON of the body as given (key order kept), so a client's output can be
compared with ``json.dumps(body)``.

Test hooks:

* ``requests``: every request seen (method, path, whether the key matched, status, start/end times).
* ``max_in_flight``: the most requests being handled at once; ``latency`` (seconds) slows every
  response down so that concurrency becomes observable.
* ``fail_next(path, status, times=1, retry_after=None, body=None)``: the next ``times`` requests to
  ``path`` get ``status`` (with ``Retry-After`` when given, and ``body`` — bytes, or JSON-encoded —
  instead of a default error body). Faults are served before the key check, like a load balancer's
  answers; fault bodies are not validated (that is their point: ``fail_next(p, 200, body=…)``
  serves a malformed or mismatched object).
* ``stall_next(path, seconds, times=1)``: the next ``times`` requests to ``path`` wait ``seconds``
  before being answered normally (to provoke client timeouts).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import typing
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import pydantic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from vapi.core.pydantic_utilities import parse_obj_as
from vapi.core.serialization import convert_and_respect_annotation_metadata
from vapi.tools.types.get_tools_response import GetToolsResponse
from vapi.types import Assistant, Call
from shim.testing.vapi_sdk_quirks import sdk_view, summarize
from shim.testing._serve import LocalServer, ServedStandIn

_TOOL_MEMBERS: dict[str, type] = {}
for _member in typing.get_args(typing.get_args(GetToolsResponse)[0]):
    _literal = typing.get_args(_member.model_fields["type"].annotation)
    if _literal:
        _TOOL_MEMBERS[_literal[0]] = _member


class FakeVapiValidationError(ValueError):
    """A body given to FakeVapi is not something Vapi would return."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    authorized: bool
    status: int = 0
    started: float = 0.0
    ended: float = 0.0


@dataclass
class _Fault:
    status: int | None
    retry_after: str | None = None
    body: bytes | None = None
    delay: float = 0.0


# --- SDK validation ------------------------------------------------------------------------------



@functools.cache
def _union_adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)  # ~0.7 s to build for the tool union: once per process


def _validate_union(tp: Any, data: Any) -> None:
    """`parse_obj_as(tp, data)` for a non-model type, with the TypeAdapter cached."""
    _union_adapter(tp).validate_python(
        convert_and_respect_annotation_metadata(object_=data, annotation=tp, direction="read"))


_VALID: set[tuple[str, bytes]] = set()  # bodies already validated (the same fixtures recur across tests)


def validate_assistant(body: Any) -> None:
    """Raise FakeVapiValidationError unless `body` is a valid `GET /assistant/{id}` answer."""
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise FakeVapiValidationError("an assistant must be a JSON object with a string id")
    key = ("assistant", json.dumps(body).encode())
    if key in _VALID:
        return
    try:
        parse_obj_as(Assistant, sdk_view(body))
    except pydantic.ValidationError as exc:
        raise FakeVapiValidationError(f"assistant {body['id']}: not a valid Vapi Assistant: {summarize(exc)}") from None
    _VALID.add(key)


def validate_tool(body: Any) -> None:
    """Raise FakeVapiValidationError unless `body` is a valid `GET /tool/{id}` answer."""
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise FakeVapiValidationError("a tool must be a JSON object with a string id")
    key = ("tool", json.dumps(body).encode())
    if key in _VALID:
        return
    view = sdk_view(body)
    member = _TOOL_MEMBERS.get(body.get("type"))
    if member is None:
        raise FakeVapiValidationError(
            f"tool {body['id']}: type {body.get('type')!r} is not one of {sorted(_TOOL_MEMBERS)}")
    try:
        parse_obj_as(member, view)  # readable errors for the intended member
        _validate_union(GetToolsResponse, view)  # and the union GET /tool/{id} is declared as
    except pydantic.ValidationError as exc:
        raise FakeVapiValidationError(f"tool {body['id']}: not a valid Vapi {member.__name__}: {summarize(exc)}") from None
    _VALID.add(key)


def validate_call(body: Any) -> None:
    """Raise FakeVapiValidationError unless `body` is a valid `GET /call/{id}` answer."""
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise FakeVapiValidationError("a call must be a JSON object with a string id")
    try:
        parse_obj_as(Call, sdk_view(body))
    except pydantic.ValidationError as exc:
        raise FakeVapiValidationError(f"call {body['id']}: not a valid Vapi Call: {summarize(exc)}") from None


# --- the server ----------------------------------------------------------------------------------


class FakeVapi(ServedStandIn):
    def __init__(self, assistants: dict[str, dict] | None = None, tools: dict[str, dict] | None = None,
                 api_key: str = "test-vapi-key"):
        self.api_key = api_key
        self.assistants: dict[str, bytes] = {}
        self.tools: dict[str, bytes] = {}
        for aid, body in (assistants or {}).items():
            self.add_assistant(body, aid)
        for tid, body in (tools or {}).items():
            self.add_tool(body, tid)
        self.requests: list[RecordedRequest] = []
        self.latency = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self._faults: dict[str, deque[_Fault]] = defaultdict(deque)
        self._http: LocalServer | None = None
        self.app = Starlette(routes=[
            Route("/assistant", self._list_assistants, methods=["GET"]),
            Route("/assistant/{id}", self._get_assistant, methods=["GET"]),
            Route("/tool", self._list_tools, methods=["GET"]),
            Route("/tool/{id}", self._get_tool, methods=["GET"]),
            Route("/call", self._list_calls, methods=["GET"]),
            Route("/call", self._create_call, methods=["POST"]),
            Route("/call/{id}", self._get_call, methods=["GET"]),
            Route("/recording/{id}.wav", self._get_recording, methods=["GET"]),
            WebSocketRoute("/{id}/transport", self._transport),
        ])
        self.calls: dict[str, dict] = {}
        self.recordings: dict[str, bytes] = {}
        self.agent = None  # a shim.testing.fake_vapi_agent.ScriptedAgent answers websocket calls

    # -- content --

    def add_assistant(self, body: dict, assistant_id: str | None = None) -> None:
        validate_assistant(body)
        if assistant_id is not None and assistant_id != body["id"]:
            raise FakeVapiValidationError(f"assistant key {assistant_id!r} != its id {body['id']!r}")
        self.assistants[body["id"]] = json.dumps(body, ensure_ascii=False).encode()

    def add_tool(self, body: dict, tool_id: str | None = None) -> None:
        validate_tool(body)
        if tool_id is not None and tool_id != body["id"]:
            raise FakeVapiValidationError(f"tool key {tool_id!r} != its id {body['id']!r}")
        self.tools[body["id"]] = json.dumps(body, ensure_ascii=False).encode()

    def add_call(self, body: dict) -> None:
        """Serve a call object (GET /call, GET /call/{id}); validated against the SDK's Call."""
        validate_call(body)
        self.calls[body["id"]] = body

    # -- fault injection --

    def fail_next(self, path: str, status: int, times: int = 1, retry_after: int | float | str | None = None,
                  *, body: bytes | Any = None) -> None:
        raw = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        for _ in range(times):
            self._faults[path].append(_Fault(status, None if retry_after is None else str(retry_after), raw))

    def stall_next(self, path: str, seconds: float, times: int = 1) -> None:
        for _ in range(times):
            self._faults[path].append(_Fault(None, delay=seconds))

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    # -- lifecycle --

    async def start(self) -> str:
        """Serve on 127.0.0.1 (ephemeral port); returns the base URL, e.g. "http://127.0.0.1:PORT"."""
        self._http = LocalServer(self.app, "fake Vapi server")
        self.base_url = await self._http.start()
        return self.base_url

    # -- handlers --

    async def _handle(self, request: Request, answer: typing.Callable[[], Response]) -> Response:
        auth = request.headers.get("authorization", "")
        rec = RecordedRequest(request.method, request.url.path, auth == f"Bearer {self.api_key}",
                              started=time.monotonic())
        self.requests.append(rec)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            response = None
            queue = self._faults.get(rec.path)
            if queue:
                fault = queue.popleft()
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    response = self._fault_response(fault)
            if response is None:
                response = answer() if rec.authorized else _error(
                    401, "Unauthorized", "Invalid Key. Hot tip, you may be using the private key instead of the public key, or vice versa.")
            rec.status = response.status_code
            return response
        finally:
            self.in_flight -= 1
            rec.ended = time.monotonic()

    @staticmethod
    def _fault_response(fault: _Fault) -> Response:
        status = fault.status or 500
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        if fault.body is not None:
            return Response(fault.body, status_code=status, media_type="application/json", headers=headers)
        return _error(status, _REASONS.get(status, "Error"), f"injected failure ({status})", headers)

    async def _get_assistant(self, request: Request) -> Response:
        aid = request.path_params["id"]
        return await self._handle(request, lambda: _json_or_404(self.assistants.get(aid), "Assistant"))

    async def _get_tool(self, request: Request) -> Response:
        tid = request.path_params["id"]
        return await self._handle(request, lambda: _json_or_404(self.tools.get(tid), "Tool"))

    async def _list_assistants(self, request: Request) -> Response:
        return await self._handle(request, lambda: _json_array(self.assistants.values()))

    async def _list_tools(self, request: Request) -> Response:
        return await self._handle(request, lambda: _json_array(self.tools.values()))


    # -- calls --

    async def _list_calls(self, request: Request) -> Response:
        q = request.query_params

        def answer() -> Response:
            try:
                limit = int(q.get("limit", "100"))
            except ValueError:
                return _error(400, "Bad Request", "limit must be a number")
            calls = sorted(self.calls.values(), key=lambda c: c["createdAt"], reverse=True)
            bounds = {"createdAtGe": lambda a, b: a >= b, "createdAtGt": lambda a, b: a > b,
                      "createdAtLe": lambda a, b: a <= b, "createdAtLt": lambda a, b: a < b}
            for name, keep in bounds.items():
                if name in q:
                    edge = _iso(q[name])
                    calls = [c for c in calls if keep(_iso(c["createdAt"]), edge)]
            if "assistantId" in q:
                calls = [c for c in calls if c.get("assistantId") == q["assistantId"]]
            return Response(json.dumps(calls[:limit]).encode(), media_type="application/json")

        return await self._handle(request, answer)

    async def _get_call(self, request: Request) -> Response:
        cid = request.path_params["id"]
        return await self._handle(request, lambda: _json_or_404(
            json.dumps(self.calls[cid]).encode() if cid in self.calls else None, "Call"))

    async def _get_recording(self, request: Request) -> Response:
        data = self.recordings.get(request.path_params["id"])
        if data is None:
            return _error(404, "Not Found", "no such recording")
        return Response(data, media_type="audio/wav")

    async def _create_call(self, request: Request) -> Response:
        body = await request.json()

        def answer() -> Response:
            transport = (body or {}).get("transport") or {}
            if transport.get("provider") != "vapi.websocket" or self.agent is None:
                return _error(400, "Bad Request", "this stand-in only starts vapi.websocket calls")
            if body.get("phoneNumberId") or body.get("phoneNumber"):
                return _error(400, "Bad Request", "phoneNumber is not allowed with the vapi.websocket transport")
            problem = _create_call_problem(body)
            if problem:
                return _error(400, "Bad Request", problem)
            call = self.agent.new_call(self, body)
            validate_call(call)
            self.calls[call["id"]] = call
            return Response(json.dumps(call).encode(), status_code=201, media_type="application/json")

        return await self._handle(request, answer)

    async def _transport(self, ws: WebSocket) -> None:
        cid = ws.path_params["id"]
        if ws.headers.get("authorization") != f"Bearer {self.api_key}" or cid not in self.calls or self.agent is None:
            await ws.close(code=4001)
            return
        await ws.accept()
        try:
            await self.agent.serve(self, cid, ws)
        except WebSocketDisconnect:
            pass


_CREATE_CALL_KEYS = frozenset({
    "assistantVersion", "squadVersion", "transport", "customers", "name", "schedulePlan", "assistantId", "assistant",
    "assistantOverrides", "squadId", "squad", "squadOverrides", "workflowId", "workflow", "workflowOverrides",
    "phoneNumberId", "phoneNumber", "customerId", "customer"})  # CallsClient.create's body (vapi-server-sdk 3.0.0)


def _create_call_problem(body: Any) -> str | None:
    """Why Vapi would refuse this POST /call body (checked with the SDK's transport model), or None."""
    from vapi.calls.types.create_call_dto_transport import CreateCallDtoTransport_VapiWebsocket
    from vapi.types import AudioFormat

    if not isinstance(body, dict):
        return "body must be a JSON object"
    unknown = set(body) - _CREATE_CALL_KEYS
    if unknown:
        return f"property {sorted(unknown)[0]} should not exist"
    if not (body.get("assistantId") or body.get("assistant") or body.get("squadId") or body.get("squad")):
        return "assistantId, assistant, squadId or squad is required"
    transport = body.get("transport")
    try:
        parse_obj_as(CreateCallDtoTransport_VapiWebsocket, transport)
        if not isinstance(transport, dict) or set(transport) - {"provider", "conversationType", "audioFormat"}:
            raise ValueError(f"transport has unknown keys: {sorted(set(transport or {}) - {'provider', 'conversationType', 'audioFormat'})}")
        audio = transport.get("audioFormat")
        if audio is not None:
            parse_obj_as(AudioFormat, audio)
            if audio.get("format") not in ("pcm_s16le", "mulaw") or set(audio) - {"format", "container", "sampleRate"}:
                raise ValueError(f"audioFormat {audio!r} is not a valid format")
            if not isinstance(audio.get("sampleRate"), (int, float)):
                raise ValueError("audioFormat.sampleRate is required")
    except (pydantic.ValidationError, ValueError) as exc:
        return f"transport: {str(exc)[:300]}"
    return None


def _iso(value: str):
    import datetime as _dt

    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def _error(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"message": message, "error": error, "statusCode": status}).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _json_or_404(body: bytes | None, kind: str) -> Response:
    if body is None:
        return _error(404, "Not Found", f"Couldn't Get {kind}. {kind} Not Found.")
    return Response(body, media_type="application/json")


def _json_array(bodies: typing.Iterable[bytes]) -> Response:
    return Response(b"[" + b",".join(bodies) + b"]", media_type="application/json")
