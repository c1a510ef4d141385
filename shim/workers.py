"""`shim serve --workers N`: N worker processes, each the whole single-process server (front door,
picows media, uvicorn webhooks, its own Recorder, its own routes table), sharing the ports.

SO_REUSEPORT, not a pre-forked parent whose one listening socket the workers inherit:
* Linux gives each new connection to one listening socket of the group, by a hash of the
  connection's addresses and ports, and wakes only that worker. With one inherited socket, every
  worker's event loop wakes for each connection (asyncio's epoll has no EPOLLEXCLUSIVE) and the
  first to accept() wins, which spreads connections unevenly. A call is one long-lived
  connection pinned to the worker that accepted it, so the spread at accept is the spread of
  the whole call (https://lwn.net/Articles/542629/).
* Workers are fresh interpreters (`python -m shim.cli serve`), not forks of a parent holding a
  log thread, an event loop or pgserver state.
The parent binds every port first, with SO_REUSEPORT, and never listens on it: a busy port fails
the start at once as it does for one process, `--port 0` becomes one concrete port, and the
kernel sends this socket nothing (only listening sockets take connections). The price: the few
connections waiting in a worker's accept queue when it crashes are reset.

What must stay single is done once, here: the embedded PostgreSQL is started by the parent (its
DSN is handed to the workers as DATABASE_URL) and the schema migrated before any worker starts.
Each worker has a spool of its own (`store.spool_path`), kept by worker index across restarts.
Metrics: each worker writes its registry's text to the run directory every second; whichever
worker answers a scrape sums them (`metrics.WorkerMetrics`).

SIGTERM or SIGINT: every worker gets SIGTERM and drains as the single process does; the parent
exits 0 once all have exited 0 (1 if one failed, or had to be killed SHIM_DRAIN_TIMEOUT +
STOP_GRACE_S after the signal). A worker that dies otherwise is logged and restarted (after
0.5 s, doubling with each recent restart); more than MAX_RESTARTS in RESTART_WINDOW_S is a crash
loop: the parent stops the others and exits 1, for the platform to see.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from .config import Config

log = structlog.get_logger("shim.workers")

WORKER_ENV = "_SHIM_WORKER"  # set by the parent only: "<index>/<count>/<parent pid>/<run dir>"
RESTART_WINDOW_S = 60.0
MAX_RESTARTS = 5  # in RESTART_WINDOW_S, all workers together
RESTART_DELAY_S = 0.5  # doubled for each restart still in the window, at most RESTART_DELAY_MAX_S
RESTART_DELAY_MAX_S = 10.0
STOP_GRACE_S = 10.0  # beyond SHIM_DRAIN_TIMEOUT, before a worker that did not exit is killed
MIGRATE_TIMEOUT_S = 15.0
POLL_S = 0.1  # how soon a dead worker or a signal is noticed


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker this process is (set by the parent through WORKER_ENV)."""

    index: int
    count: int
    parent: int
    run_dir: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WorkerSlot | None:
        raw = (os.environ if env is None else env).get(WORKER_ENV, "")
        if not raw:
            return None
        index, count, parent, run_dir = raw.split("/", 3)
        return cls(int(index), int(count), int(parent), Path(run_dir))

    def encode(self) -> str:
        return f"{self.index}/{self.count}/{self.parent}/{self.run_dir}"


class LiveCalls:
    """Which CallSids have a live stream, across the workers: one file per call in the run
    directory, created with O_EXCL (the check Twilio's replayed or forged second `start` meets on
    whichever worker it lands). Touched at a stream's start and end only, never per frame."""

    _SID = re.compile(r"[A-Za-z0-9]{1,64}")

    def __init__(self, run_dir: Path, index: int):
        self.dir = run_dir / "live"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self._mine: set[str] = set()

    def claim(self, call_sid: str) -> bool:
        """False when another worker (or this one) already has a live stream for this CallSid."""
        if not self._SID.fullmatch(call_sid):
            return False  # not a CallSid: never a file name
        try:
            fd = os.open(self.dir / call_sid, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(self.index))
        self._mine.add(call_sid)
        return True

    def release(self, call_sid: str) -> None:
        if call_sid in self._mine:
            self._mine.discard(call_sid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / call_sid)


