"""Fault drill: every way a tool URL can fail, in one call through a real `shim serve`.

Bounded, loopback only (embedded PostgreSQL, the stand-in Realtime model, the simulated Twilio
caller, local tool servers). The model calls eight tools in one turn: one answers, the others are
slow (past their timeoutSeconds), down, 500, garbage, plain HTTP behind an https URL (TLS error),
a redirect to the cloud metadata address, and the metadata address itself (refused by the egress
guard: SHIM_TOOL_URL_ALLOW=127.0.0.1 lets the loopback stand-ins through, nothing else).

Checks: every call gets a function_call_output within its timeout, then exactly one
response.create; the call is still up; each tool_calls row says what happened.

Usage: .venv/bin/python scripts/drill_tools.py   (exit 0 when every check holds; ~1 min, most of it
loading the Vapi SDK models the tool stand-in validates with)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drill_db_outage import place_call, read_stopped_db, report, run_drill, serve_env, start_serve, stop_serve  # noqa: E402

from shim.testing.fake_customer import FakeCustomer, delay, invalid_json, reply_results, status  # noqa: E402
from shim.testing.fake_realtime import FakeRealtime, Script, calls  # noqa: E402
from shim.testing.twilio_caller import keep_line_open  # noqa: E402
from shim.testing._serve import free_port, raw_http_server  # noqa: E402

SHIM_NUMBER = "+15550100500"


def outputs_of(session) -> dict[str, str]:
    return {e["item"]["call_id"]: e["item"]["output"] for e in session.received
            if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"}


def tool(name: str, url: str, timeout: float | None = None) -> dict:
    server: dict = {"url": url}
    if timeout is not None:
        server["timeoutSeconds"] = timeout
    return {"type": "function", "function": {"name": name, "description": name,
                                             "parameters": {"type": "object", "properties": {}}}, "server": server}


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="shim-drill-tools-"))
    plain, plain_port = await raw_http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    moved, moved_port = await raw_http_server(
        b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\nContent-Length: 0\r\n\r\n")
    customer = FakeCustomer()
    await customer.start()
    customer.on("/ok", reply_results(lambda name, args: {"open": True}))
    customer.on("/slow", delay(3, reply_results(lambda name, args: "too late")))
    customer.on("/broken", status(500))
    customer.on("/garbled", invalid_json())
    tools = [
        tool("ok", customer.url("/ok")),
        tool("slow", customer.url("/slow"), timeout=2),
        tool("down", f"http://127.0.0.1:{free_port()}/hook"),
        tool("broken", customer.url("/broken")),
        tool("garbled", customer.url("/garbled")),
        tool("no_tls", f"https://127.0.0.1:{plain_port}/hook"),
        tool("moved", f"http://127.0.0.1:{moved_port}/hook"),
        tool("metadata", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
    ]
    assistants = work / "assistants"
    assistants.mkdir()
    (assistants / "tools.json").write_text(json.dumps({
        "firstMessageMode": "assistant-speaks-first-with-model-generated-message", "backgroundSound": "off",
        "model": {"provider": "openai", "model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."}],
                  "tools": tools}}))
    model = FakeRealtime(Script(replies=[calls(*((t["function"]["name"], {}) for t in tools)), "Sorry about that."],
                                audio_ms_per_char=15))
    await model.start()
    http_port, media_port = free_port(), free_port()
    env = serve_env(model.url, http_port, media_port, work / "data", assistants=assistants, assistant="tools",
                    log_level="error")
    env.pop("DATABASE_URL", None)
    server = await start_serve(env, http_port, media_port)
    checks: dict[str, bool] = {}
    call_sid = "CA" + uuid.uuid4().hex
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            caller = await place_call(http, env, "+15550100501", SHIM_NUMBER, call_sid)
            session = await model.wait_for_session()
            await keep_line_open(caller, session.wait_sent("response.done", count=1, timeout=15))
            t0 = time.monotonic()

            async def all_answered() -> None:
                while len(outputs_of(session)) < len(tools):
                    await asyncio.sleep(0.02)

            await keep_line_open(caller, asyncio.wait_for(all_answered(), 30))
            answered_s = time.monotonic() - t0
            await keep_line_open(caller, asyncio.sleep(0.5))  # the response.create that follows
            await keep_line_open(caller, caller.send_silence(400))
            checks["call still up after every tool failed"] = not caller.closed
            await caller.stop()
            await asyncio.sleep(1.0)
    finally:
        await stop_serve(server)
        await model.stop()
        await customer.stop()
        plain.close()
        moved.close()

    outputs = outputs_of(session)
    names = {fc["call_id"]: fc["name"] for fc in session.function_calls}
    try:
        rows = await read_stopped_db(work / "data", lambda conn: conn.fetch(
            "SELECT name, status, latency_ms, error FROM tool_calls WHERE call_sid = $1 ORDER BY seq", call_sid))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"== 8 tools called in one turn; the model had every answer {answered_s:.2f} s after the turn "
          f"(slow tool's timeoutSeconds: 2)")
    for r in rows:
        output = next((o for cid, o in outputs.items() if names.get(cid) == r["name"]), None)
        print(f"   {r['name']:>8}: {r['status']:>7} {r['latency_ms'] or '-':>5} ms  model told: {output!r}")
    checks["every tool call answered"] = len(outputs) == 8 and set(names.values()) == {t["function"]["name"] for t in tools}
    checks["within the timeout"] = answered_s < 4
    last_output = max(i for i, e in enumerate(session.received) if e["type"] == "conversation.item.create"
                      and e["item"]["type"] == "function_call_output")
    checks["one response.create after the outputs"] = sum(
        1 for e in session.received[last_output:] if e["type"] == "response.create") == 1
    checks["metadata address refused"] = any(r["name"] == "metadata" and "not a public address" in (r["error"] or "")
                                             for r in rows)
    checks["nothing invalid reached the model"] = model.validation_errors == []
    return report(checks)


if __name__ == "__main__":
    run_drill(main)
