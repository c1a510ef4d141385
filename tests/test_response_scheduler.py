"""The response scheduler alone: one model response at a time, ours in order, every refusal and
race leading back to a state that sends the next request."""

from __future__ import annotations

import pytest

from shim.response_scheduler import TRANSITIONS, UNANSWERED_AFTER_S, RState, ResponseScheduler


class Model:
    def __init__(self):
        self.sent: list[tuple[str, str | None, str]] = []
        self.t = 0.0

    def send(self, request_id, instructions, purpose):
        self.sent.append((request_id, instructions, purpose))

    def clock(self):
        return self.t


def scheduler():
    model = Model()
    return ResponseScheduler(model.send, model.clock), model


def test_a_request_goes_out_at_once_when_idle_and_the_next_waits_for_done():
    s, model = scheduler()
    s.request("a", None, "reply")
    s.request("b", "Say hi", "tool-message")
    assert [r[0] for r in model.sent] == ["a"] and s.state is RState.REQUESTED and s.waiting == 1
    s.on_started("resp_a", "a")
    assert s.state is RState.ACTIVE and s.generating and s.active_id == "resp_a"
    s.on_done("resp_a")
    assert s.state is RState.IDLE
    s.pump()
    assert model.sent[-1] == ("b", "Say hi", "tool-message") and s.state is RState.REQUESTED


def test_the_model_starting_its_own_response_first_sends_ours_after_it():
    s, model = scheduler()
    s.request("a", None, "reply")
    s.on_started("resp_vad", None)  # the caller spoke: the server's own response
    assert s.state is RState.ACTIVE_REQUESTED
    assert s.on_refused("a", busy=True)  # ours was refused: a response was already active
    assert s.state is RState.ACTIVE and s.waiting == 1
    s.on_done("resp_vad")
    s.pump()
    assert [r[0] for r in model.sent] == ["a", "a"] and s.state is RState.REQUESTED


def test_any_other_refusal_drops_the_request_and_sends_the_next():
    s, model = scheduler()
    s.request("a", None, "reply")
    s.request("b", None, "reply")
    assert s.on_refused("a", busy=False)
    assert [r[0] for r in model.sent] == ["a", "b"]
    assert not s.on_refused("zzz", busy=False)  # not ours: nothing changes
    assert s.state is RState.REQUESTED


def test_a_request_never_answered_is_given_up():
    s, model = scheduler()
    s.request("a", None, "reply")
    s.request("b", None, "reply")
    assert not s.check_unanswered(UNANSWERED_AFTER_S)
    model.t = UNANSWERED_AFTER_S + 0.1
    assert s.check_unanswered(model.t)
    assert [r[0] for r in model.sent] == ["a", "b"]


def test_done_of_another_response_changes_nothing():
    s, model = scheduler()
    s.on_started("r1", None)
    s.on_done("r_old")
    assert s.state is RState.ACTIVE and s.active_id == "r1"


@pytest.mark.parametrize("state", list(RState))
def test_every_state_can_get_back_to_idle(state):
    # the table has no dead end: from each state a path of events leads back to IDLE
    seen, frontier = {state}, [state]
    while frontier:
        current = frontier.pop()
        for (src, _event), dst in TRANSITIONS.items():
            if src is current and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert RState.IDLE in seen
