"""Customer URLs cannot reach into the shim's own network (tools/egress.py), and a tool URL that
is down, speaks no TLS, redirects or is refused still gets the model an answer (issue 11, item 6).

The test suite's stand-ins listen on 127.0.0.1, which the guard refuses by default: the harness
sets SHIM_TOOL_URL_ALLOW=127.0.0.1 explicitly (tests/harness.py), as `make demo` does."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from shim.config import Config, ConfigError
from shim.testing._serve import free_port, raw_http_server
from shim.testing.fake_customer import FakeCustomer, reply_results
from shim.testing.fake_realtime import Script, calls
from shim.testing.twilio_caller import keep_line_open
from shim_tools.egress import EgressRefused, guarded_client, parse_allow_list

from .harness import running_shim
from .test_tools_e2e import assistant, function_tool, outputs


def redirect_to(location: str) -> bytes:
    return f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/hook", "http://localhost:{port}/hook", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest", "http://10.0.0.1/", "http://[::1]:{port}/", "http://[::ffff:127.0.0.1]:{port}/",
    "http://100.100.100.200/", "http://0.0.0.0:{port}/",
])
async def test_by_default_no_request_reaches_loopback_private_link_local_or_metadata(url):
    server, port = await raw_http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with server, guarded_client(parse_allow_list(""), timeout=2) as client:
        with pytest.raises(httpx.ConnectError, match="not a public address|SHIM_TOOL_URL_ALLOW"):
            await client.get(url.format(port=port))


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "gopher://127.0.0.1:70/"])
async def test_only_http_and_https(url):
    async with guarded_client(parse_allow_list("127.0.0.1"), timeout=2) as client:
        with pytest.raises((EgressRefused, httpx.UnsupportedProtocol)):
            await client.get(url)


async def test_allow_list_entries_and_redirect_hops_are_checked():
    target, target_port = await raw_http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    hop, hop_port = await raw_http_server(redirect_to(f"http://127.0.0.1:{target_port}/final"))
    meta, meta_port = await raw_http_server(redirect_to("http://169.254.169.254/latest/meta-data/"))
    async with target, hop, meta:
        # a URL-prefix entry allows that prefix only; the redirect to another port is a new check
        only_hop = parse_allow_list(f"http://127.0.0.1:{hop_port}/tools/")
        async with guarded_client(only_hop, timeout=2, follow_redirects=True) as client:
            with pytest.raises(EgressRefused, match="not in SHIM_TOOL_URL_ALLOW"):
                await client.get(f"http://127.0.0.1:{hop_port}/tools/x")
            with pytest.raises(EgressRefused):
                await client.get(f"http://127.0.0.1:{hop_port}/admin")
        # an IP entry allows any port of it, redirects included; a hop to the metadata service is refused
        async with guarded_client(parse_allow_list("127.0.0.1"), timeout=2, follow_redirects=True) as client:
            assert (await client.get(f"http://127.0.0.1:{hop_port}/x")).text == "ok"
            with pytest.raises(httpx.ConnectError, match="169.254.169.254"):
                await client.get(f"http://127.0.0.1:{meta_port}/x")
        # `public` plus a CIDR: the resolved address is what is checked (localhost -> 127.0.0.1)
        async with guarded_client(parse_allow_list("public,127.0.0.0/8"), timeout=2) as client:
            assert (await client.get(f"http://localhost:{target_port}/")).text == "ok"


async def test_the_address_checked_is_the_address_connected(monkeypatch):
    """DNS rebinding: a name that resolves to a public address when checked and to loopback when
    connected cannot happen, because the connection goes to the address that was checked. Here a
    name resolving to loopback is refused however it is spelled."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return await real(host, port, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    async with guarded_client(parse_allow_list(""), timeout=2) as client:
        with pytest.raises(httpx.ConnectError, match="rebind.example resolves to 127.0.0.1"):
            await client.get("http://rebind.example/")


