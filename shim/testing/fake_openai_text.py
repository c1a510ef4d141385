"""A local stand-in for OpenAI's Chat Completions endpoint (``POST /v1/chat/completions``), as used by
the post-call analysis (tools/analysis.py).

    fake = FakeOpenAIText(reply=lambda body: "A short summary.")
    base_url = await fake.start()       # "http://127.0.0.1:<port>/v1" (OPENAI_BASE_URL form)
    ...
    await fake.stop()

Requests are checked the way the real API would reject them, using the openai SDK's own request
type (`CompletionCreateParamsNonStreaming`, a TypedDict, validated with pydantic): ``model`` and
``messages`` required, every message a valid role/content shape, known top-level keys only, no
``stream: true``, a ``json_schema`` response format with a valid name and an object schema. Bad
requests get 400 with OpenAI's error shape; a missing or wrong ``Authorization: Bearer <api_key>``
gets 401. Answers are `ChatCompletion` objects validated with the SDK's model before they are sent.

Scripting:

* ``reply(body) -> str``: the assistant content for a request (default: ``"OK"``, or ``"{}"`` when a
  JSON response format is asked for). May be async.
* ``fail_next(status, times=1, when=None, body=None)``: the next matching requests get an error.
* ``stall_next(seconds, times=1, when=None)``: the next matching requests are answered late.
  ``when(body) -> bool`` picks the requests (e.g. by their system message); None matches all.
* ``requests``: every request seen (parsed body, whether the key matched, status, times).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import re
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import pydantic
import typing_extensions
from openai.types.chat import ChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from shim.aio import wait_event
from shim.testing._serve import LocalServer

__all__ = ["FakeOpenAIText", "RecordedChat", "validate_chat_request"]

_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROLES = frozenset({"developer", "system", "user", "assistant", "tool", "function"})


class ChatRequestInvalid(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@functools.cache
def _adapter() -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(CompletionCreateParamsNonStreaming)


@functools.cache
def _known_keys() -> frozenset[str]:
    return frozenset(typing_extensions.get_type_hints(CompletionCreateParamsNonStreaming))


def _materialize(value: Any) -> Any:
    """pydantic validates `Iterable[...]` fields lazily: walk them so every item is checked."""
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_materialize(v) for v in value]
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__iter__"):
        return [_materialize(v) for v in value]
    return value


def validate_chat_request(body: Any) -> None:
    """Raise ChatRequestInvalid unless `body` is a request the real endpoint would accept."""
    if not isinstance(body, dict):
        raise ChatRequestInvalid("The request body must be a JSON object.")
    unknown = sorted(set(body) - _known_keys())
    if unknown:
        raise ChatRequestInvalid(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for key in ("model", "messages"):
        if key not in body:
            raise ChatRequestInvalid(f"Missing required parameter: '{key}'.", key)
    if body.get("stream"):
        raise ChatRequestInvalid("This stand-in answers non-streaming requests only.", "stream")
    if not isinstance(body["messages"], list) or not body["messages"]:
        raise ChatRequestInvalid("Invalid 'messages': expected a non-empty array.", "messages")
    if not isinstance(body["model"], str) or not body["model"]:
        raise ChatRequestInvalid("Invalid 'model': expected a non-empty string.", "model")
    for i, message in enumerate(body["messages"]):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise ChatRequestInvalid(f"Invalid value: {role!r}. Supported values are: "
                                     f"{', '.join(map(repr, sorted(_ROLES)))}.", f"messages[{i}].role")
    key = ""
    try:
        validated = _adapter().validate_python(body)
        for key, value in validated.items():  # lazily validated iterables raise here
            _materialize(value)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        # a union reports every member; the members whose `role`/`type` literal didn't match are noise
        relevant = [e for e in errors if not (e["type"] == "literal_error" and e["loc"][-1:] in (("role",), ("type",)))]
        err = (relevant or errors)[0]
        loc = ".".join(str(p) for p in ((key,) if key and key not in err["loc"][:1] else ()) + tuple(err["loc"]))
        raise ChatRequestInvalid(f"Invalid value at '{loc}': {err['msg']}", loc) from None
    for i, message in enumerate(body["messages"]):
        if message.get("role") in ("system", "developer", "user") and message.get("content") in ("", []):
            raise ChatRequestInvalid(f"Invalid 'messages[{i}].content': empty.", f"messages[{i}].content")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        js = fmt.get("json_schema") or {}
        if not _SCHEMA_NAME.match(str(js.get("name", ""))):
            raise ChatRequestInvalid("Invalid 'response_format.json_schema.name'.", "response_format.json_schema.name")
        schema = js.get("schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ChatRequestInvalid("Invalid schema for response_format: schema must be a JSON Schema of "
                                     "'type: \"object\"'.", "response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        text = orjson.dumps(body["messages"]).decode().lower()
        if "json" not in text:
            raise ChatRequestInvalid("'messages' must contain the word 'json' in some form, to use "
                                     "'response_format' of type 'json_object'.", "messages")


@dataclass
class RecordedChat:
    body: Any
    authorized: bool
    status: int = 0
    started: float = 0.0
    ended: float = 0.0

    @property
    def system(self) -> str:
        """The first system message's content ('' when none): handy to tell requests apart."""
        for m in (self.body or {}).get("messages", []) if isinstance(self.body, dict) else []:
            if isinstance(m, dict) and m.get("role") == "system" and isinstance(m.get("content"), str):
                return m["content"]
        return ""


