"""Response scheduling: only one model response may be active at a time (Realtime rejects a
second `response.create` with `conversation_already_has_active_response`), so our requests wait
in order here. Sans-I/O, with an explicit state table in the spirit of h11
(https://h11.readthedocs.io/en/latest/api.html#the-state-machine).

Two facts make the state: is a response active (ours or one the model started by itself when
the caller finished a turn), and is one of our requests in flight (sent, neither started nor
refused yet). Our requests carry an id the backend echoes on start and on refusal, so the
`ResponseStarted` that answers one is told apart from a response the model started itself.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Callable

# A request neither started nor refused after this long is given up (the queue moves on).
UNANSWERED_AFTER_S = 15.0


class RState(Enum):
    IDLE = "idle"  # nothing active, nothing in flight: a request is sent at once
    REQUESTED = "requested"  # our request is in flight
    ACTIVE = "active"  # a response is active; requests queue
    ACTIVE_REQUESTED = "active+requested"  # the model started its own response while ours was in flight


class Ev(Enum):
    SEND = "send"  # the head of the queue goes out
    STARTED_OURS = "started ours"  # the response answering our in-flight request started
    STARTED_OTHER = "started other"  # a response we did not ask for (or not this one) started
    REFUSED_BUSY = "refused busy"  # our request came while a response was active: retry later
    REFUSED = "refused"  # our request was refused for another reason: dropped
    UNANSWERED = "unanswered"  # our request was never answered: dropped
    DONE_ACTIVE = "done active"  # the active response finished
    DONE_OTHER = "done other"  # some other response finished (e.g. a cancelled one): no change
    LOST = "lost"  # the model session is gone: the active response with it; ours in flight is asked again


S, E = RState, Ev
TRANSITIONS: dict[tuple[RState, Ev], RState] = {
    (S.IDLE, E.SEND): S.REQUESTED,
    (S.IDLE, E.STARTED_OTHER): S.ACTIVE,
    (S.IDLE, E.DONE_OTHER): S.IDLE,
    (S.REQUESTED, E.STARTED_OURS): S.ACTIVE,
    (S.REQUESTED, E.STARTED_OTHER): S.ACTIVE_REQUESTED,
    (S.REQUESTED, E.REFUSED_BUSY): S.IDLE,  # back to the head of the queue; sent when the next response is done
    (S.REQUESTED, E.REFUSED): S.IDLE,
    (S.REQUESTED, E.UNANSWERED): S.IDLE,
    (S.REQUESTED, E.DONE_OTHER): S.REQUESTED,
    (S.ACTIVE, E.STARTED_OTHER): S.ACTIVE,  # a newer response replaces the one we knew of
    (S.ACTIVE, E.DONE_ACTIVE): S.IDLE,
    (S.ACTIVE, E.DONE_OTHER): S.ACTIVE,
    (S.ACTIVE_REQUESTED, E.STARTED_OURS): S.ACTIVE,
    (S.ACTIVE_REQUESTED, E.STARTED_OTHER): S.ACTIVE_REQUESTED,
    (S.ACTIVE_REQUESTED, E.REFUSED_BUSY): S.ACTIVE,
    (S.ACTIVE_REQUESTED, E.REFUSED): S.ACTIVE,
    (S.ACTIVE_REQUESTED, E.UNANSWERED): S.ACTIVE,
    (S.ACTIVE_REQUESTED, E.DONE_ACTIVE): S.REQUESTED,
    (S.ACTIVE_REQUESTED, E.DONE_OTHER): S.ACTIVE_REQUESTED,
    (S.IDLE, E.LOST): S.IDLE,
    (S.REQUESTED, E.LOST): S.IDLE,
    (S.ACTIVE, E.LOST): S.IDLE,
    (S.ACTIVE_REQUESTED, E.LOST): S.IDLE,
}

Request = tuple[str, "str | None", str]  # (request_id, instructions, purpose)


class ResponseScheduler:
    """`send(request_id, instructions, purpose)` is called when a request may go to the model."""

    def __init__(self, send: Callable[[str, str | None, str], None], clock: Callable[[], float]):
        self._send = send
        self._clock = clock
        self.state = RState.IDLE
        self.active_id: str | None = None  # the response being generated, if any
        self._queue: deque[Request] = deque()
        self._in_flight: Request | None = None
        self._in_flight_since = 0.0
        self.paused = False  # no model session to send to (a reconnect is in progress)

    def _go(self, event: Ev) -> None:
        self.state = TRANSITIONS[(self.state, event)]  # a KeyError here is a bug in this module

    @property
    def generating(self) -> bool:
        return self.active_id is not None

    @property
    def waiting(self) -> int:
        """Requests queued behind the active/in-flight one."""
        return len(self._queue)

    def request(self, request_id: str, instructions: str | None, purpose: str) -> None:
        self._queue.append((request_id, instructions, purpose))
        self.pump()

    def request_first(self, request_id: str, instructions: str | None, purpose: str) -> None:
        """A request that goes before those waiting (e.g. continuing an answer a lost session cut off)."""
        self._queue.appendleft((request_id, instructions, purpose))
        self.pump()

    def pump(self) -> None:
        """Send the head of the queue if nothing is active or in flight."""
        if self._queue and self.state is RState.IDLE and not self.paused:
            request = self._queue.popleft()
            self._in_flight, self._in_flight_since = request, self._clock()
            self._go(Ev.SEND)
            self._send(*request)

    def on_started(self, response_id: str, request_id: str | None) -> None:
        ours = self._in_flight is not None and request_id == self._in_flight[0]
        self.active_id = response_id
        if ours:
            self._in_flight = None
        self._go(Ev.STARTED_OURS if ours else Ev.STARTED_OTHER)

    def on_done(self, response_id: str) -> None:
        if response_id == self.active_id:
            self.active_id = None
            self._go(Ev.DONE_ACTIVE)
        else:
            self._go(Ev.DONE_OTHER)

    def on_refused(self, request_id: str | None, busy: bool) -> bool:
        """An error naming a request: True if it was our in-flight one (handled here)."""
        request = self._in_flight
        if request is None or request_id != request[0]:
            return False
        self._in_flight = None
        if busy:
            # The model started a response of its own (the caller spoke) just before ours:
            # ours goes back to the front of the queue and is sent after that one.
            self._queue.appendleft(request)
            self._go(Ev.REFUSED_BUSY)
        else:  # any other refusal: drop that request, never block the ones behind it
            self._go(Ev.REFUSED)
            self.pump()
        return True

    def lost(self) -> str | None:
        """The model session is gone: the active response (returned) went with it; a request in
        flight goes back to the head of the queue; nothing is sent until `resume`."""
        dropped, self.active_id = self.active_id, None
        if self._in_flight is not None:
            self._queue.appendleft(self._in_flight)
            self._in_flight = None
        self._go(Ev.LOST)
        self.paused = True
        return dropped

    def resume(self) -> None:
        """A new session is ready: the queued requests go out, in order."""
        self.paused = False
        self.pump()

    @property
    def idle(self) -> bool:
        """Nothing active, in flight or waiting."""
        return self.state is RState.IDLE and not self._queue

    def check_unanswered(self, now: float) -> bool:
        """Give up a request neither started nor refused for too long; True if one was."""
        if self._in_flight is None or now - self._in_flight_since <= UNANSWERED_AFTER_S:
            return False
        self._in_flight = None
        self._go(Ev.UNANSWERED)
        self.pump()
        return True
