"""A local stand-in for a customer's existing Vapi endpoints (tool URLs, the server URL).

    async with FakeCustomer() as customer:            # real HTTP (uvicorn) on 127.0.0.1:<ephemeral>
        customer.on("/vapi/tools", reply_results(lambda name, args: {"available": True}))
        customer.on("/slow", delay(3.0, reply_results(lambda name, args: "ok")))
        url = customer.base_url + "/vapi/tools"
        ...
        [req] = await customer.wait_for("tool-calls", 1, timeout=5)
        assert customer.validation_errors == []

Every POST body is recorded in ``received`` (path, lowercased headers, parsed body, message type)
and **validated** against the vapi-server-sdk 3.0.0 model for its ``message.type`` (the class is
picked from the type here; the SDK's ``ServerMessage`` union is not a safe dispatcher: its models refuse some valid messages)
after normalising the SDK's known false negatives (object ``arguments`` in the live tool-call
lists, and the assistant-export quirks that ``fake_vapi.sdk_view`` also rewrites — repeated here
because importing ``fake_vapi`` pulls in SDK models worth ~10 s of import time). On top of the SDK, a few
checks the SDK cannot make because its unions and ``extra="allow"`` accept nearly anything:

* ``artifact.messages[]`` items are validated against the concrete class for their ``role``;
  ``tool_calls`` arguments there (and in ``messagesOpenAIFormatted``) must be JSON strings;
* ``tool-calls``: the live lists carry ``arguments`` as an object (what Vapi sends), and the legacy
  ``toolCalls`` duplicate equals ``toolCallList``;
* ``end-of-call-report``: the legacy top-level fields handlers read are present;
* no secret-bearing key (``serverUrlSecret``, ``credentials``, ``twilioAuthToken``,
  ``twilioApiSecret``, ``server.secret``) anywhere in the body.

Failures are appended to ``validation_errors`` (tests assert it is empty); nothing is rejected, the
handler still answers.

Handlers: ``on(path, handler)``; ``handler(message: dict)`` (the parsed ``message`` object, ``{}``
when the body was not one) returns ``(status, body)`` — body a dict/list (JSON-encoded), bytes/str
(sent as is) or None (empty) — or an awaitable of that. Unknown paths answer ``200 {}``.
Factories: `reply_results`, `reply_error`, `delay`, `status`, `invalid_json`, `respond`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

import pydantic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from shim.aio import wait_event
from shim.testing.vapi_sdk_quirks import sdk_view, summarize
from shim.testing._serve import LocalServer, ServedStandIn

__all__ = [
    "FakeCustomer", "Received", "Handler", "reply_results", "reply_error", "delay", "status", "invalid_json",
    "respond", "validate_server_message", "MESSAGE_MODELS",
]

Reply = tuple[int, Any]
Handler = Callable[[dict], Union[Reply, Awaitable[Reply]]]


@dataclass
class Received:
    path: str
    headers: dict[str, str]          # lowercased names
    body: Any                        # the parsed JSON body (None when it was not JSON)
    message_type: str | None         # body["message"]["type"]
    raw: bytes = b""
    at: float = 0.0                  # time.monotonic() on arrival
    status: int | None = None        # what the handler answered (None while it is still running)
    errors: list[str] = field(default_factory=list)  # this body's validation errors

    @property
    def message(self) -> dict:
        body = self.body if isinstance(self.body, dict) else {}
        msg = body.get("message")
        return msg if isinstance(msg, dict) else {}


# --- SDK validation ------------------------------------------------------------------------------

# message.type -> SDK class name (vapi.types). Imported lazily: the SDK takes seconds to import.
MESSAGE_MODELS: dict[str, str] = {
    "tool-calls": "ServerMessageToolCalls",
    "status-update": "ServerMessageStatusUpdate",
    "end-of-call-report": "ServerMessageEndOfCallReport",
    "transcript": "ServerMessageTranscript",
    'transcript[transcriptType="final"]': "ServerMessageTranscript",
    "hang": "ServerMessageHang",
    "transfer-destination-request": "ServerMessageTransferDestinationRequest",
    "assistant-request": "ServerMessageAssistantRequest",
    "speech-update": "ServerMessageSpeechUpdate",
    "conversation-update": "ServerMessageConversationUpdate",
    "user-interrupted": "ServerMessageUserInterrupted",
    "model-output": "ServerMessageModelOutput",
    "transfer-update": "ServerMessageTransferUpdate",
}

_ROLE_MODELS = {"system": "SystemMessage", "bot": "BotMessage", "user": "UserMessage",
                "tool_calls": "ToolCallMessage", "tool_call_result": "ToolCallResultMessage"}

_EOCR_LEGACY = ("transcript", "messages", "durationMs", "durationSeconds", "durationMinutes")
_SECRET_KEYS = frozenset({"serverUrlSecret", "credentials", "twilioAuthToken", "twilioApiSecret"})


@functools.cache
def _model(name: str) -> type[pydantic.BaseModel]:
    import vapi.types  # lazy: seconds to import

    return getattr(vapi.types, name)


def _warm_models() -> None:
    """Import the SDK's message models before the first request (seconds, once per process)."""
    for name in list(MESSAGE_MODELS.values()) + list(_ROLE_MODELS.values()):
        _model(name)


