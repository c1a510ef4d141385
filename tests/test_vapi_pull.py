"""`shim assistants pull` HTTP layer (shim.vapi_api) against the local Vapi stand-in (real sockets)."""

from __future__ import annotations

import copy
import json
import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from shim import vapi_api
from shim.assistant import load_assistant
from shim.testing.fake_vapi import FakeVapi, FakeVapiValidationError
from shim.vapi_api import (
    InvalidIdError,
    PullError,
    PullResult,
    VapiApiError,
    VapiAuthError,
    pull_assistants,
)

FIXTURES = Path(os.environ.get("VAPI_FIXTURES_DIR", Path(__file__).parent / "fixtures" / "vapi"))
if not (FIXTURES / "luna_trattoria.tools.json").is_file():  # pragma: no cover
    pytest.skip(f"Vapi fixtures not found in {FIXTURES} (set VAPI_FIXTURES_DIR)", allow_module_level=True)

KEY = "sk-test-0123456789abcdef"
FAST = dict(backoff=0.01, max_retry_delay=0.05)  # keep retry waits tiny unless a test is about them


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text())


DENTAL = fixture("dental_receptionist.assistant.json")
LUNA = fixture("luna_trattoria.assistant.json")
MINIMAL = fixture("minimal.assistant.json")
LUNA_TOOLS = {t["id"]: t for t in fixture("luna_trattoria.tools.json")}


def ordered(body) -> str:
    """Key-order-sensitive canonical form."""
    return json.dumps(body, ensure_ascii=False)


