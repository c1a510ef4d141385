"""OpenAI Realtime (GA) client events, sans-I/O: small builders returning JSON text.

Reference: openai-realtime.md §3–§5. The stand-in server validates every one of these against
the `openai` SDK's GA client-event union, so a shape drifting from the API fails the tests.
"""

from __future__ import annotations

from itertools import count
from typing import Any

import orjson

_event_ids = count(1)


def _event_id() -> str:
    # Errors echo the client event_id: it lets a failure be tied to the request that caused it.
    return f"shim_{next(_event_ids)}"


def dumps(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def session_update(session: dict[str, Any]) -> str:
    return dumps({"type": "session.update", "event_id": _event_id(), "session": session})


def append_audio(payload_b64: str) -> str:
    # Hot path (50 per second per call): base64 needs no JSON escaping, skip the serializer.
    return '{"type":"input_audio_buffer.append","audio":"' + payload_b64 + '"}'


def new_event_id() -> str:
    return _event_id()


def response_create(
    instructions: str | None = None, metadata: dict[str, str] | None = None, event_id: str | None = None
) -> str:
    response: dict[str, Any] = {}
    if instructions is not None:
        response["instructions"] = instructions
    if metadata:
        response["metadata"] = metadata
    event: dict[str, Any] = {"type": "response.create", "event_id": event_id or _event_id()}
    if response:
        event["response"] = response
    return dumps(event)


def response_cancel(response_id: str | None = None) -> str:
    event: dict[str, Any] = {"type": "response.cancel", "event_id": _event_id()}
    if response_id:
        event["response_id"] = response_id
    return dumps(event)


def item_truncate(item_id: str, audio_end_ms: int, content_index: int = 0) -> str:
    return dumps(
        {
            "type": "conversation.item.truncate",
            "event_id": _event_id(),
            "item_id": item_id,
            "content_index": content_index,
            "audio_end_ms": audio_end_ms,
        }
    )


def item_delete(item_id: str) -> str:
    return dumps({"type": "conversation.item.delete", "event_id": _event_id(), "item_id": item_id})


def item_create_message(role: str, text: str) -> str:
    content_type = "output_text" if role == "assistant" else "input_text"
    return dumps(
        {
            "type": "conversation.item.create",
            "event_id": _event_id(),
            "item": {"type": "message", "role": role, "content": [{"type": content_type, "text": text}]},
        }
    )


def function_call_output(call_id: str, output: str) -> str:
    return dumps(
        {
            "type": "conversation.item.create",
            "event_id": _event_id(),
            "item": {"type": "function_call_output", "call_id": call_id, "output": output},
        }
    )
