"""How a call ends by itself: a goodbye that waits until the caller has heard everything queued
(bounded, so a lost mark cannot keep the line open), the maximum duration, and the silence
timeout. Pure: the call feeds it the time and what is playing, and acts on the step it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# A goodbye is waited for at most its remaining audio plus this, then the call hangs up anyway.
HANGUP_GRACE_S = 5.0
SECONDS_PER_SPOKEN_CHAR = 0.1  # a generous bound on how long a goodbye takes to say


@dataclass(slots=True)
class PendingEnd:
    """Hang up once everything queued at Twilio has been heard (bounded wait)."""

    reason: str
    deadline: float
    say_first: str = ""  # spoken (word for word) before hanging up
    awaiting_goodbye: bool = False  # its response is requested, not yet started
    next_action: dict[str, Any] | None = None  # e.g. a transfer's <Dial>
    # An end-call phrase only ends the call once heard: talking over it cancels the hang-up.
    # endCall, transfers and tool endings stand even if the caller talks over the goodbye.
    cancellable: bool = False


@dataclass(frozen=True, slots=True)
class SayGoodbye:
    text: str


@dataclass(frozen=True, slots=True)
class HangUp:
    reason: str
    next_action: dict[str, Any] | None = None


class EndPolicy:
    def __init__(self, now: float):
        self.pending: PendingEnd | None = None
        self._last_activity = now
        self._live_at: float | None = None
        self._max_duration_s = math.inf
        self._silence_timeout_s = math.inf

    def live(self, now: float, *, max_duration_s: float, silence_timeout_s: float) -> None:
        """The conversation started: maxDurationSeconds counts from here."""
        self._live_at = now
        self._max_duration_s, self._silence_timeout_s = max_duration_s, silence_timeout_s

    def activity(self, now: float) -> None:
        """The caller started or stopped speaking: the silence timer restarts."""
        self._last_activity = now

    def end_after_playback(self, reason: str, now: float, queued_until: float, *, say_first: str = "",
                           next_action: dict[str, Any] | None = None, cancellable: bool = False) -> bool:
        """Ask to end once what is queued at Twilio (until `queued_until`) has played, optionally
        after saying `say_first`. False if an end is already pending (the first one stands)."""
        if self.pending is not None:
            return False
        remaining = max(0.0, queued_until - now)
        self.pending = PendingEnd(reason, now + remaining + HANGUP_GRACE_S, say_first,
                                  next_action=next_action, cancellable=cancellable)
        return True

    def next_step(self, now: float, *, generating: bool, awaiting_marks: bool) -> SayGoodbye | HangUp | None:
        """What to do about a pending end now: say the goodbye, hang up, or wait."""
        pending = self.pending
        if pending is None or generating or pending.awaiting_goodbye:
            return None
        if pending.say_first:
            text, pending.say_first = pending.say_first, ""
            pending.awaiting_goodbye = True
            pending.deadline = now + len(text) * SECONDS_PER_SPOKEN_CHAR + HANGUP_GRACE_S
            return SayGoodbye(text)
        if not awaiting_marks or now >= pending.deadline:
            return HangUp(pending.reason, pending.next_action)
        return None

    def postpone(self, seconds: float) -> None:
        """The model was away this long (a reconnect): a pending end's deadline moves with it."""
        if self.pending is not None:
            self.pending.deadline += seconds

    def goodbye_started(self) -> None:
        if self.pending is not None:
            self.pending.awaiting_goodbye = False

    def caller_talked_over(self) -> None:
        """Barge-in: a cancellable goodbye (an end-call phrase) was not heard, so it does not end the call."""
        if self.pending is not None and self.pending.cancellable:
            self.pending = None

    def duration_exceeded(self, now: float) -> bool:
        return self._live_at is not None and now - self._live_at >= self._max_duration_s

    def due(self, now: float, *, assistant_busy: bool) -> HangUp | None:
        """The timers, checked on every tick: a pending end past its deadline, or silence."""
        if self.pending is not None:
            return HangUp(self.pending.reason, self.pending.next_action) if now >= self.pending.deadline else None
        if assistant_busy:
            self._last_activity = now  # the assistant is talking or about to
            return None
        if now - self._last_activity >= self._silence_timeout_s:
            return HangUp("silence-timed-out")
        return None
