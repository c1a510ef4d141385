"""Playback tracking alone: marks, played bytes, where to cut, what to forget."""

from __future__ import annotations

import pytest

from shim.playback import AssistantItem, Playback


def item(item_id="i1", response_id="r1"):
    return AssistantItem(item_id=item_id, response_id=response_id, seq=1, greeting=False)


def test_marks_confirm_played_bytes_cumulatively_and_out_of_order_echoes_never_go_back():
    pb, it = Playback(), item()
    pb.add(it)
    names = [pb.sent(it, 800, now=0.0) for _ in range(3)]  # 3 x 100 ms
    assert it.sent_bytes == 2400 and pb.awaiting_marks
    assert pb.free_at == pytest.approx(0.3)  # Twilio's queue drains in real time
    pb.on_mark(names[1])
    assert it.played_bytes == 1600
    pb.on_mark(names[0])  # an older mark cannot lower what was heard
    assert it.played_bytes == 1600 and pb.playing() == [it]


def test_an_item_is_finished_once_generated_and_fully_heard():
    pb, it = Playback(), item()
    pb.add(it)
    name = pb.sent(it, 800, now=0.0)
    assert pb.response_done("r1") == []  # generated, not yet heard
    assert pb.on_mark(name) is it  # now heard too
    assert pb.forget(it) and not pb.forget(it) and pb.items == {}


def test_cut_truncates_at_what_was_heard_and_clear_forgets_pending_marks():
    pb, heard, unheard = Playback(), item("i1", "r1"), item("i2", "r2")
    pb.add(heard)
    pb.add(unheard)
    first = pb.sent(heard, 800, now=0.0)
    second = pb.sent(heard, 800, now=0.0)
    pb.sent(unheard, 800, now=0.0)
    pb.on_mark(first)
    pb.clear(now=0.05)
    assert not pb.awaiting_marks and pb.free_at == 0.05
    assert pb.on_mark(second) is None and heard.played_bytes == 800  # discarded audio is not "played"
    cuts = pb.cut(generating_response_id="r2")
    assert [(i.item_id, ms) for i, ms in cuts] == [("i1", 100), ("i2", 0)]
    assert heard.dropped and heard.interrupted and pb.playing() == []
    assert pb.cut(generating_response_id="r2") == []  # already cut


def test_a_fully_heard_item_is_cut_only_while_its_response_is_still_generating():
    pb, it = Playback(), item()
    pb.add(it)
    pb.on_mark(pb.sent(it, 800, now=0.0))
    assert pb.cut(generating_response_id=None) == []
    assert [(i.item_id, ms) for i, ms in pb.cut(generating_response_id="r1")] == [("i1", 100)]


def test_dtmf_tones_hold_the_line_until_played():
    pb = Playback()
    name = pb.tones_sent(1600, now=1.0)
    assert pb.awaiting_marks and pb.free_at == pytest.approx(1.2)
    assert pb.on_mark(name) is None and not pb.awaiting_marks
