"""The "twilio-samples" row of `make bench`: the media path of Twilio's own Python example,
https://github.com/twilio-samples/speech-assistant-openai-realtime-api-python (main.py, GA
Realtime version), re-typed here so the benchmark needs no network and no FastAPI.

What is kept, because it is what costs CPU and delay per frame: one ASGI WebSocket per call
served by uvicorn (FastAPI's WebSocket *is* Starlette's), the `websockets` client to the model,
two tasks per call (Twilio -> model, model -> Twilio), `json.loads` / `json.dumps` of every
event, the base64 decode + re-encode of every audio delta, a mark after every delta, the
event-type prints, and its barge-in (on speech_started: truncate + `clear`). Left out: the
TwiML webhook and the optional greeting (neither is on the media path), and the print of every
message that some versions of the sample carry (it would only make the sample slower). Run by
scripts/bench_relay.py as `bench_relay.py --serve-sample PORT --model-url URL`; stdout (the
sample's prints) goes to the run's log file, as it would go to a container log.
"""

from __future__ import annotations

import asyncio
import base64
import json


def serve_sample(port: int, model_url: str) -> None:
    import uvicorn
    import websockets
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    SYSTEM_MESSAGE = "You are a helpful and bubbly AI assistant who loves to chat about anything the user is interested in."
    VOICE = "alloy"
    LOG_EVENT_TYPES = [
        "error", "response.content.done", "rate_limits.updated", "response.done",
        "input_audio_buffer.committed", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.speech_started", "session.created", "session.updated",
    ]
    SHOW_TIMING_MATH = False

    async def initialize_session(openai_ws):
        session_update = {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "model": "gpt-realtime",
                "output_modalities": ["audio"],
                "audio": {
                    "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
                    "output": {"format": {"type": "audio/pcmu"}, "voice": VOICE},
                },
                "instructions": SYSTEM_MESSAGE,
            },
        }
        print("Sending session update:", json.dumps(session_update))
        await openai_ws.send(json.dumps(session_update))

    async def handle_media_stream(websocket: WebSocket):
        print("Client connected")
        await websocket.accept()
        async with websockets.connect(model_url, additional_headers={"Authorization": "Bearer sk-bench"}) as openai_ws:
            await initialize_session(openai_ws)
            stream_sid = None
            latest_media_timestamp = 0
            last_assistant_item = None
            mark_queue: list[str] = []
            response_start_timestamp_twilio = None

            async def receive_from_twilio():
                nonlocal stream_sid, latest_media_timestamp
                try:
                    async for message in websocket.iter_text():
                        data = json.loads(message)
                        if data["event"] == "media" and openai_ws.state.name == "OPEN":
                            latest_media_timestamp = int(data["media"]["timestamp"])
                            audio_append = {"type": "input_audio_buffer.append", "audio": data["media"]["payload"]}
                            await openai_ws.send(json.dumps(audio_append))
                        elif data["event"] == "start":
                            stream_sid = data["start"]["streamSid"]
                            print(f"Incoming stream has started {stream_sid}")
                            nonlocal response_start_timestamp_twilio, last_assistant_item
                            response_start_timestamp_twilio = None
                            latest_media_timestamp = 0
                            last_assistant_item = None
                        elif data["event"] == "mark":
                            if mark_queue:
                                mark_queue.pop(0)
                except WebSocketDisconnect:
                    print("Client disconnected.")
                    if openai_ws.state.name == "OPEN":
                        await openai_ws.close()

            async def send_to_twilio():
                nonlocal stream_sid, last_assistant_item, response_start_timestamp_twilio
                try:
                    async for openai_message in openai_ws:
                        response = json.loads(openai_message)
                        if response["type"] in LOG_EVENT_TYPES:
                            print(f"Received event: {response['type']}", response)
                        if response.get("type") == "response.output_audio.delta" and "delta" in response:
                            audio_payload = base64.b64encode(base64.b64decode(response["delta"])).decode("utf-8")
                            audio_delta = {"event": "media", "streamSid": stream_sid, "media": {"payload": audio_payload}}
                            await websocket.send_json(audio_delta)
                            if response_start_timestamp_twilio is None:
                                response_start_timestamp_twilio = latest_media_timestamp
                                if SHOW_TIMING_MATH:
                                    print(f"Setting start timestamp for new response: {response_start_timestamp_twilio}ms")
                            if response.get("item_id"):
                                last_assistant_item = response["item_id"]
                            await send_mark(websocket, stream_sid)
                        if response.get("type") == "input_audio_buffer.speech_started":
                            print("Speech started detected.")
                            if last_assistant_item:
                                print(f"Interrupting response with id: {last_assistant_item}")
                                await handle_speech_started_event()
                except Exception as e:  # noqa: BLE001 - as the sample does
                    print(f"Error in send_to_twilio: {e}")

            async def handle_speech_started_event():
                nonlocal response_start_timestamp_twilio, last_assistant_item
                print("Handling speech started event.")
                if mark_queue and response_start_timestamp_twilio is not None:
                    elapsed_time = latest_media_timestamp - response_start_timestamp_twilio
                    if last_assistant_item:
                        truncate_event = {"type": "conversation.item.truncate", "item_id": last_assistant_item,
                                          "content_index": 0, "audio_end_ms": elapsed_time}
                        await openai_ws.send(json.dumps(truncate_event))
                    await websocket.send_json({"event": "clear", "streamSid": stream_sid})
                    mark_queue.clear()
                    last_assistant_item = None
                    response_start_timestamp_twilio = None

            async def send_mark(connection, stream_sid):
                if stream_sid:
                    mark_event = {"event": "mark", "streamSid": stream_sid, "mark": {"name": "responsePart"}}
                    await connection.send_json(mark_event)
                    mark_queue.append("responsePart")

            await asyncio.gather(receive_from_twilio(), send_to_twilio())

    app = Starlette(routes=[WebSocketRoute("/media-stream", handle_media_stream)])
    # The sample's `uvicorn.run(app, host=..., port=PORT)`: uvicorn picks uvloop when installed
    # (it is here), which only helps the sample.
    uvicorn.run(app, host="127.0.0.1", port=port)