@pytest.mark.parametrize("raw", ["http://", "ftp://tools.example/", "bad host", "a/b", "10.0.0.0/33x"])
def test_a_bad_allow_list_stops_the_start_naming_the_entry(raw):
    with pytest.raises(ConfigError, match="SHIM_TOOL_URL_ALLOW"):
        Config.from_env({"SHIM_TOOL_URL_ALLOW": raw})


def test_operator_endpoints_are_trusted():
    policy = parse_allow_list("", trusted_urls=["http://127.0.0.1:9/v1"])
    assert policy.url_rule(httpx.URL("http://127.0.0.1:9/v1/chat/completions")) == (True, True)
    assert policy.url_rule(httpx.URL("http://127.0.0.1:10/")) == (True, False)  # other ports: checked


async def test_tool_urls_that_are_down_speak_no_tls_redirect_or_are_refused_still_answer_the_model(tmp_path, db_dsn):
    plain, plain_port = await raw_http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    moved, moved_port = await raw_http_server(redirect_to("http://169.254.169.254/latest/meta-data/"))
    async with plain, moved, FakeCustomer() as customer:
        customer.on("/ok", reply_results(lambda name, args: {"open": True}))
        tools = [
            function_tool("down", f"http://127.0.0.1:{free_port()}/hook"),
            function_tool("no_tls", f"https://127.0.0.1:{plain_port}/hook"),
            function_tool("moved", f"http://127.0.0.1:{moved_port}/hook"),
            function_tool("metadata", "http://169.254.169.254/latest/meta-data/iam"),
            function_tool("ok", customer.url("/ok")),
        ]
        script = Script(replies=[calls(("down", {}), ("no_tls", {}), ("moved", {}), ("metadata", {}), ("ok", {})),
                                 "Sorry about that."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, tools)) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            await keep_line_open(caller, session.wait_for("response.create", count=3, timeout=15))
            assert not caller.closed  # the call goes on
            await caller.stop()
            await run.drain()
    by_call = {fc["call_id"]: fc["name"] for fc in session.function_calls}
    got = {by_call[o["call_id"]]: o["output"] for o in outputs(session)}
    assert set(got) == {"down", "no_tls", "moved", "metadata", "ok"}
    assert got["ok"] == '{"open":true}'
    assert got["moved"] == "Error: the tool failed with HTTP status 302."  # webhooks never follow redirects
    for name in ("down", "no_tls", "metadata"):
        assert got[name] in ("No result returned.",) or got[name].startswith("Error"), (name, got[name])


async def test_api_request_tools_have_a_total_deadline_and_a_bounded_answer(tmp_path, db_dsn):
    async def drip(reader, writer):  # headers, then a byte every 0.2 s, forever
        try:
            await reader.read(4096)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            while True:
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)
        except (OSError, asyncio.CancelledError):
            writer.close()

    dripping = await asyncio.start_server(drip, "127.0.0.1", 0)
    huge, huge_port = await raw_http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + b"y" * 3_000_000)
    drip_port = dripping.sockets[0].getsockname()[1]
    async with dripping, huge, FakeCustomer() as customer:
        tools = [
            {"type": "apiRequest", "name": "dripping", "method": "POST", "url": f"http://127.0.0.1:{drip_port}/x", "timeoutSeconds": 1},
            {"type": "apiRequest", "name": "huge", "method": "POST", "url": f"http://127.0.0.1:{huge_port}/x"},
        ]
        script = Script(replies=[calls(("dripping", {}), ("huge", {})), "Sorry about that."], audio_ms_per_char=15)
        async with running_shim(tmp_path, db_dsn, script, assistant_overrides=assistant(customer, tools)) as run:
            caller = await run.place_call()
            session = await run.fake.wait_for_session()
            started = asyncio.get_running_loop().time()
            await keep_line_open(caller, session.wait_for("response.create", count=3, timeout=15))
            waited = asyncio.get_running_loop().time() - started
            await caller.stop()
    by_call = {fc["call_id"]: fc["name"] for fc in session.function_calls}
    got = {by_call[o["call_id"]]: o["output"] for o in outputs(session)}
    assert got["dripping"] == "No result returned." and waited < 5
    assert got["huge"] == "y" * 20_000
