"""OpenAI Realtime (GA) wire protocol, sans-I/O: client events built as JSON text, server events
parsed into the typed events of `shim.model_events` (precise errors for malformed ones).

Protocol: https://platform.openai.com/docs/api-reference/realtime-client-events and
https://platform.openai.com/docs/api-reference/realtime-server-events. The stand-in server
validates every client event against the `openai` SDK's GA client-event union, so a shape
drifting from the API fails the tests. Event ids are given by the caller (the adapter's
injected id source): errors echo them, which ties a failure to the request that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .model_events import (
    FunctionCall,
    ModelError,
    ModelEvent,
    ModelProtocolError,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptDone,
    Unhandled,
    UserTranscript,
    AudioDelta,
)

# --- client events ------------------------------------------------------------------------


def dumps(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def session_update(session: dict[str, Any], event_id: str) -> str:
    return dumps({"type": "session.update", "event_id": event_id, "session": session})


def append_audio(payload_b64: str) -> str:
    # Hot path (50 per second per call): base64 needs no JSON escaping, skip the serializer.
    return '{"type":"input_audio_buffer.append","audio":"' + payload_b64 + '"}'


def response_create(instructions: str | None, metadata: dict[str, str] | None, event_id: str) -> str:
    response: dict[str, Any] = {}
    if instructions is not None:
        response["instructions"] = instructions
    if metadata:
        response["metadata"] = metadata
    event: dict[str, Any] = {"type": "response.create", "event_id": event_id}
    if response:
        event["response"] = response
    return dumps(event)


def response_cancel(response_id: str | None, event_id: str) -> str:
    event: dict[str, Any] = {"type": "response.cancel", "event_id": event_id}
    if response_id:
        event["response_id"] = response_id
    return dumps(event)


def item_truncate(item_id: str, audio_end_ms: int, event_id: str, content_index: int = 0) -> str:
    return dumps({"type": "conversation.item.truncate", "event_id": event_id, "item_id": item_id,
                  "content_index": content_index, "audio_end_ms": audio_end_ms})


def item_delete(item_id: str, event_id: str) -> str:
    return dumps({"type": "conversation.item.delete", "event_id": event_id, "item_id": item_id})


def item_create_message(role: str, text: str, event_id: str) -> str:
    content_type = "output_text" if role == "assistant" else "input_text"
    return dumps({"type": "conversation.item.create", "event_id": event_id,
                  "item": {"type": "message", "role": role, "content": [{"type": content_type, "text": text}]}})


def item_create_function_call(call_id: str, name: str, arguments: str, event_id: str) -> str:
    """A function call the model made on an earlier session (replayed into a new one)."""
    return dumps({"type": "conversation.item.create", "event_id": event_id,
                  "item": {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}})


def function_call_output(call_id: str, output: str, event_id: str) -> str:
    return dumps({"type": "conversation.item.create", "event_id": event_id,
                  "item": {"type": "function_call_output", "call_id": call_id, "output": output}})


# --- server events ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SessionCreated:
    """The socket's session exists: the adapter answers with `session.update` (not for the call).
    `expires_at`: epoch seconds at which the server ends the session (60 minutes on OpenAI)."""

    expires_at: float | None = None


@dataclass(slots=True, frozen=True)
class SessionUpdated:
    input_format: Any
    output_format: Any


@dataclass(slots=True, frozen=True)
class CancelNotActive:
    """Our `response.cancel` arrived after the response ended: a benign race (not for the call)."""


RealtimeEvent = ModelEvent | SessionCreated | SessionUpdated | CancelNotActive


def _str(obj: dict, name: str, where: str) -> str:
    value = obj.get(name)
    if type(value) is not str:
        raise ModelProtocolError(f"{where}.{name}={value!r}: expected a string")
    return value


def _obj(obj: dict, name: str, where: str) -> dict:
    value = obj.get(name)
    if type(value) is not dict:
        raise ModelProtocolError(f"{where}.{name}={value!r}: expected an object")
    return value


def _opt_str(obj: dict, name: str, where: str) -> str | None:
    value = obj.get(name)
    if value is not None and type(value) is not str:
        raise ModelProtocolError(f"{where}.{name}={value!r}: expected a string or nothing")
    return value


def _opt_ms(obj: dict, name: str, where: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise ModelProtocolError(f"{where}.{name}={value!r}: expected a number of milliseconds")
    return value


def _format(session: dict, side: str) -> Any:
    audio = session.get("audio")
    if type(audio) is not dict or type(audio.get(side)) is not dict:
        return None
    fmt = audio[side].get("format")
    return fmt.get("type") if type(fmt) is dict else None


def _audio_delta(msg: dict, kind: str) -> AudioDelta:
    return AudioDelta(_str(msg, "response_id", kind), _str(msg, "item_id", kind), _str(msg, "delta", kind))


def _speech_started(msg: dict, kind: str) -> SpeechStarted:
    return SpeechStarted(_opt_str(msg, "item_id", kind), _opt_ms(msg, "audio_start_ms", kind))


def _speech_stopped(msg: dict, kind: str) -> SpeechStopped:
    return SpeechStopped(_opt_str(msg, "item_id", kind), _opt_ms(msg, "audio_end_ms", kind))


def _user_transcript(msg: dict, kind: str) -> UserTranscript:
    text = msg.get("transcript")
    return UserTranscript(_str(msg, "item_id", kind), text if type(text) is str else "")


def _response_created(msg: dict, kind: str) -> ResponseStarted:
    response = _obj(msg, "response", kind)
    metadata = response.get("metadata")
    if type(metadata) is not dict:
        metadata = {}
    ours, purpose = metadata.get("shim_id"), metadata.get("purpose")
    return ResponseStarted(_str(response, "id", kind + ".response"), ours if type(ours) is str else None,
                           purpose if type(purpose) is str else None)


def _transcript_delta(msg: dict, kind: str) -> TranscriptDelta:
    return TranscriptDelta(_str(msg, "item_id", kind), _str(msg, "delta", kind))


def _transcript_done(msg: dict, kind: str) -> TranscriptDone:
    return TranscriptDone(_str(msg, "item_id", kind), _str(msg, "transcript", kind))


def _output_item_done(msg: dict, kind: str) -> FunctionCall | Unhandled:
    item = _obj(msg, "item", kind)
    # Tools run only from a completed item (arguments.done also fires on cancelled ones).
    if item.get("type") != "function_call" or item.get("status") != "completed":
        return Unhandled(kind)
    arguments = item.get("arguments")
    where = kind + ".item"
    return FunctionCall(_str(item, "call_id", where), _str(item, "name", where),
                        arguments if type(arguments) is str and arguments else "{}")


def _response_done(msg: dict, kind: str) -> ResponseDone:
    response = _obj(msg, "response", kind)
    details = response.get("status_details")
    status, usage = response.get("status"), response.get("usage")
    return ResponseDone(_str(response, "id", kind + ".response"), status if type(status) is str else "",
                        details.get("error") if type(details) is dict else None,
                        usage if type(usage) is dict and usage else None)


def _error(msg: dict, kind: str) -> ModelError | CancelNotActive:
    error = msg.get("error")
    if type(error) is not dict:
        error = {}
    code = error.get("code")
    if code == "response_cancel_not_active":
        return CancelNotActive()
    param, event_id = error.get("param"), error.get("event_id")
    return ModelError(
        code=code if type(code) is str else None,
        message=str(error.get("message") or "")[:300],
        param=param if type(param) is str else None,
        request_id=event_id if type(event_id) is str else None,
        busy=code == "conversation_already_has_active_response",
        fatal=code in ("session_expired", "invalid_api_key"),
    )


def _session_created(msg: dict, kind: str) -> SessionCreated:
    session = msg.get("session")
    expires = session.get("expires_at") if type(session) is dict else None
    return SessionCreated(float(expires) if type(expires) in (int, float) and expires > 0 else None)


def _session_updated(msg: dict, kind: str) -> SessionUpdated:
    session = msg.get("session")
    if type(session) is not dict:
        session = {}
    return SessionUpdated(_format(session, "input"), _format(session, "output"))


_PARSERS = {
    "response.output_audio.delta": _audio_delta,
    "session.created": _session_created,
    "session.updated": _session_updated,
    "input_audio_buffer.speech_started": _speech_started,
    "input_audio_buffer.speech_stopped": _speech_stopped,
    "conversation.item.input_audio_transcription.completed": _user_transcript,
    "response.created": _response_created,
    "response.output_audio_transcript.delta": _transcript_delta,
    "response.output_audio_transcript.done": _transcript_done,
    "response.output_item.done": _output_item_done,
    "response.done": _response_done,
    "error": _error,
}


def parse_object(msg: Any) -> RealtimeEvent:
    """One decoded server event -> its typed event; `Unhandled` for types this version does not
    use; ModelProtocolError (naming the field) for a malformed one."""
    if type(msg) is not dict:
        raise ModelProtocolError(f"event={str(msg)[:80]!r}: expected a JSON object")
    kind = msg.get("type")
    if type(kind) is not str:
        raise ModelProtocolError(f"type={kind!r}: expected a string")
    parser = _PARSERS.get(kind)
    return parser(msg, kind) if parser is not None else Unhandled(kind)


def parse(text: str | bytes) -> RealtimeEvent:
    """One server frame (JSON text) -> its typed event (see parse_object)."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ModelProtocolError(f"frame is not JSON ({exc}): {str(text)[:80]!r}") from None
    return parse_object(msg)
