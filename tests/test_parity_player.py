"""The parity player's turn taking (shim.parity.runner.play) against a scripted line: it waits for
the agent's greeting before the first turn, as a person would.

Regression: "nothing heard yet" counted as silence, so the first turn started the moment the line
opened. When the greeting then arrived after that turn (a slow call setup, e.g. 20 concurrent
runs on a busy machine), the player took the greeting for the answer and played the second turn
while the agent was still working on the first (a tool webhook in flight): the run lost its
second tool call.
"""

from __future__ import annotations

import asyncio

import pytest

from shim.parity import runner
from shim.parity.scenario import Scenario, Turn
from shim.twilio_peer import SILENCE

VOICE = bytes([0x00]) * 1600  # 200 ms of loud mu-law
SCENARIO = Scenario(name="one-turn", turns=(Turn("say", "Hello."),))


class ScriptedLine(runner.Line):
    """The agent: an optional greeting `greeting_after` s after the line opens, and a reply 50 ms
    after the caller's audio stops. Frames are paced at 20 ms like the real lines."""

    def __init__(self, greeting_after: float | None):
        self.loop = asyncio.get_running_loop()
        self.opened = self.loop.time()
        self._arrivals: list[tuple[float, int]] = []
        self.voice: list[float] = []  # when each voiced caller frame was sent
        self.greeting_at: float | None = None
        self.reply_at: float | None = None
        if greeting_after is not None:
            self.loop.call_later(greeting_after, self._greet)

    def _greet(self) -> None:
        self.greeting_at = self.loop.time()
        self._arrivals.append((self.greeting_at, 800))  # 100 ms of speech

    async def send_frame(self, frame: bytes) -> None:
        now = self.loop.time()
        if frame != bytes([SILENCE]) * len(frame):
            self.voice.append(now)
        elif self.voice and self.reply_at is None and now - self.voice[-1] >= 0.05:
            self.reply_at = now
            self._arrivals.append((now, 800))
        await asyncio.sleep(runner.FRAME_S)

    def arrivals(self) -> list[tuple[float, int]]:
        return self._arrivals

    @property
    def closed(self) -> bool:
        return False

    async def hang_up(self) -> None:
        pass


@pytest.fixture
def quick_player(monkeypatch):
    monkeypatch.setattr(runner, "SILENCE_S", 0.3)
    monkeypatch.setattr(runner, "MAX_WAIT_S", 5.0)


async def test_the_first_turn_waits_for_a_greeting_that_is_still_on_its_way(quick_player):
    line = ScriptedLine(greeting_after=0.25)  # arrives after a 200 ms turn started at once would have ended
    result = runner.RunResult()
    await runner.play(SCENARIO, {0: VOICE}, line, result)
    assert line.greeting_at is not None and line.voice, "the scripted agent did not run"
    greeting_end = line.greeting_at + 800 / 8000
    assert line.voice[0] >= greeting_end + runner.SILENCE_S - 0.02  # spoke after the greeting, not over it
    # the turn's latency is measured to the agent's reply, not to the greeting
    assert line.reply_at is not None and len(result.latencies) == 1
    assert result.latencies[0] == pytest.approx((line.reply_at - line.voice[-1] - runner.FRAME_S) * 1000, abs=30)
    assert result.turns_played == 1


async def test_without_a_greeting_the_caller_speaks_after_a_moment_of_silence(quick_player):
    line = ScriptedLine(greeting_after=None)  # an assistant that waits for the caller
    result = runner.RunResult()
    await runner.play(SCENARIO, {0: VOICE}, line, result)
    assert runner.SILENCE_S - 0.02 <= line.voice[0] - line.opened < runner.MAX_WAIT_S
    assert result.turns_played == 1 and len(result.latencies) == 1
