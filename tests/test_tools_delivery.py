"""tools/secrets.py, tools/delivery.py, tools/analysis.py and migration 0002, against a real Postgres
(`db_dsn`), a real Recorder, a local webhook endpoint and the Chat Completions stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from structlog.testing import capture_logs

from shim.store import _SCHEMA_MIGRATIONS_DDL, TABLES, Recorder, load_migrations, migrate
from shim.testing.fake_openai_text import FakeOpenAIText
from shim_tools.analysis import DEFAULT_MESSAGES, analyze, count_messages
from shim_tools.delivery import WebhookSender
from shim_tools.secrets import SecretsBook, SecretsError, ServerTarget, resolve_server

SECRETS = ("s-inline-111", "s-tool-id-222", "s-tool-name-333", "s-asst-444", "s-default-555", "s-env-666",
           "Bearer tok-777", "q-token-888")


# ------------------------------------------------------------------------------------------ helpers


async def fetch(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class Hit:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Hook:
    """A customer's webhook endpoint: records every request; answers from `script` (status, delay,
    body) or, per path, from `scripts[path]`, then 200 {"ok": true}. `gate`, when set, holds every
    request until it is opened."""

    hits: list[Hit] = field(default_factory=list)
    script: deque = field(default_factory=deque)
    scripts: dict[str, deque] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: Request) -> Response:
        self.hits.append(Hit(request.url.path, request.url.query, dict(request.headers), await request.body()))
        queue = self.scripts.get(request.url.path) or self.script
        status, delay, body = queue.popleft() if queue else (200, 0.0, b'{"ok":true}')
        waits = []
        if delay:
            waits.append(asyncio.wait_for(self.stopping.wait(), delay))
        if self.gate is not None:
            waits.append(self.gate.wait())
        for w in waits:
            with contextlib.suppress(asyncio.TimeoutError):
                await w
        return Response(body, status_code=status, media_type="application/json")


@pytest.fixture
async def hook():
    h = Hook()
    app = Starlette(routes=[Route("/{path:path}", h.handle, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                    timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.005)
    h.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield h
    h.stopping.set()
    if h.gate is not None:
        h.gate.set()
    server.should_exit = True
    await asyncio.wait_for(task, 5)
    sock.close()


@pytest.fixture
async def recorder(db_dsn, tmp_path):
    rec = Recorder(db_dsn, spool_path=tmp_path / "spool.jsonl", flush_interval=0.005, retry_initial=0.02,
                   retry_max=0.1, connect_timeout=2.0)
    await rec.start()
    yield rec
    await rec.close(timeout=1)


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


async def delivery_rows(rec: Recorder, dsn: str):
    assert await rec.drain(5)
    return [dict(r) for r in await fetch(dsn, "SELECT * FROM webhook_deliveries ORDER BY at, attempt")]


def assert_clean(*blobs) -> None:
    text = json.dumps(blobs, default=str)
    for secret in SECRETS:
        assert secret not in text, secret
    assert "token=" not in text


def target(url: str, **headers: str) -> ServerTarget:
    return ServerTarget(url=url, headers={"Content-Type": "application/json", **headers})


# ------------------------------------------------------------------------------------------ secrets


def _book(**sections) -> SecretsBook:
    return SecretsBook._from_json(sections, "test")


def test_resolve_server_target_precedence():
    book = SecretsBook.empty()
    tool = {"id": "t1", "type": "function", "function": {"name": "lookup"},
            "server": {"url": "https://tools.example/t", "timeoutSeconds": 7}}
    asst = {"server": {"url": "https://asst.example/a", "timeoutSeconds": 3}, "serverUrl": "https://legacy.example/l"}
    kw = dict(assistant_id="a1", number_server_url="https://number.example/n", secrets=book)

    t = resolve_server(tool=tool, assistant=asst, **kw)
    assert (t.url, t.source, t.timeout_s) == ("https://tools.example/t", "tool.server", 7.0)
    t = resolve_server(tool={"function": {"name": "lookup"}}, assistant=asst, **kw)
    assert (t.url, t.source, t.timeout_s) == ("https://asst.example/a", "assistant.server", 3.0)
    t = resolve_server(tool=None, assistant={"serverUrl": "https://legacy.example/l"}, **kw)
    assert (t.url, t.source, t.timeout_s) == ("https://legacy.example/l", "assistant.serverUrl", 20.0)
    t = resolve_server(tool=None, assistant={"server": {"timeoutSeconds": 5}}, **kw)  # server without url
    assert (t.url, t.source) == ("https://number.example/n", "number")
    assert resolve_server(tool=None, assistant={}, assistant_id="a1", number_server_url=None, secrets=book) is None
    assert resolve_server(tool=None, assistant={"server": {"url": "ftp://x"}}, assistant_id=None,
                          number_server_url="", secrets=book) is None
    # timeoutSeconds clamped to Vapi's 1..300; junk -> 20
    for raw, want in ((0.2, 1.0), (900, 300.0), ("10", 20.0), (True, 20.0)):
        t = resolve_server(tool=None, assistant={"server": {"url": "https://a.example", "timeoutSeconds": raw}}, **kw)
        assert t.timeout_s == want


def test_resolve_server_secret_and_header_precedence():
    book = _book(
        default={"secret": "s-default-555", "headers": {"X-Env": "default", "Authorization": "Bearer tok-777"}},
        assistants={"a1": {"secret": "s-asst-444", "headers": {"X-Env": "assistant"}}},
        tools={"t1": {"secret": "s-tool-id-222"}, "lookup": {"secret": "s-tool-name-333", "headers": {"X-Tool": "1"}}},
    )
    inline_tool = {"id": "t1", "function": {"name": "lookup"},
                   "server": {"url": "https://tools.example/t", "secret": "s-inline-111",
                              "headers": {"x-custom": "v", "authorization": "Bearer from-json", "X-Num": 5}}}

    def secret_of(tool, assistant=None, assistant_id="a1", secrets=book):
        t = resolve_server(tool=tool, assistant=assistant or {"server": {"url": "https://asst.example/a"}},
                           assistant_id=assistant_id, number_server_url=None, secrets=secrets)
        return t.headers.get("X-Vapi-Secret")

    assert secret_of(inline_tool) == "s-inline-111"
    assert secret_of({"id": "t1", "function": {"name": "lookup"}}) == "s-tool-id-222"
    assert secret_of({"id": "other", "function": {"name": "lookup"}}) == "s-tool-name-333"
    assert secret_of({"id": "other", "function": {"name": "other"}}) == "s-asst-444"
    assert secret_of(None) == "s-asst-444"
    assert secret_of(None, assistant_id="a2") == "s-default-555"
    assert secret_of(None, assistant_id="a2", secrets=SecretsBook.empty()) is None
    # the assistant's own inline secret (new and legacy spelling) beats the book
    assert secret_of(None, {"server": {"url": "https://a.example", "secret": "s-inline-111"}}) == "s-inline-111"
    assert secret_of(None, {"serverUrl": "https://a.example", "serverUrlSecret": "s-inline-111"}) == "s-inline-111"
    assert secret_of(None, {"server": {"url": "https://a.example"}, "serverUrlSecret": "s-inline-111"}) == "s-inline-111"

    t = resolve_server(tool=inline_tool, assistant={}, assistant_id="a1", number_server_url=None, secrets=book)
    h = t.headers
    assert h["Content-Type"] == "application/json"
    assert h["x-custom"] == "v" and h["X-Num"] == "5"  # server.headers verbatim
    assert h["authorization"] == "Bearer from-json" and "Authorization" not in h  # JSON Authorization wins
    assert h["X-Env"] == "assistant" and h["X-Tool"] == "1"  # book headers: most specific wins
    t = resolve_server(tool=None, assistant={"server": {"url": "https://a.example"}}, assistant_id="zz",
                       number_server_url=None, secrets=book)
    assert t.headers["Authorization"] == "Bearer tok-777"  # a book credential when the JSON sets none
    assert_clean(repr(t), str(t), repr(book), repr(book.default))


def test_secrets_book_load(tmp_path):
    assert repr(SecretsBook.load(None, {})) == repr(SecretsBook.empty())
    book = SecretsBook.load(None, {"SHIM_VAPI_SECRET": "s-env-666"})
    assert book.default.secret == "s-env-666"
    f = tmp_path / "secrets.json"
    f.write_text(json.dumps({"default": {"headers": {"X-A": "1"}}, "tools": {"lookup": "s-tool-name-333"}}))
    book = SecretsBook.load(None, {"SHIM_SECRETS_FILE": str(f), "SHIM_VAPI_SECRET": "s-env-666"})
    assert book.default.secret == "s-env-666" and book.default.headers == {"X-A": "1"}
    assert book.tools["lookup"].secret == "s-tool-name-333"
    f.write_text(json.dumps({"default": {"secret": "s-default-555"}}))
    assert SecretsBook.load(str(f), {"SHIM_VAPI_SECRET": "s-env-666"}).default.secret == "s-default-555"
    assert_clean(repr(book), str(book.tools["lookup"]))


@pytest.mark.parametrize(("content", "expected"), [
    ('{"default": {"secret": "s-default-555",}}', ["invalid JSON", "line 1"]),
    ('["s-default-555"]', ["top level must be a JSON object"]),
    ('{"defaults": {"secret": "s-default-555"}}', ["unknown key", "'defaults'"]),
    ('{"tools": ["s-tool-id-222"]}', ["tools must be an object"]),
    ('{"tools": {"lookup": {"secret": 5}}}', ["tools.lookup.secret", "non-empty string"]),
    ('{"tools": {"lookup": {"sekret": "s-tool-id-222"}}}', ["tools.lookup", "'sekret'"]),
    ('{"assistants": {"a1": {"headers": {"X-A": 1}}}}', ["assistants.a1.headers.X-A", "must be a string"]),
    ('{"assistants": {"a1": {"headers": {"bad name": "s-asst-444"}}}}', ["assistants.a1.headers", "'bad name'"]),
    ('{"assistants": {"a1": {"secret": "s-asst-444\\nX-Evil: 1"}}}', ["assistants.a1.secret", "line breaks"]),
    ('{"default": {}}', ["default", "neither secret nor headers"]),
])
def test_secrets_book_errors_name_file_and_key_never_values(tmp_path, content, expected):
    f = tmp_path / "book.json"
    f.write_text(content)
    with pytest.raises(SecretsError) as info:
        SecretsBook.load(None, {"SHIM_SECRETS_FILE": str(f)})
    msg = str(info.value)
    assert str(f) in msg
    for part in expected:
        assert part in msg, (part, msg)
    assert_clean(msg)


def test_secrets_book_missing_file(tmp_path):
    with pytest.raises(SecretsError, match=r"SHIM_SECRETS_FILE .*nope\.json: cannot read it"):
        SecretsBook.load(str(tmp_path / "nope.json"), {})


# ------------------------------------------------------------------------------------------ delivery


async def test_post_headers_from_each_source_and_rows_without_secrets(hook, recorder, db_dsn, http):
    book = _book(default={"secret": "s-default-555"}, assistants={"a1": {"secret": "s-asst-444"}},
                 tools={"t1": {"secret": "s-tool-id-222"}, "lookup": {"secret": "s-tool-name-333"}})
    url = f"{hook.url}/vapi/tools?token=q-token-888"
    cases = [  # (tool, assistant, assistant_id, expected secret)
        ({"id": "t1", "function": {"name": "lookup"}, "server": {"url": url, "secret": "s-inline-111"}}, {}, "a1",
         "s-inline-111"),
        ({"id": "t1", "function": {"name": "lookup"}, "server": {"url": url}}, {}, "a1", "s-tool-id-222"),
        ({"id": "t9", "function": {"name": "lookup"}, "server": {"url": url}}, {}, "a1", "s-tool-name-333"),
        (None, {"server": {"url": url}}, "a1", "s-asst-444"),
        (None, {"server": {"url": url}}, "a2", "s-default-555"),
    ]
    sender = WebhookSender(http, recorder)
    with capture_logs() as logs:
        for tool, assistant, aid, want in cases:
            t = resolve_server(tool=tool, assistant=assistant, assistant_id=aid, number_server_url=None, secrets=book)
            d = await sender.post(t, {"message": {"type": "tool-calls", "n": want}}, kind="tool-calls",
                                  call_sid="CA1")
            assert d.ok and d.http_status == 200 and d.json() == {"ok": True} and d.attempts == 1
            hit = hook.hits[-1]
            assert hit.headers["x-vapi-secret"] == want
            assert hit.headers["content-type"] == "application/json"
            assert hit.query == "token=q-token-888" and hit.path == "/vapi/tools"
            assert orjson.loads(hit.body) == {"message": {"type": "tool-calls", "n": want}}
        # verbatim headers, Authorization override, no secret when none is known
        t = resolve_server(tool=None, assistant={"server": {"url": url, "headers": {"Authorization": "Bearer tok-777",
                                                                                     "X-Trace": "abc"}}},
                           assistant_id="a1", number_server_url=None, secrets=SecretsBook.empty())
        assert (await sender.post(t, {"message": {}}, kind="status-update", call_sid="CA1")).ok
        hit = hook.hits[-1]
        assert hit.headers["authorization"] == "Bearer tok-777" and hit.headers["x-trace"] == "abc"
        assert "x-vapi-secret" not in hit.headers
        # an error body echoing the secret and the token is scrubbed from the row and the log
        hook.script.append((401, 0, b'{"error":"bad secret s-inline-111 for token=q-token-888"}'))
        t = resolve_server(tool=cases[0][0], assistant={}, assistant_id="a1", number_server_url=None, secrets=book)
        d = await sender.post(t, {"message": {}}, kind="tool-calls", call_sid="CA1")
        assert d.status == "error" and d.http_status == 401 and b"s-inline-111" in d.body  # the caller gets it all
        assert d.error.startswith("HTTP 401") and "[redacted]" in d.error
        # connection refused to a URL whose query holds a token
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook?token=q-token-888"
        d = await sender.post(target(dead, **{"X-Vapi-Secret": "s-env-666"}), {}, kind="hang", call_sid="CA1")
        assert d.status == "error" and d.http_status is None and d.attempts == 1
    rows = await delivery_rows(recorder, db_dsn)
    assert len(rows) == len(cases) + 3
    assert {r["url"] for r in rows} == {f"{hook.url}/vapi/tools", dead.split("?")[0]}
    assert [r["status"] for r in rows] == ["ok"] * (len(cases) + 1) + ["error", "error"]
    assert all(r["attempt"] == 1 and r["call_sid"] == "CA1" and r["latency_ms"] >= 0 for r in rows)
    assert rows[-2]["http_status"] == 401 and rows[-1]["http_status"] is None and rows[-1]["error"]
    assert_clean([{k: v for k, v in r.items() if k != "id"} for r in rows], logs)


async def test_timeout_seconds_is_a_total_deadline(hook, recorder, db_dsn, http):
    hook.script.append((200, 2.0, b"{}"))
    t = resolve_server(tool=None, assistant={"server": {"url": hook.url + "/slow", "timeoutSeconds": 1}},
                       assistant_id=None, number_server_url=None, secrets=SecretsBook.empty())
    t0 = time.monotonic()
    d = await WebhookSender(http, recorder).post(t, {"message": {}}, kind="tool-calls", call_sid="CA2")
    elapsed = time.monotonic() - t0
    assert d.status == "timeout" and d.attempts == 1 and d.body is None
    assert 0.9 <= elapsed < 1.2, elapsed
    rows = await delivery_rows(recorder, db_dsn)
    assert [(r["status"], r["http_status"]) for r in rows] == [("timeout", None)]
    assert 900 <= rows[0]["latency_ms"] < 1200


async def test_tool_calls_are_not_retried(hook, recorder, db_dsn, http):
    hook.script.extend([(500, 0, b'{"error":"boom"}'), (200, 0, b"{}")])
    d = await WebhookSender(http, recorder).post(target(hook.url + "/t"), {"message": {}}, kind="tool-calls",
                                                 call_sid="CA3")
    assert (d.status, d.http_status, d.attempts, d.body) == ("error", 500, 1, b'{"error":"boom"}')
    assert len(hook.hits) == 1
    hook.script.clear()
    # no redirect is followed; an oversized answer is an error, not a memory spike
    hook.scripts["/moved"] = deque([(302, 0, b"")])
    small = WebhookSender(http, recorder, max_response_bytes=10)
    d = await small.post(target(hook.url + "/moved"), {}, kind="tool-calls", call_sid="CA3", retries=2)
    assert (d.status, d.http_status, d.attempts, d.error) == ("error", 302, 1, "HTTP 302 redirect not followed")
    hook.scripts["/big"] = deque([(200, 0, b"x" * 100)])
    d = await small.post(target(hook.url + "/big"), {}, kind="tool-calls", call_sid="CA3")
    assert (d.status, d.http_status, d.body) == ("error", 200, None) and "larger than 10 bytes" in d.error
    rows = await delivery_rows(recorder, db_dsn)
    assert [(r["attempt"], r["status"], r["http_status"]) for r in rows] == [
        (1, "error", 500), (1, "error", 302), (1, "error", 200)]
    assert len(hook.hits) == 3


async def test_background_messages_retry_a_bounded_number_of_times(hook, recorder, db_dsn, http):
    sender = WebhookSender(http, recorder, background_backoff_s=0.01)
    hook.scripts["/a"] = deque([(500, 0, b""), (500, 0, b""), (200, 0, b"")])
    sender.send_in_background(target(hook.url + "/a"), {"message": {"type": "status-update"}},
                              kind="status-update", call_sid="CA4")
    assert await sender.drain(5)
    hook.scripts["/b"] = deque([(503, 0, b"")] * 5 + [(429, 0, b"")])
    sender.send_in_background(target(hook.url + "/b"), {"message": {"type": "hang"}}, kind="hang", call_sid="CA4")
    hook.scripts["/c"] = deque([(404, 0, b"")])  # not retryable
    sender.send_in_background(target(hook.url + "/c"), {"message": {"type": "transcript"}}, kind="transcript",
                              call_sid="CA4")
    await sender.close(5)
    rows = await delivery_rows(recorder, db_dsn)
    by_url = {}
    for r in rows:
        by_url.setdefault(r["url"].rsplit("/", 1)[1], []).append((r["attempt"], r["status"], r["http_status"]))
    assert by_url["a"] == [(1, "error", 500), (2, "error", 500), (3, "ok", 200)]
    assert by_url["b"] == [(1, "error", 503), (2, "error", 503), (3, "error", 503), (4, "error", 503)]  # 1 + 3
    assert by_url["c"] == [(1, "error", 404)]
    assert sender.stats()["delivered"] == 1 and sender.stats()["failed"] == 2


async def test_background_backlog_is_bounded_drop_oldest(hook, recorder, db_dsn, http):
    sender = WebhookSender(http, recorder, max_concurrency=1, max_backlog=2)
    hook.gate = asyncio.Event()
    t = target(hook.url + "/bg")
    with capture_logs() as logs:
        sender.send_in_background(t, {"n": 1}, kind="transcript", call_sid="CA5")
        while not hook.hits:  # the only worker is now busy with message 1
            await asyncio.sleep(0.005)
        for n in (2, 3, 4, 5):
            sender.send_in_background(t, {"n": n}, kind="transcript", call_sid="CA5")
        assert sender.backlog == 2 and sender.in_flight == 1 and sender.dropped == 2
        hook.gate.set()
        await sender.close(5)
    assert [orjson.loads(h.body)["n"] for h in hook.hits] == [1, 4, 5]
    assert sum(1 for e in logs if e["event"] == "webhook.dropped") == 2
    rows = await delivery_rows(recorder, db_dsn)
    dropped = [r for r in rows if r["attempt"] == 0]
    assert len(dropped) == 2 and all(r["status"] == "error" and "backlog full" in r["error"] for r in dropped)
    assert sum(1 for r in rows if r["status"] == "ok") == 3


async def test_a_hanging_customer_server_does_not_hold_up_the_others(hook, recorder, db_dsn, http):
    sender = WebhookSender(http, recorder, max_concurrency=4, max_per_host=2)
    hook.scripts["/slow"] = deque([(200, 5.0, b"{}")] * 6)
    slow = target(hook.url + "/slow")  # 127.0.0.1
    fast = target(hook.url.replace("127.0.0.1", "localhost") + "/fast")  # another host, same server
    for n in range(6):
        sender.send_in_background(slow, {"n": n}, kind="status-update", call_sid="CA9", retries=0)
    for n in range(2):
        sender.send_in_background(fast, {"n": n}, kind="transcript", call_sid="CA9", retries=0)
    async with asyncio.timeout(2):  # well before the slow host answers anything
        while sum(1 for h in hook.hits if h.path == "/fast") < 2:
            await asyncio.sleep(0.01)
    assert sum(1 for h in hook.hits if h.path == "/slow") == 2  # at most max_per_host in flight
    hook.stopping.set()  # the slow host answers now
    await sender.close(5)
    assert sum(1 for h in hook.hits if h.path == "/slow") == 6


async def test_close_drains_then_cancels_and_records_the_rest(hook, recorder, db_dsn, http):
    sender = WebhookSender(http, recorder, max_concurrency=2)
    hook.script.extend([(200, 0.1, b"")] * 4)
    for n in range(4):
        sender.send_in_background(target(hook.url + "/d"), {"n": n}, kind="end-of-call-report", call_sid="CA6")
    t0 = time.monotonic()
    await sender.close(5)
    assert time.monotonic() - t0 < 1.0
    assert len(hook.hits) == 4 and sender.stats()["delivered"] == 4

    stuck = WebhookSender(http, recorder, max_concurrency=1)
    hook.gate = asyncio.Event()  # never opened before close()
    for n in range(3):
        stuck.send_in_background(target(hook.url + "/stuck"), {"n": n}, kind="status-update", call_sid="CA7")
    t0 = time.monotonic()
    await stuck.close(0.3)
    assert time.monotonic() - t0 < 1.0
    stuck.send_in_background(target(hook.url + "/late"), {}, kind="status-update", call_sid="CA7")
    rows = await delivery_rows(recorder, db_dsn)
    assert sorted((r["url"].rsplit("/", 1)[1], r["attempt"], r["status"], r["error"]) for r in rows
                  if r["call_sid"] == "CA7") == [
        ("late", 0, "error", "not sent: sender closed"),
        ("stuck", 0, "error", "not sent: shutdown"),
        ("stuck", 0, "error", "not sent: shutdown"),
        ("stuck", 1, "error", "cancelled"),
    ]
    assert sum(1 for r in rows if r["call_sid"] == "CA6" and r["status"] == "ok") == 4


async def test_close_stops_a_worker_that_swallowed_the_cancel(recorder, http):
    # Python 3.11's wait_for can drop a cancel (cpython#86296); close() used to gather the
    # cancelled workers and would have waited here for the full 30 s.
    sender = WebhookSender(http, recorder, max_concurrency=1)
    swallowed = asyncio.Event()

    async def stubborn_post(*_args, **_kwargs):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.set()  # the first cancel is lost
        await asyncio.sleep(30)

    sender.post = stubborn_post
    sender.send_in_background(target("https://hooks.example/x"), {}, kind="status-update", call_sid="CA8")
    await asyncio.sleep(0)  # the worker starts
    async with asyncio.timeout(10):  # a bound, not a figure: the old close() hangs here
        await sender.close(0.05)
    assert swallowed.is_set()
    assert sender.stats()["workers"] == 0


# ------------------------------------------------------------------------------------------ schema


async def test_migration_0002_applies_on_top_of_0001(empty_db_dsn):
    first = load_migrations()[0]
    assert first.version == 1 and [m.version for m in load_migrations()][:2] == [1, 2]
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute(_SCHEMA_MIGRATIONS_DDL)
        await conn.execute(first.sql)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, $1)", first.name)
        await conn.execute("INSERT INTO calls (call_sid, status) VALUES ('CA0', 'completed')")
        await conn.execute("INSERT INTO numbers (number, assistant_id) VALUES ('+14155550100', 'a1')")
        applied = await migrate(conn)
        assert applied[0] == 2
        row = await conn.fetchrow("SELECT status, summary, analysis, transfer FROM calls WHERE call_sid = 'CA0'")
        assert tuple(row) == ("completed", None, None, None)
        assert await conn.fetchval("SELECT server_url FROM numbers") is None
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO webhook_deliveries (kind, url, attempt, status, at) "
                               "VALUES ('hang', 'http://x', 1, 'maybe', now())")
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'webhook_deliveries_call_sid_at_idx'") == 1
    finally:
        await conn.close()


async def test_table_specs_cover_0002(db_dsn, recorder):
    spec = TABLES["webhook_deliveries"]
    assert spec.op == "i" and spec.key == ("id",) and spec.choices["status"] == {"ok", "error", "timeout"}
    assert {"summary", "analysis", "transfer"} <= set(TABLES["calls"].columns)
    assert "server_url" in TABLES["numbers"].columns
    for s in (spec, TABLES["calls"], TABLES["numbers"]):
        cols = {r["column_name"]: r["data_type"] for r in await fetch(
            db_dsn, "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = $1", s.name)}
        assert set(cols) == set(s.columns) | set(s.managed), s.name
    with pytest.raises(ValueError, match="append-only"):
        recorder.upsert("webhook_deliveries", {"id": "00000000-0000-0000-0000-000000000001", "kind": "hang"})
    with pytest.raises(ValueError, match="webhook_deliveries.status"):
        recorder.insert("webhook_deliveries", {"kind": "hang", "url": "http://x", "attempt": 1, "status": "maybe"})
    analysis = {"summary": "Booked.", "structuredData": {"name": "Dana"}, "successEvaluation": "true"}
    recorder.upsert("calls", {"call_sid": "CA8", "summary": "Booked.", "analysis": analysis,
                              "transfer": {"type": "number", "number": "+14155550199"}})
    recorder.upsert("numbers", {"number": "+14155550100", "server_url": "https://example.com/vapi"})
    assert await recorder.drain(5)
    row = (await fetch(db_dsn, "SELECT summary, analysis, transfer FROM calls"))[0]
    assert row["summary"] == "Booked." and json.loads(row["analysis"]) == analysis
    assert json.loads(row["transfer"])["number"] == "+14155550199"
    assert (await fetch(db_dsn, "SELECT server_url FROM numbers"))[0][0] == "https://example.com/vapi"


# ------------------------------------------------------------------------------------------ analysis

TRANSCRIPT = ("AI: Thanks for calling Brightside Family Dental, this is Maya.\n"
              "User: Hi, I'd like to book a cleaning next Tuesday morning.\n"
              "AI: You're set for Tuesday at 8:30 AM. Anything else?\n"
              "User: No, thanks!\n")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "booked": {"type": "boolean"}}}


def scripted(body: dict) -> str:
    system = body["messages"][0]["content"]
    if "note-taker" in system:
        return "The caller booked a cleaning for Tuesday at 8:30 AM."
    if "data extractor" in system:
        return '{"name": null, "booked": true}' if body["response_format"]["type"] == "json_schema" else "{}"
    if "call evaluator" in system:
        return " True. "
    if "Custom" in system:
        return "custom: " + body["messages"][-1]["content"]
    return "?"


@pytest.fixture
async def openai_fake():
    async with FakeOpenAIText(api_key="sk-test", reply=scripted) as fake:
        yield fake


def _kw(fake, client, **kw):
    return dict(ended_reason="customer-ended-call", client=client, base_url=fake.base_url, api_key="sk-test",
                model="gpt-4.1-mini", **kw)


async def test_analysis_defaults_and_structured_data(openai_fake, http):
    plan = {"structuredDataPlan": {"enabled": True, "schema": SCHEMA}}
    out = await analyze(plan, TRANSCRIPT, system_prompt="You are Maya, book dental cleanings.",
                        **_kw(openai_fake, http))
    assert out == {"summary": "The caller booked a cleaning for Tuesday at 8:30 AM.",
                   "structuredData": {"name": None, "booked": True}, "successEvaluation": "true"}
    reqs = {r.system.split(".")[0]: r for r in openai_fake.requests}
    assert len(reqs) == 3 and all(r.authorized and r.status == 200 for r in openai_fake.requests)
    assert all(r.body["model"] == "gpt-4.1-mini" for r in openai_fake.requests)
    summary = reqs["You are an expert note-taker"].body
    assert summary["messages"][0] == DEFAULT_MESSAGES["summary"][0]
    assert TRANSCRIPT in summary["messages"][1]["content"] and "customer-ended-call" in summary["messages"][1]["content"]
    sd = reqs["You are an expert data extractor"].body
    assert json.dumps(SCHEMA, separators=(",", ":")) in sd["messages"][0]["content"]
    assert sd["response_format"] == {"type": "json_schema",
                                     "json_schema": {"name": "structured_data", "schema": SCHEMA, "strict": False}}
    se = reqs["You are an expert call evaluator"].body
    assert "Rubric:\nPassFail: A simple 'true' if call passed, 'false' if not." in se["messages"][0]["content"]
    assert "You are Maya, book dental cleanings." in se["messages"][2]["content"]
    assert not any("{{" in m["content"] for r in openai_fake.requests for m in r.body["messages"])


async def test_analysis_customer_messages_and_legacy_fields(openai_fake, http):
    plan = {
        "summaryPlan": {"messages": [{"role": "system", "content": "Custom summary ({{endedReason}})."},
                                     {"role": "user", "content": "T={{ transcript }}|{{unknown}}"}]},
        "successEvaluationPlan": {"enabled": False},
        "structuredDataPlan": {"enabled": True, "schema": {"type": "string"}},  # non-object root: wrapped
    }
    openai_fake.reply = lambda body: ('{"value": "Dana"}' if "data extractor" in body["messages"][0]["content"]
                                      else scripted(body))
    out = await analyze(plan, TRANSCRIPT, **_kw(openai_fake, http))
    assert out == {"summary": f"custom: T={TRANSCRIPT}|{{{{unknown}}}}".strip(), "structuredData": "Dana",
                   "successEvaluation": None}
    systems = sorted(r.system for r in openai_fake.requests)
    assert systems[0] == "Custom summary (customer-ended-call)." and len(systems) == 2
    sd = next(r.body for r in openai_fake.requests if "data extractor" in r.system)
    assert sd["response_format"]["json_schema"]["schema"] == {
        "type": "object", "properties": {"value": {"type": "string"}}, "required": ["value"]}
    # legacy flat fields: an empty summaryPrompt disables the summary (Vapi's documented switch)
    openai_fake.requests.clear()
    out = await analyze({"summaryPrompt": "", "successEvaluationRubric": "NumericScale"}, TRANSCRIPT,
                        **_kw(openai_fake, http))
    assert out == {"summary": None, "structuredData": None, "successEvaluation": "True."}
    assert len(openai_fake.requests) == 1 and "NumericScale: A scale of 1 to 10." in openai_fake.requests[0].system


async def test_analysis_slow_or_failing_part_is_none_alone(openai_fake, http):
    openai_fake.stall_next(5, when=lambda b: "data extractor" in b["messages"][0]["content"])
    openai_fake.fail_next(500, when=lambda b: "call evaluator" in b["messages"][0]["content"])
    plan = {"structuredDataPlan": {"enabled": True, "schema": SCHEMA, "timeoutSeconds": 1}}
    t0 = time.monotonic()
    with capture_logs() as logs:
        out = await analyze(plan, TRANSCRIPT, **_kw(openai_fake, http, timeout_s=3))
    assert time.monotonic() - t0 < 1.5
    assert out == {"summary": "The caller booked a cleaning for Tuesday at 8:30 AM.", "structuredData": None,
                   "successEvaluation": None}
    failed = {e["part"]: e["error"] for e in logs if e["event"] == "analysis.part_failed"}
    assert failed["structuredData"].startswith("timed out after 1 s") and failed["successEvaluation"].startswith("HTTP 500")
    # a wrong key fails every part without raising, and the key never reaches a log line
    with capture_logs() as logs:
        out = await analyze(None, TRANSCRIPT, **{**_kw(openai_fake, http), "api_key": "sk-wrong-999"})
    assert out == {"summary": None, "structuredData": None, "successEvaluation": None}
    assert "sk-wrong-999" not in json.dumps(logs, default=str)
    assert {r.status for r in openai_fake.requests[-2:]} == {401}


async def test_analysis_min_messages_threshold(openai_fake, http):
    assert count_messages(TRANSCRIPT) == 4 and count_messages("AI: hi\n\n  \n") == 1 and count_messages("") == 0
    nothing = {"summary": None, "structuredData": None, "successEvaluation": None}
    assert await analyze(None, "AI: Hello, how can I help?\n", **_kw(openai_fake, http)) == nothing
    assert await analyze({"minMessagesThreshold": 5}, TRANSCRIPT, **_kw(openai_fake, http)) == nothing
    assert await analyze(None, "", **_kw(openai_fake, http)) == nothing
    assert openai_fake.requests == []
    out = await analyze({"minMessagesThreshold": 4, "successEvaluationPlan": {"enabled": False}}, TRANSCRIPT,
                        **_kw(openai_fake, http))
    assert out["summary"] and len(openai_fake.requests) == 1
