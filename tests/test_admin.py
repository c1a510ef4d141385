"""The call browser (/admin): the real app (create_app, lifespan, Postgres) through Starlette's
TestClient, pages read with an HTML parser (tests/html_tree.py; no headless browser can be
installed from PyPI here: Playwright's wheel installs but its browser download needs a CDN)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import asyncpg
import pytest
from starlette.testclient import TestClient

from shim import admin
from shim.app import create_app
from shim.config import Config
from shim.testing.fake_twilio_api import FakeTwilioApi
from tests.calls_seed import ACCOUNT, XSS, seed
from tests.html_tree import parse

ADMIN_TOKEN = "admin-token-0123456789abcdef"
TWILIO_TOKEN = "twilio-token-for-tests"
HTML = {"accept": "text/html,application/xhtml+xml"}
BEARER = {"authorization": f"Bearer {ADMIN_TOKEN}"}


class Browser:
    """TestClient calls run in a worker thread, so the test's loop keeps serving the Twilio stand-in."""

    def __init__(self, client: TestClient):
        self.client = client

    async def get(self, url, **kw):
        return await asyncio.to_thread(self.client.get, url, follow_redirects=False, **kw)

    async def post(self, url, **kw):
        return await asyncio.to_thread(self.client.post, url, follow_redirects=False, **kw)


@pytest.fixture
async def twilio():
    async with FakeTwilioApi(ACCOUNT, TWILIO_TOKEN) as api:
        yield api


def _config(db_dsn, tmp_path, twilio, **kw) -> Config:
    return Config(database_url=db_dsn, data_dir=tmp_path / "data", public_url="https://shim.example.com",
                  twilio_account_sid=ACCOUNT, twilio_auth_token=kw.pop("twilio_auth_token", TWILIO_TOKEN),
                  twilio_api_base=twilio.url, assistants_dir=tmp_path, **kw)


@pytest.fixture
async def site(monkeypatch, db_dsn, tmp_path, twilio):
    monkeypatch.setenv("SHIM_ADMIN_TOKEN", ADMIN_TOKEN)
    sid = twilio.add_recording("CA" + "1" * 32, seconds=0.5)
    seeded = await seed(db_dsn, tmp_path, recording_sid=sid)
    app = create_app(_config(db_dsn, tmp_path, twilio))
    client = TestClient(app, base_url="https://testserver")
    await asyncio.to_thread(client.__enter__)
    try:
        yield Browser(client), seeded
    finally:
        await asyncio.to_thread(client.__exit__, None, None, None)
        admin.register_parity_plots(admin.report_plots)


async def test_off_without_a_token(monkeypatch, db_dsn, tmp_path, twilio):
    monkeypatch.delenv("SHIM_ADMIN_TOKEN", raising=False)
    with TestClient(create_app(_config(db_dsn, tmp_path, twilio)), base_url="https://testserver") as client:
        for path in ("/admin/", "/admin/login", "/admin/calls/CA1"):
            response = await asyncio.to_thread(client.get, path, headers=BEARER)
            assert response.status_code == 404, path
        assert (await asyncio.to_thread(client.get, "/healthz")).status_code == 200


async def test_without_credentials_browsers_go_to_login_and_clients_get_401(site):
    browser, _ = site
    response = await browser.get("/admin/?assistant=luna", headers=HTML)
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/login?next=" + quote("/admin/?assistant=luna", safe="")
    response = await browser.get("/admin")
    assert response.status_code == 307 and response.headers["location"] == "/admin/"
    response = await browser.get("/admin/")
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    response = await browser.get("/admin/", headers={"authorization": "Bearer wrong-token"})
    assert response.status_code == 401
    response = await browser.get("/admin/", headers={"authorization": f"Basic {ADMIN_TOKEN}"})
    assert response.status_code == 401


