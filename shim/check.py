"""`shim check`: the start-up validation of `shim serve`, then reachability (Postgres, the model
endpoint's DNS and TLS, Twilio's REST base) and every assistant translated, without serving.

Exit 0 all good, 1 something unreachable or an assistant that does not translate, 2 the
configuration is invalid (then nothing else is tried)."""

from __future__ import annotations

import asyncio
import sys

import orjson

from .config import Config
from .validate import Probe, probe_assistants, probe_postgres, probe_tls


def _print(probe: Probe, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(probe.as_dict()).decode(), flush=True)
    else:
        timing = f" ({probe.ms:.0f} ms)" if probe.ms is not None else ""
        print(f"{'ok  ' if probe.ok else 'FAIL'}  {probe.name:<24} {probe.detail}{timing}", flush=True)


async def run_check(config: Config, *, media_port: int | None, offline: bool, as_json: bool) -> int:
    problems = config.problems(serving=True, media_port=media_port)
    for problem in problems:
        _print(Probe("configuration", False, problem), as_json)
    if problems:
        return 2
    _print(Probe("configuration", True, f"valid; Twilio reaches {config.http_url('/twilio/voice')}, media {config.media_stream_url}"), as_json)

    probes: list[Probe] = []
    probes.extend(await asyncio.to_thread(probe_assistants, config))
    if not offline:
        probes.append(await _probe_database(config))
        probes.extend(await asyncio.gather(
            probe_tls("openai realtime", config.openai_realtime_url),
            probe_tls("openai api", config.openai_base_url),
            probe_tls("twilio api", config.twilio_api_base),
        ))
    for probe in probes:
        _print(probe, as_json)
    failed = [p for p in probes if not p.ok]
    if not as_json:
        print(f"{len(failed)} of {len(probes) + 1} checks failed" if failed else "all checks passed",
              file=sys.stderr)
    return 1 if failed else 0


async def _probe_database(config: Config) -> Probe:
    if config.database_url:
        return await probe_postgres(config.database_url)
    from .db import resolve_dsn

    try:
        dsn, embedded = await asyncio.to_thread(resolve_dsn, "", config.data_dir)
    except Exception as exc:  # the embedded server failed to start: say why, in one line
        return Probe("postgres", False, f"embedded PostgreSQL in {config.data_dir} did not start: {type(exc).__name__}: {exc}")
    try:
        probe = await probe_postgres(dsn)
        probe.detail = f"embedded, {probe.detail}"
        return probe
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
