"""When a call's model connection is opened again (sans-I/O: the clock and randomness are passed in).

Two reasons to open a new model session in the middle of a call:
- the socket was lost (a close the API's own SDK would reconnect on, a reset, no pong, a model
  silent mid-answer, `session_expired`): try again at once, then with a short backoff, within a
  bounded window and a bounded number of attempts; beyond them the caller hears the apology;
- the session is about to reach its time limit (OpenAI: 60 minutes, announced in the session's
  `expires_at`): roll over to a fresh session at a pause in the conversation, before the cap.

The call carries the conversation over (the backend re-sends it); this module only decides
when. Closes worth a reconnect are those of the openai SDK's own policy:
https://github.com/openai/openai-python/blob/main/src/openai/types/websocket_reconnection.py
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

RECOVERABLE_CLOSES = frozenset({1001, 1005, 1006, 1011, 1012, 1013, 1015})
# Connect attempts after a loss: the first at once (a new session must be open within 1.5 s),
# then backing off (with jitter, so many calls losing the model together do not retry in step).
RETRY_DELAYS_S = (0.0, 0.25, 0.5, 1.0, 2.0, 2.0)
ATTEMPT_TIMEOUT_S = 2.5  # one reconnect handshake: a black-holed attempt must not eat the window
RECONNECT_WINDOW_S = 8.0  # from the loss to a ready session; beyond it the caller hears the apology
# A model that keeps failing (dropping soon after each reconnect, or going silent each time) is
# not a line worth holding: this many losses within LOSS_WINDOW_S and the caller hears the apology.
MAX_LOSSES = 3
LOSS_WINDOW_S = 300.0
RECOVERY_LINE_AFTER_S = 2.0  # a gap this long is acknowledged to the caller
DEFAULT_SESSION_S = 3600.0  # when the backend does not say when its session ends
MIN_SESSION_S = 5.0
ROLLOVER_LEAD_S = 300.0  # look for a pause this long before the session's end...
ROLLOVER_FORCE_S = 15.0  # ...and roll over regardless this close to it


@dataclass(frozen=True, slots=True)
class Reconnect:
    delay_s: float
    attempt: int  # 1-based, within this outage


@dataclass(frozen=True, slots=True)
class GiveUp:
    why: str


class ModelLink:
    """The model connection's recovery state for one call."""

    __slots__ = ("lost_at", "attempt", "losses", "cause", "deadline", "_lead_s", "_force_s", "_rng")

    def __init__(self, rng: random.Random | None = None):
        self.lost_at: float | None = None  # an outage (or a rollover) is in progress since
        self.attempt = 0
        self.losses: deque[float] = deque(maxlen=MAX_LOSSES)  # when the recent losses began
        self.cause = ""
        self.deadline: float | None = None  # clock() at which the current session ends by itself
        self._lead_s = ROLLOVER_LEAD_S
        self._force_s = ROLLOVER_FORCE_S
        self._rng = rng or random.Random()

    @property
    def outage(self) -> bool:
        return self.lost_at is not None

    @staticmethod
    def recoverable_close(code: int | None) -> bool:
        """A close without a code (reset, no pong) or one the SDK reconnects on."""
        return code is None or code in RECOVERABLE_CLOSES

    def lost(self, now: float, cause: str, *, recoverable: bool = True) -> Reconnect | GiveUp:
        """The socket is gone (or unusable): try again, or give up."""
        if not recoverable:
            return GiveUp(cause)
        if self.lost_at is None:
            self.losses.append(now)
            if len(self.losses) == MAX_LOSSES and now - self.losses[0] <= LOSS_WINDOW_S:
                return GiveUp(f"{cause} (the model was lost {MAX_LOSSES} times in {LOSS_WINDOW_S:g} s)")
            self.lost_at, self.attempt, self.cause = now, 0, cause
        return self._next(now, cause)

    def connect_failed(self, now: float, status: int | None, detail: str) -> Reconnect | GiveUp:
        if status in (401, 403):  # credentials: another attempt cannot succeed
            return GiveUp(f"HTTP {status}")
        return self._next(now, detail)

    def _next(self, now: float, cause: str) -> Reconnect | GiveUp:
        assert self.lost_at is not None
        self.attempt += 1
        if self.attempt > len(RETRY_DELAYS_S):
            return GiveUp(f"{cause} (after {len(RETRY_DELAYS_S)} attempts)")
        delay = RETRY_DELAYS_S[self.attempt - 1] * self._rng.uniform(0.5, 1.0)
        if now + delay - self.lost_at > RECONNECT_WINDOW_S:
            return GiveUp(f"{cause} (no session within {RECONNECT_WINDOW_S:g} s)")
        return Reconnect(delay, self.attempt)

    def overdue(self, now: float) -> bool:
        """An outage that has outlived its window (e.g. a socket that opened but never became a
        ready session)."""
        return self.lost_at is not None and now - self.lost_at > RECONNECT_WINDOW_S

    def rolling_over(self, now: float) -> None:
        """A rollover starts (not a loss: not counted against the call's losses)."""
        self.lost_at, self.attempt, self.cause = now, 0, "rollover"

    def session_ready(self, now: float, lifetime_s: float | None) -> float | None:
        """A session is ready; returns the length of the gap if one was being recovered."""
        lifetime = lifetime_s if lifetime_s is not None and lifetime_s > 0 else DEFAULT_SESSION_S
        lifetime = max(lifetime, MIN_SESSION_S)  # a skewed clock must not turn into a rollover loop
        self.deadline = now + lifetime
        # Short sessions (a stand-in's, or a provider's) scale the lead times down.
        self._lead_s = min(ROLLOVER_LEAD_S, lifetime / 4)
        self._force_s = min(ROLLOVER_FORCE_S, lifetime / 10)
        gap = None if self.lost_at is None else now - self.lost_at
        self.lost_at, self.attempt = None, 0
        return gap

    def rollover_due(self, now: float, at_pause: bool) -> bool:
        """Time for a fresh session: at a pause once the session nears its end, or regardless
        just before it."""
        if self.deadline is None or self.lost_at is not None:
            return False
        if now >= self.deadline - self._force_s:
            return True
        return at_pause and now >= self.deadline - self._lead_s