async def test_login_sets_a_strict_httponly_session_cookie(site):
    browser, _ = site
    page = await browser.get("/admin/login?next=/admin/calls/CA1")
    assert page.status_code == 200
    assert parse(page.text).find("input", id=None, cls=None) is not None
    hidden = [n for n in parse(page.text).find_all("input") if n.attrs.get("name") == "next"][0]
    assert hidden.attrs["value"] == "/admin/calls/CA1"

    wrong = await browser.post("/admin/login", data={"token": "guess", "next": "/admin/"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert "That token is not right." in parse(wrong.text).find("p", cls="error").text

    ok = await browser.post("/admin/login", data={"token": ADMIN_TOKEN, "next": "/admin/calls/CA1"})
    assert ok.status_code == 303 and ok.headers["location"] == "/admin/calls/CA1"
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith("shim_admin=") and ADMIN_TOKEN not in cookie
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite", "path"} <= flags and "samesite=strict" in cookie.lower() and "path=/admin" in cookie.lower()
    # the client now holds the cookie: pages open without a header
    assert (await browser.get("/admin/", headers=HTML)).status_code == 200

    await browser.post("/admin/logout")
    assert (await browser.get("/admin/", headers=HTML)).status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/admin/", "/elsewhere", "/admin\\..\\x"])
async def test_login_never_redirects_off_the_admin_pages(site, target):
    browser, _ = site
    ok = await browser.post("/admin/login", data={"token": ADMIN_TOKEN, "next": target})
    assert ok.status_code == 303 and ok.headers["location"] == "/admin/"


async def test_forged_and_expired_sessions_are_refused(site):
    browser, _ = site
    browser.client.cookies.set("shim_admin", "9999999999.deadbeef", domain="testserver", path="/admin")
    assert (await browser.get("/admin/")).status_code == 401
    auth = admin.AdminAuth(ADMIN_TOKEN, secure_cookie=True, clock=lambda: 1_000_000.0)
    session = auth.new_session()
    assert auth.session_ok(session)
    assert not admin.AdminAuth("another-token-0123456789", secure_cookie=True, clock=lambda: 1_000_000.0).session_ok(session)
    auth.clock = lambda: 1_000_000.0 + admin.SESSION_SECONDS + 1
    assert not auth.session_ok(session)


async def test_calls_list_with_filters(site):
    browser, s = site
    page = await browser.get("/admin/", headers=BEARER)
    assert page.status_code == 200
    for header, value in admin.SECURITY_HEADERS.items():
        assert page.headers[header] == value
    assert "script-src" not in page.headers["content-security-policy"] and "default-src 'none'" in page.headers["content-security-policy"]
    doc = parse(page.text)
    rows = doc.find("table", id="calls").find("tbody").find_all("tr")
    assert [r.find_all("td")[1].text for r in rows] == [s.failed, s.xss, s.dental, s.old]
    dental = rows[2].find_all("td")
    assert [c.text for c in dental[2:10]] == ["+15550001111", "+15557654321", "dental", "1m23s", "6", "420 ms", "1/1", "customer-ended-call"]
    assert dental[1].find("a").attrs["href"] == f"/admin/calls/{s.dental}" and dental[10].text == "●"

    page = await browser.get("/admin/?assistant=luna&since=2026-11-30&ended_reason=pipeline-error-*", headers=BEARER)
    rows = parse(page.text).find("table", id="calls").find("tbody").find_all("tr")
    assert [r.find_all("td")[1].text for r in rows] == [s.failed]
    inputs = {n.attrs["name"]: n.attrs.get("value") for n in parse(page.text).find_all("input")}
    assert inputs["assistant"] == "luna" and inputs["ended_reason"] == "pipeline-error-*"

    page = await browser.get("/admin/?number=%2B19990000000", headers=BEARER)
    assert "No calls match." in parse(page.text).text


@pytest.mark.parametrize("query, message", [("since=yesterday", "--since 'yesterday'"), ("limit=abc", "--limit 'abc'")])
async def test_bad_filters_say_what_was_expected(site, query, message):
    browser, _ = site
    page = await browser.get(f"/admin/?{query}", headers=BEARER)
    assert page.status_code == 400 and message in parse(page.text).find("p", cls="error").text


async def test_call_page_shows_the_transcript_tools_and_latencies(site):
    browser, s = site
    page = await browser.get(f"/admin/calls/{s.dental}", headers=BEARER)
    assert page.status_code == 200
    turns = parse(page.text).find("div", id="transcript").find_all("div", cls="turn")
    kinds = [("tool" if "tool" in t.attrs["class"] else "event" if "event" in t.attrs["class"] else t.find("span", cls="who").text) for t in turns]
    assert kinds == ["assistant", "event", "user", "assistant", "event", "user", "tool", "assistant", "tool", "assistant"]
    interrupted = turns[3]
    assert "interrupted" in interrupted.attrs["class"].split()
    assert interrupted.find("span", cls="said").text == "On Saturdays we are open from nine in"
    assert interrupted.find("span", cls="full").text.endswith("until one in the afternoon.")
    assert "heard 1700 ms of 5200 ms" in interrupted.text and "latency 420 ms" in interrupted.text
    check = turns[6]
    assert check.find("code").text == "check_availability" and check.find("span", cls="outcome").text == "ok in 312 ms"
    assert check.find("pre", cls="arguments").text == '{"date":"2026-12-05"}'
    assert check.find("pre", cls="result").text == '{"slots": ["09:00", "10:30"]}'
    assert turns[8].find("span", cls="outcome").text == "timeout after 20000 ms"
    audio = parse(page.text).find("audio")
    assert audio.attrs["src"] == f"/admin/calls/{s.dental}/recording.mp3"


async def test_untrusted_text_is_escaped(site):
    browser, s = site
    page = await browser.get(f"/admin/calls/{s.xss}", headers=BEARER)
    doc = parse(page.text)
    assert not doc.find_all("script") and not [n for n in doc.iter() if any(k.startswith("on") for k in n.attrs)]
    assert [n for n in doc.find_all("img")] == []  # the injected <img onerror> stayed text
    text = doc.find("div", id="transcript").text
    assert text.count('<script>alert("x")</script>') >= 4  # caller, assistant said/full, tool args/result/error
    assert "&lt;script&gt;" in page.text


async def test_pages_carry_no_secrets(site):
    browser, s = site
    for path in ("/admin/", f"/admin/calls/{s.dental}", "/admin/login"):
        body = (await browser.get(path, headers=BEARER)).text
        for secret in (ADMIN_TOKEN, TWILIO_TOKEN, ACCOUNT + ":", "secret-stream-token"):
            assert secret not in body, (path, secret)


async def test_unknown_call_is_404(site):
    browser, _ = site
    page = await browser.get("/admin/calls/CA" + "9" * 32, headers=BEARER)
    assert page.status_code == 404 and "No call CA999" in parse(page.text).text


async def test_recording_is_proxied_with_ranges(site, twilio):
    browser, s = site
    full = await browser.get(f"/admin/calls/{s.dental}/recording.wav", headers=BEARER)
    assert full.status_code == 200 and full.content == twilio.media(s.recording_sid, "wav")
    assert full.headers["content-type"] == "audio/x-wav" and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-disposition"] == f'inline; filename="{s.dental}.wav"'
    part = await browser.get(f"/admin/calls/{s.dental}/recording.wav", headers=BEARER | {"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(full.content)}"
    mp3 = await browser.get(f"/admin/calls/{s.dental}/recording.mp3?download=1", headers=BEARER)
    assert mp3.status_code == 200 and mp3.headers["content-disposition"].startswith("attachment")
    # Twilio saw the account's Basic auth; the browser saw neither it nor Twilio's URL
    assert twilio.of(f"/Recordings/{s.recording_sid}.wav") and "authorization" not in {k.lower() for k in full.headers}


async def test_recording_errors(site, twilio):
    browser, s = site
    assert (await browser.get(f"/admin/calls/{s.failed}/recording.wav", headers=BEARER)).status_code == 404  # none made
    assert (await browser.get("/admin/calls/CA9/recording.wav", headers=BEARER)).status_code == 404
    assert (await browser.get(f"/admin/calls/{s.dental}/recording.ogg", headers=BEARER)).status_code == 404
    assert (await browser.get(f"/admin/calls/{s.dental}/recording.wav")).status_code == 401  # needs the token too
    twilio.fail_status = 500
    failed = await browser.get(f"/admin/calls/{s.dental}/recording.wav", headers=BEARER)
    assert failed.status_code == 502 and "Twilio answered HTTP 500" in failed.text and TWILIO_TOKEN not in failed.text


async def test_parity_section_appears_with_its_table(site, db_dsn):
    browser, _ = site
    # migration 0006 creates parity_runs; the section appears once a run is stored
    assert "Parity report" not in (await browser.get("/admin/", headers=BEARER)).text
    assert (await browser.get("/admin/parity", headers=BEARER)).status_code == 404

    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            """INSERT INTO parity_runs (run_id, batch_id, scenario, stack, status, tools, started_at)
               VALUES (gen_random_uuid(), gen_random_uuid(), $1, 'shim', 'ok', '{a}', now() - interval '1 day'),
                      (gen_random_uuid(), gen_random_uuid(), $1, 'vapi', 'ok', '{a}', now())""", XSS)
    finally:
        await conn.close()

    default = (await browser.get("/admin/parity", headers=BEARER)).text  # the report's own figures
    assert [i.attrs["alt"] for i in parse(default).find_all("img", cls="plot")] == [
        "Turn latency per scenario and stack", "Tool-order agreement per scenario"]

    async def plots(conn):
        n = await conn.fetchval("SELECT count(*) FROM parity_runs")
        return [admin.Plot(f"{n} runs", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>")]

    admin.register_parity_plots(plots)
    listing = parse((await browser.get("/admin/", headers=BEARER)).text)
    assert [a.attrs["href"] for a in listing.find_all("a") if a.text == "Parity report"] == ["/admin/parity"]
    page = await browser.get("/admin/parity", headers=BEARER)
    doc = parse(page.text)
    rows = doc.find("table", id="parity").find("tbody").find_all("tr")
    header = [c.text for c in doc.find("table", id="parity").find_all("th")]
    assert header[:4] == ["run_id", "batch_id", "scenario", "assistant_id"]
    assert rows[0].find_all("td")[header.index("scenario")].text == XSS and not doc.find_all("script")  # newest first, escaped
    img = doc.find("img", cls="plot")
    assert img.attrs["src"].startswith("data:image/svg+xml;base64,") and img.attrs["alt"] == "2 runs"


async def test_database_down_is_a_503_not_a_traceback(monkeypatch, tmp_path, twilio):
    monkeypatch.setenv("SHIM_ADMIN_TOKEN", ADMIN_TOKEN)
    app = create_app(_config("postgresql://shim:pw@127.0.0.1:1/shim", tmp_path, twilio))
    with TestClient(app, base_url="https://testserver") as client:
        page = await asyncio.to_thread(client.get, "/admin/", headers=BEARER)
    assert page.status_code == 503 and "database is unreachable" in page.text and "pw@" not in page.text


async def test_recording_without_twilio_credentials_is_503(monkeypatch, db_dsn, tmp_path, twilio):
    monkeypatch.setenv("SHIM_ADMIN_TOKEN", ADMIN_TOKEN)
    s = await seed(db_dsn, tmp_path)
    with TestClient(create_app(_config(db_dsn, tmp_path, twilio, twilio_auth_token="")), base_url="https://testserver") as client:
        page = await asyncio.to_thread(client.get, f"/admin/calls/{s.dental}/recording.wav", headers=BEARER)
    assert page.status_code == 503 and "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN must be set" in page.text
    assert not twilio.requests
