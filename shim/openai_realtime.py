"""The OpenAI Realtime (GA) backend: the call's model commands as Realtime client events, and
Realtime server events as the typed events of `shim.model_events`. Sans-I/O; the shell sends
`out` over the WebSocket and feeds every text frame to `feed`.

Everything specific to this protocol lives here: the URL and auth header, answering
`session.created` with `session.update`, checking that the session really is μ-law both ways,
telling our `response.create` apart from the server's own responses (our id rides in the
response metadata), and which errors are benign. Docs: https://platform.openai.com/docs/guides/realtime
"""

from __future__ import annotations

from itertools import count
from typing import Any, Callable

import orjson

from . import realtime_events as rt
from .model_events import ModelEventSink, ModelProtocolError, SessionReady, SessionRejected

PCMU = "audio/pcmu"


def counter_ids(prefix: str = "shim_") -> Callable[[], str]:
    """Event ids for one call: a counter (deterministic; unique within the session)."""
    numbers = count(1)
    return lambda: f"{prefix}{next(numbers)}"


class OpenAIRealtime:
    name = "openai-realtime"

    __slots__ = ("out", "_new_id", "_session", "_created")

    def __init__(self, new_id: Callable[[], str] | None = None):
        self.out: list[str] = []
        self._new_id = new_id or counter_ids()
        self._session: dict[str, Any] | None = None
        self._created = False

    # --- connection (the shell opens the socket) ------------------------------------------

    @staticmethod
    def connect_target(base_url: str, model: str, api_key: str) -> tuple[str, dict[str, str]]:
        sep = "&" if "?" in base_url else "?"
        return f"{base_url}{sep}model={model}", {"Authorization": f"Bearer {api_key}"}

    # --- commands ---------------------------------------------------------------------------

    def configure(self, session: dict[str, Any]) -> None:
        """The translation's session; sent as `session.update` once the server's session exists."""
        self._session = session
        if self._created:
            self.out.append(rt.session_update(session, self._new_id()))

    def append_audio(self, audio_b64: str) -> None:
        self.out.append('{"type":"input_audio_buffer.append","audio":"' + audio_b64 + '"}')

    def create_response(self, request_id: str, instructions: str | None, purpose: str) -> None:
        # The request id is the event id (errors echo it) and rides in the response's metadata
        # (response.created echoes it), so both the refusal and the start find their request.
        self.out.append(rt.response_create(instructions, {"purpose": purpose, "shim_id": request_id}, request_id))

    def cancel_response(self, response_id: str) -> None:
        self.out.append(rt.response_cancel(response_id, self._new_id()))

    def truncate_item(self, item_id: str, heard_ms: int) -> None:
        self.out.append(rt.item_truncate(item_id, heard_ms, self._new_id()))

    def delete_item(self, item_id: str) -> None:
        self.out.append(rt.item_delete(item_id, self._new_id()))

    def add_message(self, role: str, text: str) -> None:
        self.out.append(rt.item_create_message(role, text, self._new_id()))

    def send_tool_result(self, call_id: str, output: str) -> None:
        self.out.append(rt.function_call_output(call_id, output, self._new_id()))

    # --- events -----------------------------------------------------------------------------

    def feed(self, text: str | bytes, sink: ModelEventSink) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            sink.on_model_event_rejected(ModelProtocolError(f"frame is not JSON ({exc}): {str(text)[:80]!r}"))
            return
        if type(msg) is dict and msg.get("type") == "response.output_audio.delta":
            # The hot path: no event object, plain lookups; the checks that name a bad field
            # only when something is off.
            response_id, item_id, delta = msg.get("response_id"), msg.get("item_id"), msg.get("delta")
            if type(delta) is str and type(item_id) is str and type(response_id) is str:
                sink.on_model_audio(response_id, item_id, delta)
                return
        try:
            event = rt.parse_object(msg)
        except ModelProtocolError as exc:
            sink.on_model_event_rejected(exc)
            return
        kind = type(event)
        if kind is rt.SessionCreated:
            self._created = True
            if self._session is not None:
                self.out.append(rt.session_update(self._session, self._new_id()))
        elif kind is rt.SessionUpdated:
            formats = [event.input_format, event.output_format]
            if formats == [PCMU, PCMU]:
                sink.on_model_event(SessionReady())
            else:
                # Relaying μ-law into a PCM session would play static to the caller.
                sink.on_model_event(SessionRejected("the session is not μ-law (audio/pcmu) both ways", formats))
        elif kind is rt.CancelNotActive:
            pass  # the response ended before our cancel arrived
        else:
            sink.on_model_event(event)