def _stringify_arguments(calls: Any) -> None:
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and "arguments" in fn and not isinstance(fn["arguments"], str):
            fn["arguments"] = json.dumps(fn["arguments"])


def _find_secrets(node: Any, path: str, out: list[str], *, under_server: bool = False) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if key in _SECRET_KEYS and value not in (None, "", [], {}):
                out.append(f"{here}: a secret must never be sent")
            elif under_server and key == "secret" and value not in (None, ""):
                out.append(f"{here}: a secret must never be sent")
            _find_secrets(value, here, out, under_server=key == "server")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _find_secrets(item, f"{path}[{i}]", out)


def _check_artifact(art: Any, where: str, errors: list[str]) -> None:
    if art is None:
        return
    if not isinstance(art, dict):
        errors.append(f"{where}: not an object")
        return
    for i, m in enumerate(art.get("messages") or ()):
        role = m.get("role") if isinstance(m, dict) else None
        name = _ROLE_MODELS.get(role)
        if name is None:
            errors.append(f"{where}.messages[{i}]: unknown role {role!r}")
            continue
        try:
            _model(name).model_validate(m)
        except pydantic.ValidationError as exc:
            errors.append(f"{where}.messages[{i}] ({name}): {summarize(exc)}")
    for key in ("messages", "messagesOpenAIFormatted"):
        for i, m in enumerate(art.get(key) or ()):
            calls = m.get("toolCalls" if key == "messages" else "tool_calls") if isinstance(m, dict) else None
            for j, call in enumerate(calls or ()):
                args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                if not isinstance(args, str):
                    errors.append(f"{where}.{key}[{i}] tool call {j}: arguments must be a JSON string in the artifact")


def validate_server_message(body: Any) -> list[str]:
    """The problems with a server-message body (empty when it is something Vapi would send)."""
    errors: list[str] = []
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        return ['the body must be a JSON object {"message": {...}}']
    msg = body["message"]
    mtype = msg.get("type")
    name = MESSAGE_MODELS.get(mtype) if isinstance(mtype, str) else None
    if name is None:
        return [f"message.type {mtype!r}: not a server message this fake knows"]

    _find_secrets(body, "", errors)
    if mtype == "tool-calls":
        for key in ("toolCallList", "toolCalls"):
            for i, call in enumerate(msg.get(key) or ()):
                args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                if not isinstance(args, dict):
                    errors.append(f"message.{key}[{i}].function.arguments: Vapi sends an object here")
        if "toolCalls" not in msg:
            errors.append("message.toolCalls: missing (Vapi sends it as a duplicate of toolCallList)")
        elif msg.get("toolCalls") != msg.get("toolCallList"):
            errors.append("message.toolCalls: differs from toolCallList")
    if mtype == "end-of-call-report":
        for key in _EOCR_LEGACY:
            if key not in msg:
                errors.append(f"message.{key}: legacy end-of-call-report field missing")

    view = sdk_view(msg)
    _stringify_arguments(view.get("toolCallList"))
    _stringify_arguments(view.get("toolCalls"))
    for item in view.get("toolWithToolCallList") or ():
        if isinstance(item, dict):
            _stringify_arguments([item.get("toolCall")])
    try:
        _model(name).model_validate(view)
    except pydantic.ValidationError as exc:
        errors.append(f"{name}: {summarize(exc)}")
    _check_artifact(msg.get("artifact"), "message.artifact", errors)
    if isinstance(msg.get("call"), dict):
        _check_artifact(msg["call"].get("artifact"), "message.call.artifact", errors)
    return errors


# --- handler factories ---------------------------------------------------------------------------


def respond(code: int, body: Any = None) -> Handler:
    """Always answer `code` with `body`."""
    return lambda message: (code, body)


