"""The end policy alone: goodbyes that wait for playback (bounded), max duration, silence."""

from __future__ import annotations

from shim.end_policy import HANGUP_GRACE_S, EndPolicy, HangUp, SayGoodbye


def test_a_goodbye_is_said_then_the_call_hangs_up_once_it_was_heard():
    end = EndPolicy(now=0.0)
    assert end.end_after_playback("assistant-ended-call", 10.0, queued_until=12.0, say_first="Bye!")
    assert not end.end_after_playback("silence-timed-out", 10.0, queued_until=12.0)  # the first end stands
    assert end.next_step(10.0, generating=True, awaiting_marks=True) is None  # a response is still on
    assert end.next_step(10.0, generating=False, awaiting_marks=True) == SayGoodbye("Bye!")
    assert end.next_step(10.1, generating=False, awaiting_marks=True) is None  # its response not started yet
    end.goodbye_started()
    assert end.next_step(11.0, generating=False, awaiting_marks=True) is None  # still playing
    assert end.next_step(11.5, generating=False, awaiting_marks=False) == HangUp("assistant-ended-call")


def test_a_lost_mark_cannot_keep_the_line_open():
    end = EndPolicy(now=0.0)
    end.end_after_playback("assistant-forwarded-call", 10.0, queued_until=11.0, next_action={"verb": "dial"})
    deadline = 11.0 + HANGUP_GRACE_S
    assert end.due(deadline - 0.01, assistant_busy=True) is None
    assert end.due(deadline, assistant_busy=True) == HangUp("assistant-forwarded-call", {"verb": "dial"})


def test_talking_over_an_end_call_phrase_cancels_it_but_not_an_end_call_tool():
    phrase = EndPolicy(now=0.0)
    phrase.end_after_playback("assistant-said-end-call-phrase", 1.0, 2.0, cancellable=True)
    phrase.caller_talked_over()
    assert phrase.pending is None
    tool = EndPolicy(now=0.0)
    tool.end_after_playback("assistant-ended-call", 1.0, 2.0)
    tool.caller_talked_over()
    assert tool.pending is not None


def test_max_duration_counts_from_live_and_silence_from_the_last_activity():
    end = EndPolicy(now=0.0)
    assert not end.duration_exceeded(10_000.0)  # not live yet
    end.live(5.0, max_duration_s=600, silence_timeout_s=30)
    assert not end.duration_exceeded(604.9) and end.duration_exceeded(605.0)
    end.activity(20.0)
    assert end.due(49.9, assistant_busy=False) is None
    assert end.due(45.0, assistant_busy=True) is None  # the assistant talking is activity too
    assert end.due(74.9, assistant_busy=False) is None
    assert end.due(75.0, assistant_busy=False) == HangUp("silence-timed-out")
