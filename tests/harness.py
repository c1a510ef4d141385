"""Runs the real server (uvicorn + Starlette + the picows media listener) in-process against the
stand-in Realtime model, and places calls through the simulated Twilio caller."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import orjson
import uvicorn

from shim.app import create_app
from shim.config import Config
from shim.testing.fake_realtime import FakeRealtime, Script
from shim.testing.twilio_caller import TwilioCaller, incoming_call_params, post_twilio_webhook
from shim.testing._serve import free_port
from shim.twilio_media import MAX_FRAME_BYTES

AUTH_TOKEN = "test-twilio-auth-token"
API_KEY = "sk-test-0123456789"
REPO = Path(__file__).resolve().parents[1]
CALLER = "+15550001111"
SHIM_NUMBER = "+15550002222"


@dataclass
class Running:
    config: Config
    fake: FakeRealtime
    app: Any
    http: httpx.AsyncClient

    @property
    def shim(self):
        return self.app.state.shim

    async def voice_webhook(self, call_sid: str, *, to: str = SHIM_NUMBER, from_: str = CALLER) -> httpx.Response:
        params = incoming_call_params(call_sid, from_, to, "AC" + "0" * 32)
        return await post_twilio_webhook(self.http, self.config.http_url("/twilio/voice"), params, AUTH_TOKEN)

    async def place_call(self, *, to: str = SHIM_NUMBER, from_: str = CALLER, **caller_kw) -> TwilioCaller:
        """What Twilio does: the voice webhook, then the <Stream> it was told to open."""
        call_sid = caller_kw.pop("call_sid", None) or f"CA{__import__('uuid').uuid4().hex}"
        response = await self.voice_webhook(call_sid, to=to, from_=from_)
        assert response.status_code == 200, response.text
        stream_url, params = parse_stream(response.text)
        caller = TwilioCaller(stream_url, AUTH_TOKEN, custom_parameters=params, call_sid=call_sid, **caller_kw)
        await caller.connect()
        return caller

    async def twilio_post(self, path: str, params: dict[str, str]) -> httpx.Response:
        return await post_twilio_webhook(self.http, self.config.http_url(path), params, AUTH_TOKEN)

    async def drain(self) -> None:
        assert await self.shim.recorder.drain(10), "writer did not drain"


def parse_stream(twiml: str) -> tuple[str, dict[str, str]]:
    root = ElementTree.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert stream is not None, twiml
    return stream.attrib["url"], {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}


@contextlib.asynccontextmanager
async def running_shim(
    tmp_path: Path, dsn: str, script: Script | None = None, *, media: str = "picows",
    assistant_overrides: dict[str, Any] | None = None, **overrides,
):
    fake = FakeRealtime(script or Script())
    await fake.start()
    http_port, media_port = free_port(), free_port()
    assistants = tmp_path / "assistants"
    assistants.mkdir(parents=True, exist_ok=True)
    demo = orjson.loads((REPO / "assistants" / "demo.json").read_bytes())
    # Byte-identical relay is asserted unless a test asks for background sound.
    demo.setdefault("backgroundSound", "off")
    demo.update(assistant_overrides or {})
    (assistants / "demo.json").write_bytes(orjson.dumps(demo))
    config = Config(
        openai_api_key=API_KEY,
        openai_realtime_url=fake.url,
        twilio_auth_token=AUTH_TOKEN,
        public_url=f"http://127.0.0.1:{http_port}",
        public_media_url=f"ws://127.0.0.1:{media_port}/twilio/media" if media == "picows" else "",
        database_url=dsn,
        data_dir=tmp_path / "data",
        assistants_dir=assistants,
        default_assistant="demo",
        log_format="console",
        drain_timeout_s=2,
        # No test reaches the internet: post-call analysis goes to a closed local port unless a
        # test brings the chat-model stand-in (tests/test_tools_e2e.py).
        openai_base_url="http://127.0.0.1:9/v1",
        # The stand-in tool servers listen on loopback, which the egress guard refuses by default.
        tool_url_allow="127.0.0.1",
    )
    config = replace(config, **overrides)
    app = create_app(config, media_host="127.0.0.1", media_port=media_port if media == "picows" else None)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=http_port, log_config=None, lifespan="on", ws="websockets-sansio",
                       ws_max_size=MAX_FRAME_BYTES)  # as `shim serve`
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "server did not start"
        async with httpx.AsyncClient(timeout=10) as http:
            yield Running(config=config, fake=fake, app=app, http=http)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        await fake.stop()
