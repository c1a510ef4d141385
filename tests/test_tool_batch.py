"""The tool batch alone: every call answered once, a backstop for dead webhooks, and exactly
one thing after (end / say / respond); plus the transfer helpers."""

from __future__ import annotations

import random

from shim.tool_batch import AfterTools, ToolBatch, server_timeout, transfer_action, transfer_message


def test_the_batch_completes_when_every_call_is_answered_once():
    batch = ToolBatch()
    batch.expect("c1", answer_by=25.0)
    batch.expect("c2", answer_by=10.0)
    assert batch.deadline == 25.0 and not batch.complete
    assert batch.answered("c1") and not batch.answered("c1")  # a duplicate answer is ignored
    assert not batch.answered("zzz")
    assert batch.overdue(25.0) == [] and batch.overdue(25.1) == ["c2"]
    assert batch.answered("c2") and batch.complete


def test_what_follows_a_batch():
    assert ToolBatch().after() == AfterTools((), None, "", None)  # ask the model for one response
    spoken = ToolBatch(speak_instead="Your order shipped.", system_notes=["order=1"])
    assert spoken.after() == AfterTools(("order=1",), None, "Your order shipped.", None)
    ended = ToolBatch(end_reason="assistant-ended-call", end_say="Goodbye!")
    assert ended.after() == AfterTools((), "assistant-ended-call", "Goodbye!", None)
    transfer = ToolBatch(transfer={"verb": "dial", "number": "+15551234567"}, transfer_say="Transferring.",
                         end_reason="assistant-ended-call")  # a transfer wins over an end
    assert transfer.after() == AfterTools((), "assistant-forwarded-call", "Transferring.",
                                          {"verb": "dial", "number": "+15551234567"})


def test_transfer_helpers():
    action = transfer_action({"number": "+15551234567", "extension": "12", "callerId": "{{phoneNumber.number}}"},
                             {"phoneNumber": {"number": "+15550002222"}})
    assert action == {"verb": "dial", "number": "+15551234567", "extension": "12", "callerId": "+15550002222"}
    assert transfer_action({"sipUri": "sip:a@b"}, {}) == {"verb": "dial", "sip": "sip:a@b"}
    assert transfer_message({}, {"number": "+1"}, {}, random.Random(1)) == "Transferring the call now"
    assert transfer_message({}, {"number": "+1", "message": "One moment."}, {}, random.Random(1)) == "One moment."
    assert server_timeout({"server": {"timeoutSeconds": 7}}) == 7.0 and server_timeout({}) == 20.0
