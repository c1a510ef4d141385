"""Pull exported assistants (and the saved tools they reference) from the Vapi API.

This is the HTTP layer of `shim assistants pull ID…`:

* ``GET {base}/assistant/{id}`` with ``Authorization: Bearer <VAPI_API_KEY>``, then, for every id in
  the assistant's ``model.toolIds``, ``GET {base}/tool/{toolId}`` (https://docs.vapi.ai/api-reference/tools/get).
* Files land in SHIM_ASSISTANTS_DIR (``dest``)::

      dest/<assistantId>.json         the assistant, as GET /assistant/{id} returned it
      dest/tools/<toolId>.json        each saved tool, as GET /tool/{id} returned it

  ``dest/tools/<toolId>.json`` is where the shim's translator looks up ``model.toolIds`` (Vapi merges
  them after the inline ``model.tools``: ``[...inline, ...resolved]``).
* The files are faithful copies: the JSON is re-indented (2 spaces, UTF-8, trailing newline) but
  keys, key order and values are exactly what Vapi returned; nothing is translated or dropped.
  Tool readbacks can contain a tool's ``server.secret`` (Vapi returns it on read), so files are created 0600.
* Each file is written atomically (temp file in the same directory, fsync, ``os.replace``, fsync of
  the directory): a reader sees the old file or the new one, never a partial one.
* All-or-nothing per assistant: nothing is written for an assistant until the assistant and every
  tool in its ``model.toolIds`` were fetched and checked (a JSON object whose ``id`` is the requested
  id). A missing tool (404) fails that assistant, as Vapi fails the call. All of an assistant's
  files are staged (written + fsync'd as temp files) before any is renamed into place, tools first
  and the assistant file last, so an assistant file never points at tools that were not written.
* Other assistants of the same run are unaffected by one assistant's failure:
  `pull_assistants` writes every assistant it can and then, if any failed, raises `PullError`
  (a `VapiApiError`) whose ``results`` are the successes and ``failures`` maps each failed
  assistant id to its error. Exception: a rejected key (401/403) raises `VapiAuthError` at once and
  stops the run (nothing else can succeed with that key); assistants already written stay written.
* 429 and 5xx (and connection errors) are retried ``retries`` times (default 3, i.e. up to 4
  attempts) with exponential backoff, honouring ``Retry-After`` (seconds or HTTP date), each wait
  capped at ``max_retry_delay``. A timeout is not retried (the request may be slow rather than
  lost); it fails the assistant with a VapiApiError.
* At most ``concurrency`` requests (default 4) are in flight at once; assistants are pulled
  concurrently, and a tool shared by several assistants is fetched once per run.
* ``model.toolRefs`` (version-pinned tools) are not fetched: the result carries a warning.

Error messages name the request (method + path), the status and a short excerpt of the body, and
never contain the API key.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog

log = structlog.get_logger(__name__)

VAPI_BASE_URL = "https://api.vapi.ai"

# Same alphabet as shim.assistant.ASSISTANT_ID_RE (the loader), so every pulled file can be loaded.
# No "/" and no leading "." => the id cannot escape `dest` or name a hidden/temp file.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TOOLS_SUBDIR = "tools"

_EXCERPT_CHARS = 200


class VapiApiError(RuntimeError):
    """A request to the Vapi API failed (or its answer was unusable), or writing the result did.

    ``method``/``path``/``status`` describe the failed request when there is one (``status`` is
    None for transport errors and timeouts). The message never contains the API key."""

    def __init__(self, message: str, *, method: str | None = None, path: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.method, self.path, self.status = method, path, status


class VapiAuthError(VapiApiError):
    """401/403: the API key was rejected. Raised at once; the run stops."""


class InvalidIdError(VapiApiError, ValueError):
    """An assistant id given by the caller is not a plausible Vapi id (raised before any request)."""


class PullError(VapiApiError):
    """Some assistants could not be pulled. ``results`` are the ones that were written,
    ``failures`` maps each failed assistant id to its error (in request order)."""

    def __init__(self, results: list[PullResult], failures: dict[str, VapiApiError]):
        total = len(results) + len(failures)
        lines = [f"{len(failures)} of {total} assistant(s) not pulled:"]
        lines += [f"  {aid}: {err}" for aid, err in failures.items()]
        super().__init__("\n".join(lines))
        self.results, self.failures = results, failures


@dataclass
class PullResult:
    assistant_id: str
    path: Path
    tool_paths: list[Path]
    warnings: list[str] = field(default_factory=list)


async def pull_assistants(
    ids: list[str],
    *,
    api_key: str,
    dest: Path,
    base_url: str = VAPI_BASE_URL,
    client: httpx.AsyncClient | None = None,
    timeout: float = 20.0,
    concurrency: int = 4,
    retries: int = 3,
    backoff: float = 0.5,
    max_retry_delay: float = 10.0,
) -> list[PullResult]:
    """Fetch each assistant in ``ids`` and its ``model.toolIds`` tools into ``dest``.

    Returns one `PullResult` per assistant, in the order of ``ids`` (duplicates pulled once).
    Raises `InvalidIdError` (before any request) for malformed ids, `VapiApiError` if ``api_key``
    is empty, `VapiAuthError` if the key is rejected, and `PullError` (carrying the successes) if
    any assistant failed. ``client`` is used as is (not closed); ``timeout`` applies per request.
    """
    wanted = list(dict.fromkeys(ids))
    bad = [i for i in wanted if not isinstance(i, str) or not ID_RE.match(i)]
    if bad:
        raise InvalidIdError(
            "invalid assistant id(s) " + ", ".join(repr(b) for b in bad)
            + ": expected letters, digits, '.', '_' or '-' (not starting with '.', '_' or '-'; at most 128)"
        )
    if not api_key:
        raise VapiApiError("VAPI_API_KEY is not set")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if not wanted:
        return []

    owns_client = client is None
    if client is None:
        client = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"User-Agent": "shim-vapi-pull"},
        )
    puller = _Puller(client, api_key=api_key, dest=Path(dest), base_url=base_url.rstrip("/"),
                     timeout=timeout, concurrency=concurrency, retries=retries, backoff=backoff,
                     max_retry_delay=max_retry_delay)
    try:
        return await puller.run(wanted)
    finally:
        if owns_client:
            await client.aclose()


class _Puller:
    def __init__(self, client: httpx.AsyncClient, *, api_key: str, dest: Path, base_url: str,
                 timeout: float, concurrency: int, retries: int, backoff: float, max_retry_delay: float):
        self.client, self.api_key, self.dest, self.base_url = client, api_key, dest, base_url
        self.timeout, self.retries, self.backoff, self.max_retry_delay = timeout, retries, backoff, max_retry_delay
        self.sem = asyncio.Semaphore(concurrency)
        self.tool_tasks: dict[str, asyncio.Task[dict[str, Any] | VapiApiError]] = {}
        self.tg: asyncio.TaskGroup | None = None

    async def run(self, wanted: list[str]) -> list[PullResult]:
        outcomes: dict[str, PullResult | VapiApiError] = {}
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                for aid in wanted:
                    tg.create_task(self._pull_one(aid, outcomes))
        except BaseExceptionGroup as eg:
            auth = eg.subgroup(VapiAuthError)
            if auth is not None and len(auth.exceptions) == len(eg.exceptions):
                raise _first_leaf(auth) from None
            raise
        results = [o for aid in wanted if isinstance(o := outcomes[aid], PullResult)]
        failures = {aid: o for aid in wanted if isinstance(o := outcomes[aid], VapiApiError)}
        if failures:
            raise PullError(results, failures)
        return results

    async def _pull_one(self, aid: str, outcomes: dict[str, PullResult | VapiApiError]) -> None:
        try:
            outcomes[aid] = await self._pull_assistant(aid)
            log.info("vapi.pull.ok", assistant_id=aid, tools=len(outcomes[aid].tool_paths))
        except VapiAuthError:
            raise
        except VapiApiError as exc:
            log.warning("vapi.pull.failed", assistant_id=aid, error=str(exc))
            outcomes[aid] = exc

    async def _pull_assistant(self, aid: str) -> PullResult:
        assistant = await self._get_object("assistant", aid)
        tool_ids, warnings = _tool_ids(assistant)
        bad = [t for t in tool_ids if not ID_RE.match(t)]
        if bad:
            raise VapiApiError(f"model.toolIds has invalid id(s) {', '.join(map(repr, bad))}")
        tools: list[tuple[str, dict[str, Any]]] = []
        errors: list[str] = []
        fetched = await asyncio.gather(*(self._tool(t) for t in tool_ids))
        for tid, outcome in zip(tool_ids, fetched):
            if isinstance(outcome, VapiApiError):
                errors.append(str(outcome))
            else:
                tools.append((tid, outcome))
        if errors:
            raise VapiApiError("saved tool(s) in model.toolIds not fetched: " + "; ".join(errors))

        # Everything fetched: write tools first, the assistant file last.
        files = [(self.dest / TOOLS_SUBDIR / f"{tid}.json", body) for tid, body in tools]
        files.append((self.dest / f"{aid}.json", assistant))
        try:
            await asyncio.to_thread(_write_files_atomically, files)
        except OSError as exc:
            raise VapiApiError(f"fetched but not written: {exc}") from exc
        for w in warnings:
            log.warning("vapi.pull.warning", assistant_id=aid, warning=w)
        return PullResult(aid, files[-1][0], [p for p, _ in files[:-1]], warnings)

    def _tool(self, tool_id: str) -> asyncio.Task[dict[str, Any] | VapiApiError]:
        """The (shared) fetch of one saved tool; resolves to its body or to the error (only auth
        errors raise, which stops the whole run)."""
        task = self.tool_tasks.get(tool_id)
        if task is None:
            assert self.tg is not None

            async def fetch() -> dict[str, Any] | VapiApiError:
                try:
                    return await self._get_object("tool", tool_id)
                except VapiAuthError:
                    raise
                except VapiApiError as exc:
                    return exc

            task = self.tool_tasks[tool_id] = self.tg.create_task(fetch())
        return task

    async def _get_object(self, kind: str, oid: str) -> dict[str, Any]:
        path = f"/{kind}/{oid}"
        resp = await self._get(path)
        what = f"GET {path}"
        if resp.status_code == 404:
            raise VapiApiError(f"{what} -> 404: {kind} {oid} not found{self._excerpt(resp)}",
                               method="GET", path=path, status=404)
        if resp.status_code != 200:
            raise VapiApiError(f"{what} -> {resp.status_code} {resp.reason_phrase}{self._excerpt(resp)}",
                               method="GET", path=path, status=resp.status_code)
        try:
            body = json.loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise VapiApiError(f"{what} -> 200 but the body is not JSON{self._excerpt(resp)}",
                               method="GET", path=path, status=200) from None
        if not isinstance(body, dict):
            raise VapiApiError(f"{what} -> 200 but the body is a JSON {type(body).__name__}, not an object"
                               f"{self._excerpt(resp)}", method="GET", path=path, status=200)
        if body.get("id") != oid:
            raise VapiApiError(f"{what} -> 200 but its id is {self._redact(repr(body.get('id')))[:80]}, "
                               f"expected {oid!r}", method="GET", path=path, status=200)
        return body

    async def _get(self, path: str) -> httpx.Response:
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        attempt = 0
        while True:
            failure: str
            delay: float | None = None
            try:
                async with self.sem:
                    resp = await self.client.get(url, headers=headers, timeout=self.timeout)
            except httpx.TimeoutException:
                raise VapiApiError(f"GET {path} timed out after {self.timeout:g}s", method="GET", path=path) from None
            except httpx.TransportError as exc:
                failure = f"GET {path} failed: {type(exc).__name__}: {self._redact(str(exc))[:_EXCERPT_CHARS]}"
                status: int | None = None
            else:
                status = resp.status_code
                if status in (401, 403):
                    raise VapiAuthError(
                        f"VAPI_API_KEY rejected: GET {path} -> {status} {resp.reason_phrase}{self._excerpt(resp)}",
                        method="GET", path=path, status=status)
                if status != 429 and status < 500:
                    return resp
                failure = f"GET {path} -> {status} {resp.reason_phrase}{self._excerpt(resp)}"
                delay = _retry_after(resp.headers.get("Retry-After"))
            if attempt >= self.retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise VapiApiError(failure + tries, method="GET", path=path, status=status)
            delay = retry_delay(attempt, delay, self.backoff, self.max_retry_delay)
            attempt += 1
            log.info("vapi.retry", path=path, status=status, attempt=attempt, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _excerpt(self, resp: httpx.Response) -> str:
        try:
            text = resp.content[: _EXCERPT_CHARS * 4].decode("utf-8", "replace")
        except Exception:  # pragma: no cover - content is always bytes here
            return ""
        text = " ".join(self._redact(text).split())
        if not text:
            return ""
        if len(text) > _EXCERPT_CHARS:
            text = text[:_EXCERPT_CHARS] + "…"
        return f": {text}"


def _first_leaf(eg: BaseExceptionGroup) -> BaseException:
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _tool_ids(assistant: dict[str, Any]) -> tuple[list[str], list[str]]:
    """model.toolIds (deduplicated, in order) and warnings about tool references not pulled."""
    model = assistant.get("model")
    if model is None:
        return [], []
    if not isinstance(model, dict):
        raise VapiApiError(f"model is a {type(model).__name__}, expected an object")
    raw = model.get("toolIds")
    warnings = []
    if model.get("toolRefs"):
        warnings.append("model.toolRefs (version-pinned saved tools) are not pulled; "
                        "pull those tools or replace the refs with model.toolIds")
    if raw is None:
        return [], warnings
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise VapiApiError(f"model.toolIds is {json.dumps(raw)[:80]}, expected a list of ids")
    return list(dict.fromkeys(raw)), warnings


def retry_delay(attempt: int, retry_after: float | None, backoff: float, cap: float) -> float:
    """Seconds before retry number `attempt + 1`: the server's Retry-After when it gave one, else
    exponential backoff with jitter; never more than `cap`."""
    if retry_after is None:
        retry_after = backoff * (2 ** attempt) * (0.5 + random.random() / 2)
    return max(0.0, min(retry_after, cap))


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent/unparsable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _dumps(body: Any) -> bytes:
    try:
        return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (\ud800) only survive as escapes
        return (json.dumps(body, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_files_atomically(files: list[tuple[Path, Any]]) -> None:
    """Stage every file as an fsync'd temp file next to its target, then rename them into place in
    order. If staging fails, nothing is renamed and the temp files are removed."""
    staged: list[tuple[Path, Path]] = []
    try:
        for target, body in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            staged.append((Path(tmp), target))
            try:
                _write_all(fd, _dumps(body))
                os.fsync(fd)
            finally:
                os.close(fd)
        while staged:
            tmp, target = staged[0]
            os.replace(tmp, target)
            staged.pop(0)
    finally:
        for tmp, _ in staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    for directory in dict.fromkeys(target.parent for target, _ in files):
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