def release_worker_calls(run_dir: Path, index: int) -> None:
    """A worker exited: its calls ended with it, so its claims go (a new stream may start)."""
    for path in (run_dir / "live").glob("*"):
        with contextlib.suppress(OSError):
            if path.read_text() == str(index):
                path.unlink()


def die_with_parent(slot: WorkerSlot) -> None:
    """Linux: SIGTERM (a drain) to this worker when the parent dies, even by SIGKILL, so no orphan
    keeps serving the port. prctl(PR_SET_PDEATHSIG), https://man7.org/linux/man-pages/man2/prctl.2.html"""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != slot.parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """Bind (never listen) with SO_REUSEPORT: the port is ours, the workers join it."""
    from .errors import Failure

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Failure(f"{what} {port} on {host}: {exc.strerror or exc}") from None
    return sock


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def supervise(config: Config, host: str, port: int, media_port: int | None, count: int) -> int:
    """Run `count` workers until SIGTERM/SIGINT; the exit code of `shim serve`."""
    if not hasattr(socket, "SO_REUSEPORT"):
        from .errors import UserError

        raise UserError(f"--workers {count}: this platform has no SO_REUSEPORT; run with --workers 1")
    from .db import redact_dsn, resolve_dsn
    from .metrics import retire_snapshot

    reserved = [reserve_port(host, port, "--port")]
    port = reserved[0].getsockname()[1]
    if media_port:
        reserved.append(reserve_port(host, media_port, "--media-port"))
    if config.metrics_port:
        reserved.append(reserve_port(host, config.metrics_port, "SHIM_METRICS_PORT"))

    stop_signals: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stop_signals.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    env = dict(os.environ)
    env.pop(WORKER_ENV, None)
    if "SHIM_PREWARM" not in env:
        # A pre-warmed model session lives in the worker that answered /twilio/voice; the stream's
        # connection lands on any worker (the kernel picks), so it would be adopted 1 time in
        # `count` and the others left open until they expire. Off unless asked for.
        env["SHIM_PREWARM"] = "0"
        log.info("prewarm_off", workers=count, why="the stream lands on the webhook's worker 1 time in N")
    embedded = None
    run_dir = Path(tempfile.mkdtemp(prefix="shim-workers-"))
    procs: dict[int, subprocess.Popen | None] = {}
    restart_at: dict[int, float] = {}
    restarts: collections.deque[float] = collections.deque()
    command = [sys.executable, "-m", "shim.cli", "serve", "--workers", "1", "--host", host, "--port", str(port)]
    if media_port:
        command += ["--media-port", str(media_port)]

    def spawn(index: int) -> None:
        slot = WorkerSlot(index, count, os.getpid(), run_dir)
        proc = subprocess.Popen(command, env={**env, WORKER_ENV: slot.encode()}, stdin=subprocess.DEVNULL)
        procs[index] = proc
        log.info("worker_started", worker=index, pid=proc.pid)

    def signal_all(sig: int) -> None:
        for proc in procs.values():
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)

    code = 0
    stopping_since: float | None = None
    seen_signals = 0
    try:
        dsn, embedded = resolve_dsn(config.database_url, config.data_dir)  # the embedded server: once, here
        if embedded is not None:
            env["DATABASE_URL"] = dsn
        _migrate_once(dsn)
        log.info("workers_starting", workers=count, port=port, dsn=redact_dsn(dsn), run_dir=str(run_dir))
        for index in range(count):
            spawn(index)
        while True:
            now = time.monotonic()
            if len(stop_signals) > seen_signals:
                new, seen_signals = stop_signals[seen_signals:], len(stop_signals)
                if stopping_since is None:
                    stopping_since = now
                    restart_at.clear()
                    log.info("workers_stopping", signal=signal.Signals(new[0]).name,
                             workers=sum(p is not None for p in procs.values()))
                    signal_all(signal.SIGTERM)  # each worker drains as one process does
                    new = new[1:]
                if signal.SIGINT in new:  # a second Ctrl-C: as for one process, stop without waiting
                    signal_all(signal.SIGINT)
            for index, proc in list(procs.items()):
                if proc is None or proc.poll() is None:
                    continue
                procs[index] = None
                retire_snapshot(run_dir, index, proc.pid)
                release_worker_calls(run_dir, index)
                if stopping_since is not None:
                    log.info("worker_exited", worker=index, pid=proc.pid, exit=_exit_text(proc.returncode))
                    code = code or (1 if proc.returncode else 0)
                    continue
                restarts.append(now)
                while restarts and restarts[0] < now - RESTART_WINDOW_S:
                    restarts.popleft()
                if len(restarts) > MAX_RESTARTS:
                    log.error("workers_crash_loop", worker=index, pid=proc.pid, exit=_exit_text(proc.returncode),
                              restarts=len(restarts), window_s=RESTART_WINDOW_S)
                    code = 1
                    stop_signals.append(signal.SIGTERM)
                    continue
                delay = min(RESTART_DELAY_MAX_S, RESTART_DELAY_S * 2 ** (len(restarts) - 1))
                log.error("worker_died", worker=index, pid=proc.pid, exit=_exit_text(proc.returncode), restart_in_s=delay)
                restart_at[index] = now + delay
            for index, at in list(restart_at.items()):
                if at <= now:
                    del restart_at[index]
                    spawn(index)
            if stopping_since is not None:
                if all(proc is None for proc in procs.values()):
                    break
                if now > stopping_since + config.drain_timeout_s + STOP_GRACE_S:
                    log.error("workers_killed", workers=[i for i, p in procs.items() if p is not None],
                              after_s=round(now - stopping_since, 1))
                    signal_all(signal.SIGKILL)
                    code = 1
                    stopping_since = float("inf")  # wait for them, then leave (nothing is left to retire)
            time.sleep(POLL_S)
    finally:
        for proc in procs.values():  # an exception here: no worker outlives the parent
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for sock in reserved:
            sock.close()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("workers_stopped", exit=code)
    return code