def leftovers(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def variant(base: dict, new_id: str, **model_changes) -> dict:
    body = copy.deepcopy(base)
    body["id"] = new_id
    body["model"].update(model_changes)
    return body


@pytest.fixture
async def fake():
    f = FakeVapi({a["id"]: a for a in (DENTAL, LUNA, MINIMAL)}, LUNA_TOOLS, api_key=KEY)
    await f.start()
    try:
        yield f
    finally:
        await f.stop()


def test_luna_tool_ids_are_the_saved_tools():
    # The fixture pair is consistent: every toolId of the assistant is one saved tool, in order.
    assert LUNA["model"]["toolIds"] == list(LUNA_TOOLS)


async def test_pull_fixtures_writes_faithful_copies(fake, tmp_path):
    dest = tmp_path / "assistants"
    ids = [DENTAL["id"], LUNA["id"], MINIMAL["id"]]
    results = await pull_assistants(ids, api_key=KEY, dest=dest, base_url=fake.base_url)

    assert [r.assistant_id for r in results] == ids
    for body, result in zip((DENTAL, LUNA, MINIMAL), results):
        assert result.path == dest / f"{body['id']}.json"
        written = json.loads(result.path.read_text("utf-8"))
        assert ordered(written) == ordered(body)  # same keys, same order, same values
        assert result.path.read_text("utf-8").endswith("}\n")  # pretty-printed, newline-terminated
        assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
        assert load_assistant(dest, body["id"]) == body  # what the service will load
    assert results[0].tool_paths == [] and results[2].tool_paths == []

    luna = results[1]
    assert luna.tool_paths == [dest / "tools" / f"{tid}.json" for tid in LUNA["model"]["toolIds"]]
    for tid, path in zip(LUNA["model"]["toolIds"], luna.tool_paths):
        assert ordered(json.loads(path.read_text("utf-8"))) == ordered(LUNA_TOOLS[tid])
    # the legacy tool secret is kept verbatim (faithful copy), hence the 0600 files
    assert "luna-tools-shared-secret-EXAMPLE" in luna.tool_paths[1].read_text()

    assert sorted(os.listdir(dest)) == sorted([f"{i}.json" for i in ids] + ["tools"])
    assert leftovers(dest) == []
    assert all(r.authorized and r.method == "GET" for r in fake.requests)
    assert sorted(fake.paths()) == sorted([f"/assistant/{i}" for i in ids] + [f"/tool/{t}" for t in LUNA_TOOLS])


async def test_overwrites_existing_files(fake, tmp_path):
    (tmp_path / f"{MINIMAL['id']}.json").write_text('{"id": "stale"}')
    await pull_assistants([MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url)
    assert json.loads((tmp_path / f"{MINIMAL['id']}.json").read_text()) == MINIMAL
    assert leftovers(tmp_path) == []


async def test_sdk_false_negatives_are_served_and_pulled_verbatim(tmp_path):
    # Valid Vapi JSON that vapi-server-sdk 3.0.0 rejects (its models are stricter than the API).
    body = copy.deepcopy(DENTAL)
    body["id"] = "dental-extended"
    for tool in body["model"]["tools"]:
        if tool["type"] == "transferCall":
            for d in tool["destinations"]:
                d.setdefault("transferPlan", {})["sipVerb"] = "refer"
        if tool["type"] == "function":
            tool["server"]["backoffPlan"] = {"type": "exponential", "maxRetries": 2, "baseDelaySeconds": 1}
            props = tool["function"]["parameters"]["properties"]
            props["notes"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
            props["priority"] = {"type": "integer", "enum": [1, 2, 3]}
    async with FakeVapi({body["id"]: body}, api_key=KEY) as f:
        [result] = await pull_assistants([body["id"]], api_key=KEY, dest=tmp_path, base_url=f.base_url)
    assert ordered(json.loads(result.path.read_text())) == ordered(body)


def test_fake_rejects_bodies_vapi_would_not_return():
    broken = copy.deepcopy(MINIMAL)
    broken["model"]["messages"] = "not a list"
    with pytest.raises(FakeVapiValidationError, match=r"model\.AssistantModel_Openai\.messages"):
        FakeVapi({broken["id"]: broken})
    tool = copy.deepcopy(next(iter(LUNA_TOOLS.values())))
    tool["function"]["name"] = 42
    with pytest.raises(FakeVapiValidationError, match=r"function\.name"):
        FakeVapi(tools={tool["id"]: tool})
    with pytest.raises(FakeVapiValidationError, match="!= its id"):
        FakeVapi({"other-id": MINIMAL})


async def test_write_failure_midway_leaves_old_files_and_no_temp_files(fake, tmp_path, monkeypatch):
    luna_id = LUNA["id"]
    tools_dir = tmp_path / "tools"
    tools_dir.mkdir()
    old_assistant = tmp_path / f"{luna_id}.json"
    old_assistant.write_text('{"id": "old assistant"}')
    old_tool = tools_dir / f"{LUNA['model']['toolIds'][0]}.json"
    old_tool.write_text('{"id": "old tool"}')

    real_write_all = vapi_api._write_all
    calls = []

    def write_half_then_fail(fd, data):
        calls.append(len(data))
        if len(calls) == 5:  # the assistant file: staged last, after its 4 tools
            real_write_all(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(vapi_api, "_write_all", write_half_then_fail)
    with pytest.raises(PullError) as info:
        await pull_assistants([luna_id, MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url)
    err = info.value
    assert [r.assistant_id for r in err.results] == [MINIMAL["id"]]  # the other assistant still made it
    assert "No space left on device" in str(err.failures[luna_id])
    assert old_assistant.read_text() == '{"id": "old assistant"}'
    assert old_tool.read_text() == '{"id": "old tool"}'
    assert sorted(p.name for p in tools_dir.iterdir()) == [old_tool.name]  # no tool renamed into place
    assert leftovers(tmp_path) == []

    monkeypatch.setattr(vapi_api, "_write_all", real_write_all)
    await pull_assistants([luna_id], api_key=KEY, dest=tmp_path, base_url=fake.base_url)
    assert json.loads(old_assistant.read_text()) == LUNA
    assert json.loads(old_tool.read_text()) == LUNA_TOOLS[old_tool.stem]


async def test_rejected_key_is_a_clear_error_without_the_key(fake, tmp_path):
    wrong = "sk-WRONG-7f3a9c1e5d2b4a6f"
    with pytest.raises(VapiAuthError) as info:
        await pull_assistants([DENTAL["id"], LUNA["id"], MINIMAL["id"]], api_key=wrong, dest=tmp_path,
                              base_url=fake.base_url, **FAST)
    msg = str(info.value)
    assert msg.startswith("VAPI_API_KEY rejected: GET /assistant/")
    assert "401" in msg and info.value.status == 401
    assert wrong not in msg and KEY not in msg
    assert all(not r.authorized for r in fake.requests)
    assert len(fake.requests) <= 3  # no retries on 401
    assert not any(tmp_path.iterdir())

    fake.fail_next(f"/assistant/{MINIMAL['id']}", 403)
    with pytest.raises(VapiAuthError, match=r"VAPI_API_KEY rejected: GET /assistant/\S+ -> 403"):
        await pull_assistants([MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url)


async def test_key_echoed_in_an_error_body_is_redacted(fake, tmp_path):
    path = f"/assistant/{MINIMAL['id']}"
    fake.fail_next(path, 500, body={"message": f"bad header Bearer {KEY}"})
    with pytest.raises(PullError) as info:
        await pull_assistants([MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url,
                              retries=0, **FAST)
    assert KEY not in str(info.value) and "Bearer ***" in str(info.value)


async def test_missing_assistant_or_tool_fails_only_that_assistant(tmp_path):
    luna_tools = dict(LUNA_TOOLS)
    missing_tool = LUNA["model"]["toolIds"][2]
    del luna_tools[missing_tool]
    async with FakeVapi({a["id"]: a for a in (LUNA, MINIMAL)}, luna_tools, api_key=KEY) as f:
        with pytest.raises(PullError) as info:
            await pull_assistants([LUNA["id"], "ghost-assistant", MINIMAL["id"]], api_key=KEY,
                                  dest=tmp_path, base_url=f.base_url, **FAST)
        paths = f.paths()
    err = info.value
    assert [r.assistant_id for r in err.results] == [MINIMAL["id"]]
    assert list(err.failures) == [LUNA["id"], "ghost-assistant"]
    luna_err = str(err.failures[LUNA["id"]])
    assert f"GET /tool/{missing_tool} -> 404" in luna_err and "not found" in luna_err
    ghost = err.failures["ghost-assistant"]
    assert ghost.status == 404 and str(ghost).startswith("GET /assistant/ghost-assistant -> 404")
    assert "2 of 3 assistant(s) not pulled" in str(err)
    # all-or-nothing: the three tools that were found are not written either
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{MINIMAL['id']}.json"]
    assert paths.count(f"/tool/{missing_tool}") == 1  # 404 is not retried
    assert paths.count("/assistant/ghost-assistant") == 1


async def test_429_with_retry_after_then_success(fake, tmp_path):
    path = f"/assistant/{MINIMAL['id']}"
    fake.fail_next(path, 429, retry_after=1)
    t0 = time.monotonic()
    [result] = await pull_assistants([MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url,
                                     backoff=0.01, max_retry_delay=5)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.95  # waited as told, not the 10 ms backoff
    assert [r.status for r in fake.requests] == [429, 200]
    assert json.loads(result.path.read_text()) == MINIMAL


async def test_retry_after_is_capped(fake, tmp_path):
    path = f"/tool/{LUNA['model']['toolIds'][0]}"
    fake.fail_next(path, 503, times=2, retry_after=3600)
    t0 = time.monotonic()
    await pull_assistants([LUNA["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url,
                          backoff=0.01, max_retry_delay=0.1)
    assert time.monotonic() - t0 < 2
    assert fake.paths().count(path) == 3


async def test_5xx_until_retries_exhausted_is_an_error(fake, tmp_path):
    path = f"/assistant/{DENTAL['id']}"
    fake.fail_next(path, 503, times=10)
    with pytest.raises(PullError) as info:
        await pull_assistants([DENTAL["id"], MINIMAL["id"]], api_key=KEY, dest=tmp_path,
                              base_url=fake.base_url, **FAST)
    failure = info.value.failures[DENTAL["id"]]
    assert failure.status == 503 and failure.path == path
    assert "503 Service Unavailable" in str(failure) and "after 4 attempts" in str(failure)
    assert fake.paths().count(path) == 4  # 1 + retries=3
    assert [r.assistant_id for r in info.value.results] == [MINIMAL["id"]]
    assert not (tmp_path / f"{DENTAL['id']}.json").exists()


async def test_5xx_then_success(fake, tmp_path):
    path = f"/assistant/{DENTAL['id']}"
    fake.fail_next(path, 502, times=3)
    await pull_assistants([DENTAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url, **FAST)
    assert fake.paths().count(path) == 4


async def test_timeout_is_an_error(fake, tmp_path):
    fake.stall_next(f"/assistant/{MINIMAL['id']}", 0.5)
    with pytest.raises(PullError) as info:
        await pull_assistants([MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url,
                              timeout=0.1, **FAST)
    assert "timed out after 0.1s" in str(info.value.failures[MINIMAL["id"]])


async def test_unreachable_server_is_an_error(tmp_path):
    async with FakeVapi(api_key=KEY) as f:
        base_url = f.base_url
    with pytest.raises(PullError) as info:
        await pull_assistants(["abc"], api_key=KEY, dest=tmp_path, base_url=base_url, retries=1, **FAST)
    assert "GET /assistant/abc failed: ConnectError" in str(info.value)


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"id": "someone-else"}, "its id is 'someone-else'"),
        ([{"id": "x"}], "a JSON list, not an object"),
        (b"<html>oops</html>", "not JSON"),
    ],
)
async def test_unusable_responses_are_errors(fake, tmp_path, body, expected):
    fake.fail_next(f"/assistant/{MINIMAL['id']}", 200, body=body)
    with pytest.raises(PullError) as info:
        await pull_assistants([MINIMAL["id"]], api_key=KEY, dest=tmp_path, base_url=fake.base_url)
    assert expected in str(info.value.failures[MINIMAL["id"]])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", ".hidden", "", "-x", "a b", "x" * 129, "a\\b"])
async def test_invalid_ids_rejected_before_any_request(fake, tmp_path, bad):
    with pytest.raises(InvalidIdError) as info:
        await pull_assistants([MINIMAL["id"], bad], api_key=KEY, dest=tmp_path / "out", base_url=fake.base_url)
    assert isinstance(info.value, ValueError)
    assert fake.requests == []
    assert not (tmp_path / "out").exists()


async def test_invalid_tool_id_fails_that_assistant(tmp_path):
    evil = variant(MINIMAL, "evil", toolIds=["../../etc/passwd"])
    async with FakeVapi({"evil": evil}, api_key=KEY) as f:
        with pytest.raises(PullError, match="model.toolIds has invalid id"):
            await pull_assistants(["evil"], api_key=KEY, dest=tmp_path, base_url=f.base_url)
        assert f.paths() == ["/assistant/evil"]
    assert not any(tmp_path.iterdir())


async def test_missing_key_is_an_error_before_any_request(fake, tmp_path):
    with pytest.raises(VapiApiError, match="VAPI_API_KEY is not set"):
        await pull_assistants([MINIMAL["id"]], api_key="", dest=tmp_path, base_url=fake.base_url)
    assert fake.requests == []


async def test_concurrency_is_bounded_and_shared_tools_fetched_once(tmp_path):
    end_call = LUNA["model"]["toolIds"][3]
    bodies = [variant(MINIMAL, f"asst-{i}", toolIds=[end_call]) for i in range(8)]
    async with FakeVapi({b["id"]: b for b in bodies}, LUNA_TOOLS, api_key=KEY) as f:
        f.latency = 0.1
        t0 = time.monotonic()
        results = await pull_assistants([b["id"] for b in bodies], api_key=KEY, dest=tmp_path,
                                        base_url=f.base_url, concurrency=3)
        elapsed = time.monotonic() - t0
    assert [r.assistant_id for r in results] == [b["id"] for b in bodies]
    assert f.max_in_flight == 3
    assert f.paths().count(f"/tool/{end_call}") == 1
    assert len(f.requests) == 9
    assert elapsed < 9 * 0.1  # faster than one request at a time
    assert all(r.tool_paths == [tmp_path / "tools" / f"{end_call}.json"] for r in results)


async def test_duplicate_ids_pulled_once_and_caller_client_left_open(fake, tmp_path):
    async with httpx.AsyncClient() as client:
        results = await pull_assistants([MINIMAL["id"], MINIMAL["id"]], api_key=KEY, dest=tmp_path,
                                        base_url=fake.base_url + "/", client=client)
        assert not client.is_closed
    assert results == [PullResult(MINIMAL["id"], tmp_path / f"{MINIMAL['id']}.json", [])]
    assert fake.paths() == [f"/assistant/{MINIMAL['id']}"]


async def test_tool_refs_produce_a_warning(tmp_path):
    body = variant(MINIMAL, "with-refs", toolRefs=[{"toolId": "t1", "version": "3"}])
    async with FakeVapi({"with-refs": body}, api_key=KEY) as f:
        [result] = await pull_assistants(["with-refs"], api_key=KEY, dest=tmp_path, base_url=f.base_url)
    assert result.warnings and "toolRefs" in result.warnings[0]


def test_retry_after_parsing():
    assert vapi_api._retry_after("3") == 3.0
    assert vapi_api._retry_after(None) is None and vapi_api._retry_after("soon") is None
    from email.utils import formatdate

    assert 8 <= vapi_api._retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert vapi_api._retry_after(formatdate(time.time() - 10, usegmt=True)) == 0.0


async def test_cli_pulls_into_the_assistants_dir_and_the_shim_can_translate_them(tmp_path):
    """`shim assistants pull` end to end: the real CLI against the stand-in Vapi API, then
    `shim translate` on what it wrote (the saved tools are found in tools/)."""
    import asyncio
    import subprocess
    import sys

    async with FakeVapi({LUNA["id"]: LUNA, MINIMAL["id"]: MINIMAL}, LUNA_TOOLS, KEY) as fake:
        env = dict(os.environ, VAPI_API_KEY=KEY, VAPI_BASE_URL=fake.base_url, SHIM_ASSISTANTS_DIR=str(tmp_path))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shim.cli", "assistants", "pull", LUNA["id"], MINIMAL["id"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert KEY not in out.decode() + err.decode()
        env["VAPI_API_KEY"] = "sk-wrong"
        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shim.cli", "assistants", "pull", MINIMAL["id"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        _, bad_err = await bad.communicate()
        assert bad.returncode == 3 and b"VAPI_API_KEY rejected" in bad_err and b"sk-wrong" not in bad_err
    assert json.loads((tmp_path / f"{LUNA['id']}.json").read_text()) == LUNA
    translated = subprocess.run(
        [sys.executable, "-m", "shim.cli", "translate", str(tmp_path / f"{LUNA['id']}.json")],
        capture_output=True, text=True,
    )
    assert translated.returncode == 0, translated.stderr  # saved tools found in tools/
    assert len(json.loads(translated.stdout)["tools"]) == len(LUNA["model"]["toolIds"])
    (tmp_path / "tools" / f"{LUNA['model']['toolIds'][1]}.json").unlink()
    missing = subprocess.run(
        [sys.executable, "-m", "shim.cli", "translate", str(tmp_path / f"{LUNA['id']}.json")],
        capture_output=True, text=True,
    )
    assert missing.returncode == 2 and "model.toolIds[1]" in missing.stderr
