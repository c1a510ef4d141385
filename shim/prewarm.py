"""Pre-warmed model sessions, the pure part: which one a call may adopt, and how it is handed over.

Twilio asks `/twilio/voice`, then opens the media stream 100-300 ms after our TwiML; a fresh
call then spends several network round trips on the model (TCP, TLS, HTTP upgrade,
`session.created`, `session.update` -> `session.updated`) before it can ask for the greeting. The
shell (`shim/prewarm_io.py`) does that work from the signed voice webhook instead, and the call
adopts the session when its stream `start` is admitted.

* `Registry`: the sessions of one process, by CallSid. Bounded in count (the oldest is dropped)
  and in age (TTL from the webhook: a call that never streams must not keep a model session).
  Clock injected.
* `WarmSession`: one session before adoption. It runs the call's own backend class on the frames
  received (so `session.created` is answered with `session.update` exactly as a call would) and
  keeps those frames (bounded). `hand_over(call)` replays them into the call's backend in order,
  so the call ends in the state a fresh connect would have produced; the frames the call queues
  in answer that were already sent from here are not sent again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar

import orjson

from . import model_events as me

TTL_S = 12.0  # Twilio opens the stream within a second or two of our TwiML
CAP = 256  # sessions per process; past it the oldest is closed
MAX_FRAMES = 64  # model frames kept before adoption (the handshake is 2-3)
MAX_BYTES = 256 * 1024
OUTCOMES = ("adopted", "expired", "failed", "missed")  # shim_prewarm_total{outcome}

H = TypeVar("H")


@dataclass(slots=True)
class _Entry(Generic[H]):
    handle: H
    born: float


class Registry(Generic[H]):
    """Pre-warmed sessions by CallSid, oldest first. `add`, `expired` and `drain` return the
    handles the shell must close; `take` hands one out at most once."""

    def __init__(self, *, ttl_s: float = TTL_S, cap: int = CAP, clock: Callable[[], float] = time.monotonic):
        if cap < 1 or ttl_s <= 0:
            raise ValueError(f"cap={cap}, ttl_s={ttl_s}: expected cap >= 1 and ttl_s > 0")
        self.ttl_s, self.cap, self.clock = ttl_s, cap, clock
        self._entries: OrderedDict[str, _Entry[H]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, call_sid: str) -> bool:
        """A session `take` would hand out (present and within its TTL)."""
        entry = self._entries.get(call_sid)
        return entry is not None and self.clock() - entry.born < self.ttl_s

    def add(self, call_sid: str, handle: H) -> list[H]:
        """Register `handle`; returns what it displaces: an earlier one for the same CallSid
        (a repeated webhook) and, over the cap, the oldest."""
        dropped = []
        old = self._entries.pop(call_sid, None)
        if old is not None:
            dropped.append(old.handle)
        self._entries[call_sid] = _Entry(handle, self.clock())
        while len(self._entries) > self.cap:
            dropped.append(self._entries.popitem(last=False)[1].handle)
        return dropped

    def take(self, call_sid: str) -> H | None:
        """The session for this CallSid, removed; None when absent or past its TTL (an expired
        one stays for `expired()`, which closes it)."""
        entry = self._entries.get(call_sid)
        if entry is None or self.clock() - entry.born >= self.ttl_s:
            return None
        del self._entries[call_sid]
        return entry.handle

    def discard(self, call_sid: str, handle: H) -> bool:
        """Forget `handle` (it failed or closed before adoption); False if it is no longer here."""
        entry = self._entries.get(call_sid)
        if entry is None or entry.handle is not handle:
            return False
        del self._entries[call_sid]
        return True

    def expired(self) -> list[H]:
        """Remove and return the sessions past their TTL."""
        now, out = self.clock(), []
        while self._entries:
            call_sid, entry = next(iter(self._entries.items()))
            if now - entry.born < self.ttl_s:
                break
            del self._entries[call_sid]
            out.append(entry.handle)
        return out

    def next_expiry(self) -> float | None:
        """clock() at which the oldest session expires (None when empty)."""
        if not self._entries:
            return None
        return next(iter(self._entries.values())).born + self.ttl_s

    def drain(self) -> list[H]:
        out = [entry.handle for entry in self._entries.values()]
        self._entries.clear()
        return out


class Adopter(Protocol):
    """What `hand_over` needs of the call (shim.call.Call)."""

    backend: me.ModelBackend

    def on_model_text(self, text: str | bytes) -> None: ...
    def take_model_out(self) -> list[str]: ...


class WarmSession:
    """One model session opened ahead of its call (sans-I/O: frames in, frames to send out).

    `backend` is a fresh instance of the class the call will use, configured with the session
    the call's assistant translates to; it answers the handshake (`session.created` ->
    `session.update`). `problem` is set when the session can no longer be adopted."""

    def __init__(self, backend: me.ModelBackend, session: dict[str, Any], *,
                 max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES):
        self.backend = backend
        self.session = session
        self.frames: list[bytes] = []  # model frames received, in order, for the call
        self.ready = False  # the model acknowledged the session (SessionReady)
        self.problem: str | None = None
        self._max_frames, self._max_bytes, self._bytes = max_frames, max_bytes, 0
        backend.configure(session)
        # What this session sent: first the answer to `configure`, then per frame received.
        self._sent_first = self._drain()
        self._sent_per_frame: list[list[str]] = []
        self._outbox = list(self._sent_first)

    def _drain(self) -> list[str]:
        out = list(self.backend.out)
        self.backend.out.clear()
        return out

    def on_model_text(self, data: bytes) -> None:
        if self.problem is not None:
            return
        if len(self.frames) >= self._max_frames or self._bytes + len(data) > self._max_bytes:
            self.problem = f"more than {self._max_frames} frames / {self._max_bytes} bytes before the call adopted it"
            return
        self.frames.append(data)
        self._bytes += len(data)
        self.backend.feed(data, self)
        answer = self._drain()
        self._sent_per_frame.append(answer)
        self._outbox += answer

    def take_out(self) -> list[str]:
        """Frames to send on the socket now."""
        out, self._outbox = self._outbox, []
        return out

    # the backend's sink, before adoption: only whether the session came up matters here (the
    # call replays every frame and reacts to them itself)
    def on_model_audio(self, response_id: str, item_id: str, delta: str) -> None:
        pass

    def on_model_event(self, event: me.ModelEvent) -> None:
        if type(event) is me.SessionReady:
            self.ready = True

    def on_model_event_rejected(self, error: me.ModelProtocolError) -> None:
        pass

    def adoptable(self, call: Adopter) -> str | None:
        """Why `call` cannot adopt this session, or None. The session sent must be the one the
        call's own set-up produced (a template with `now` may render differently by then)."""
        if self.problem is not None:
            return self.problem
        if type(call.backend) is not type(self.backend):
            return f"the call's backend is {type(call.backend).__name__}, not {type(self.backend).__name__}"
        setup = getattr(call, "setup", None)
        if setup is None or setup.session != self.session:
            return "the call's session differs from the pre-warmed one"
        return None

    def hand_over(self, call: Adopter) -> tuple[list[str], bool]:
        """Replay the buffered frames into `call` in order, as a fresh connect would feed them.
        Returns (frames to send now, diverged): what the call queued minus what this session
        already sent in its place. Should the call's answers differ from ours (a bug: the
        backend is deterministic), nothing is skipped (`diverged`), so nothing is lost."""
        diverged = False

        def unsent(produced: list[str], sent: list[str]) -> list[str]:
            nonlocal diverged
            if not sent:
                return produced
            if [_without_id(f) for f in produced[:len(sent)]] != [_without_id(f) for f in sent]:
                diverged = True
                return produced
            return produced[len(sent):]

        send = unsent(call.take_model_out(), self._sent_first)
        for frame, sent in zip(self.frames, self._sent_per_frame):
            call.on_model_text(frame)
            send += unsent(call.take_model_out(), sent)
        return send, diverged


def _without_id(frame: str) -> Any:
    """A client event with its event id removed (ids come from each backend's own counter)."""
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return frame
    if isinstance(event, dict):
        event.pop("event_id", None)
    return event