def _migrate_once(dsn: str) -> None:
    """The schema, once, before any worker starts (the workers' own check then finds nothing to
    do; the migration's advisory lock would serialize them anyway). Postgres down: logged, and
    the workers' writers migrate when it is back."""
    import asyncpg

    from .store import migrate

    async def run() -> None:
        await asyncio.wait_for(migrate(dsn), MIGRATE_TIMEOUT_S)

    try:
        asyncio.run(run())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        log.error("database_unavailable_at_start", error=str(exc) or type(exc).__name__)


# --- the drain, across workers ----------------------------------------------------------------
# Twilio's callbacks for a call (/twilio/stream-ended, /twilio/status) reach whichever worker the
# kernel picks, not necessarily the one whose drain waits for them: each answer during a drain
# is appended to one file of the run directory, which every draining worker reads.

DRAIN_ANSWERS = "drain-answers"


def share_drain_answer(run_dir: Path, kind: str, call_sid: str) -> None:
    try:
        with open(run_dir / DRAIN_ANSWERS, "ab") as f:  # O_APPEND: one short line, written whole
            f.write(f"{kind} {call_sid}\n".encode())
    except OSError as exc:
        log.warning("drain_answer_not_shared", error=str(exc))


def read_drain_answers(run_dir: Path, stream_ended: set[str], status: set[str]) -> None:
    try:
        lines = (run_dir / DRAIN_ANSWERS).read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return
    for line in lines:
        kind, _, call_sid = line.partition(" ")
        (stream_ended if kind == "stream-ended" else status).add(call_sid)