@dataclass
class _Fault:
    when: Callable[[dict], bool] | None
    status: int | None = None
    body: bytes | None = None
    delay: float = 0.0
    remaining: int = 1


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _default_reply(body: dict) -> str:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        return "{}"
    return "OK"


class FakeOpenAIText:
    def __init__(self, *, api_key: str = "test-openai-key",
                 reply: Callable[[dict], str | typing.Awaitable[str]] | None = None) -> None:
        self.api_key = api_key
        self.reply = reply or _default_reply
        self.requests: list[RecordedChat] = []
        self.base_url = ""
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._stopping = asyncio.Event()
        self._http: LocalServer | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])

    # -- scripting --

    def fail_next(self, status: int = 500, times: int = 1, *, when: Callable[[dict], bool] | None = None,
                  body: Any = None) -> None:
        raw = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
        self._faults.append(_Fault(when, status=status, body=raw, remaining=times))

    def stall_next(self, seconds: float, times: int = 1, *, when: Callable[[dict], bool] | None = None) -> None:
        self._faults.append(_Fault(when, delay=seconds, remaining=times))

    # -- lifecycle --

    async def start(self) -> str:
        """Serve on 127.0.0.1 (ephemeral port); returns the base URL, "http://127.0.0.1:PORT/v1"."""
        self._stopping.clear()
        self._http = LocalServer(self.app, "fake OpenAI server")
        self.base_url = await self._http.start() + "/v1"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()  # ends stalls at once
        if self._http is not None:
            await self._http.stop()
            self._http = None

    async def __aenter__(self) -> FakeOpenAIText:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handler --

    def _take_fault(self, body: Any) -> _Fault | None:
        for fault in self._faults:
            try:
                matches = fault.when is None or (isinstance(body, dict) and fault.when(body))
            except Exception:
                matches = False
            if matches:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _completions(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        rec = RecordedChat(None, auth == f"Bearer {self.api_key}", started=time.monotonic())
        self.requests.append(rec)
        try:
            response = await self._answer(request, rec)
            rec.status = response.status_code
            return response
        finally:
            rec.ended = time.monotonic()

    async def _answer(self, request: Request, rec: RecordedChat) -> Response:
        raw = await request.body()
        try:
            rec.body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            rec.body = None
        fault = self._take_fault(rec.body)
        if fault is not None:
            if fault.delay:
                await wait_event(self._stopping, fault.delay)
            if fault.status is not None:
                if fault.body is not None:
                    return Response(fault.body, status_code=fault.status, media_type="application/json")
                return _error(fault.status, f"injected failure ({fault.status})",
                              "server_error" if fault.status >= 500 else "invalid_request_error")
        if not rec.authorized:
            return _error(401, "Incorrect API key provided. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                          code="invalid_api_key")
        if "application/json" not in request.headers.get("content-type", ""):
            return _error(400, "Invalid Content-Type header; expected application/json.", "invalid_request_error")
        if rec.body is None:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        try:
            validate_chat_request(rec.body)
        except ChatRequestInvalid as exc:
            return _error(400, str(exc), "invalid_request_error", exc.param)
        content = self.reply(rec.body)
        if inspect.isawaitable(content):
            content = await content
        if not isinstance(content, str):
            raise TypeError(f"reply() must return a str, got {type(content).__name__}")
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in rec.body["messages"])
        completion_tokens = len(content.split())
        answer = {
            "id": f"chatcmpl-fake{next(self._ids):06d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": rec.body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        ChatCompletion.model_validate(answer)  # what we send is what the SDK would parse
        return Response(orjson.dumps(answer), media_type="application/json")