def reply_results(fn: Callable[[str, dict], Any], *, code: int = 200) -> Handler:
    """Answer a tool-calls message Vapi's way: one `{name, toolCallId, result}` per call, `result`
    = ``fn(name, arguments)`` (returned as given: a string, or an object the shim must encode); if
    `fn` raises, that call gets ``{"error": str(exc)}`` instead."""

    def handler(message: dict) -> Reply:
        results = []
        for call in message.get("toolCallList") or ():
            fn_part = call.get("function") or {}
            args = fn_part.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    args = {}
            item: dict[str, Any] = {"name": fn_part.get("name", ""), "toolCallId": call.get("id", "")}
            try:
                item["result"] = fn(item["name"], args if isinstance(args, dict) else {})
            except Exception as exc:  # noqa: BLE001 - the tool's failure is the answer
                item["error"] = str(exc)
            results.append(item)
        return code, {"results": results}

    return handler


def reply_error(error: str, *, code: int = 200) -> Handler:
    """A top-level ``{"error": …}`` (the whole request failed)."""
    return respond(code, {"error": error})


def delay(seconds: float, then: Handler) -> Handler:
    """Answer like `then`, `seconds` later."""

    async def handler(message: dict) -> Reply:
        await asyncio.sleep(seconds)
        reply = then(message)
        return await reply if inspect.isawaitable(reply) else reply

    return handler


def status(code: int) -> Handler:
    """An error status with a NestJS-style body."""
    return respond(code, {"message": f"status {code}", "error": "Error", "statusCode": code})


def invalid_json() -> Handler:
    """200 with a body that is not JSON."""
    return respond(200, b'{"results": [ not json')


# --- the server ----------------------------------------------------------------------------------


class FakeCustomer(ServedStandIn):
    def __init__(self, handlers: dict[str, Handler] | None = None):
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.received: list[Received] = []
        self.validation_errors: list[str] = []
        self.handler_errors: list[str] = []
        self.base_url = ""
        self._arrived = asyncio.Event()
        self._http: LocalServer | None = None
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST", "GET", "PUT"])])

    def on(self, path: str, handler: Handler) -> None:
        """Answer POSTs to `path` with `handler` (replacing any earlier one)."""
        self.handlers[path if path.startswith("/") else "/" + path] = handler

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # -- queries --

    def matching(self, key: str) -> list[Received]:
        """Requests whose path or message type is `key`."""
        return [r for r in self.received if r.path == key or r.message_type == key]

    async def wait_for(self, key: str, count: int = 1, timeout: float = 5.0) -> list[Received]:
        """Wait until `count` requests to path `key` (or of message type `key`) have arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.matching(key)
            if len(found) >= count:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError(
                    f"{len(found)} of {count} {key!r} requests after {timeout} s; received: "
                    f"{[(r.path, r.message_type) for r in self.received]}")
            self._arrived.clear()
            await wait_event(self._arrived, remaining)

    # -- lifecycle --

    async def start(self) -> str:
        """Serve on 127.0.0.1 (ephemeral port); returns the base URL."""
        self._arrived = asyncio.Event()
        self._http = LocalServer(self.app, "fake customer server")
        self.base_url = await self._http.start()
        await asyncio.to_thread(_warm_models)
        return self.base_url

    # -- the handler --

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        path = request.url.path
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        message = body.get("message") if isinstance(body, dict) else None
        mtype = message.get("type") if isinstance(message, dict) else None
        rec = Received(path, {k.lower(): v for k, v in request.headers.items()}, body,
                       mtype if isinstance(mtype, str) else None, raw, time.monotonic())
        if request.method == "POST":
            # Validated in a worker thread: building the SDK's models takes seconds, and this
            # server shares its event loop with the shim under test, whose audio must not wait.
            rec.errors = (await asyncio.to_thread(validate_server_message, body) if body is not None
                          else [f"{path}: the body is not JSON"])
            self.validation_errors.extend(f"{path} ({rec.message_type}): {e}" for e in rec.errors)
        self.received.append(rec)
        self._arrived.set()

        handler = self.handlers.get(path)
        try:
            if handler is None:
                code, payload = 200, {}
            else:
                reply = handler(message if isinstance(message, dict) else {})
                code, payload = await reply if inspect.isawaitable(reply) else reply
        except Exception as exc:  # noqa: BLE001 - a broken test handler is reported, not raised
            self.handler_errors.append(f"{path}: {type(exc).__name__}: {exc}")
            code, payload = 500, {"message": "handler error"}
        rec.status = code
        if payload is None:
            content = b""
        elif isinstance(payload, bytes):
            content = payload
        elif isinstance(payload, str):
            content = payload.encode()
        else:
            content = json.dumps(payload, ensure_ascii=False).encode()
        return Response(content, status_code=code, media_type="application/json")
