"""Realistic call rows for the operator's views, written through the real Recorder with the row
shapes shim/call.py and shim/app.py produce (upserts in the order a call makes them)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from shim.store import Recorder

T0 = datetime(2026, 12, 1, 9, 0, 0, tzinfo=timezone.utc)
ACCOUNT = "AC" + "a" * 32
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@dataclass
class Seeded:
    dental: str  # a call with an interruption and two tool calls (one ok, one timeout), recorded
    xss: str  # a call whose transcript and tool result carry markup
    failed: str  # a model failure, no recording
    old: str  # eight days before the others
    recording_sid: str


async def seed(dsn: str, tmp: Path, *, recording_sid: str = "RE" + "b" * 32, api_base: str = "https://api.twilio.com") -> Seeded:
    rec = Recorder(dsn, spool_path=tmp / "spool.jsonl")
    await rec.start()
    s = Seeded("CA" + "1" * 32, "CA" + "2" * 32, "CA" + "3" * 32, "CA" + "4" * 32, recording_sid)

    def call(sid: str, start: datetime, frm: str, to: str, assistant: str, name: str) -> None:
        # voice webhook, then the stream's start, then the assistant's setup (shim/app.py, shim/call.py)
        rec.upsert("calls", {"call_sid": sid, "from_number": frm, "to_number": to, "account_sid": ACCOUNT,
                             "status": "ringing", "stack": "shim", "assistant_id": assistant})
        rec.upsert("calls", {"call_sid": sid, "stream_sid": "MZ" + sid[2:], "account_sid": ACCOUNT, "from_number": frm,
                             "to_number": to, "stack": "shim", "status": "in-progress", "started_at": start,
                             "custom_parameters": {"assistant": assistant, "from": frm, "to": to, "token": "secret-stream-token"}})
        rec.upsert("calls", {"call_sid": sid, "assistant_id": assistant, "assistant_name": name, "model": "gpt-realtime-2.1",
                             "voice": "marin", "metadata": None})

    def say(sid: str, seq: int, role: str, start: datetime, text: str, **extra) -> None:
        rec.upsert("utterances", {"call_sid": sid, "seq": seq, "role": role, "item_id": f"item_{seq}", "started_at": start})
        rec.upsert("utterances", {"call_sid": sid, "seq": seq, "role": role, "text": text, **extra})

    def tool(sid: str, seq: int, at: datetime, name: str, arguments: dict, status: str, result: str, latency: int, **extra) -> None:
        rec.upsert("tool_calls", {"call_sid": sid, "seq": seq, "call_id": f"call_{seq}", "name": name, "arguments": arguments,
                                  "status": "requested", "requested_at": at})
        rec.upsert("tool_calls", {"call_sid": sid, "seq": seq, "status": status, "url": "https://example.com/tools",
                                  "result": result, "error": extra.get("error"), "latency_ms": latency,
                                  "completed_at": at + timedelta(milliseconds=latency)})

    def end(sid: str, at: datetime, reason: str) -> None:
        rec.upsert("calls", {"call_sid": sid, "status": "ended", "ended_at": at, "ended_reason": reason,
                             "next_action": {"verb": "hangup"}}, keep_existing=("ended_at", "ended_reason", "next_action"))

    t = T0
    call(s.dental, t, "+15550001111", "+15557654321", "dental", "Brightside Dental")
    rec.upsert("calls", {"call_sid": s.dental, "recording_url": f"{api_base}/2010-04-01/Accounts/{ACCOUNT}/Recordings/{recording_sid}"})
    rec.insert("call_events", {"call_sid": s.dental, "at": t + timedelta(seconds=1), "kind": "recording_started",
                               "detail": {"url": f"{api_base}/2010-04-01/Accounts/{ACCOUNT}/Recordings/{recording_sid}"}})
    say(s.dental, 1, "assistant", t + timedelta(seconds=0.5), "Hi, thanks for calling Brightside Dental, this is Maya.",
        audio_ms=3100, heard_ms=3100)
    say(s.dental, 2, "user", t + timedelta(seconds=4), "What are your hours on Saturday?")
    say(s.dental, 3, "assistant", t + timedelta(seconds=6), "On Saturdays we are open from nine in", interrupted=True,
        full_text="On Saturdays we are open from nine in the morning until one in the afternoon.", audio_ms=5200,
        heard_ms=1700, latency_ms=420)
    rec.insert("call_events", {"call_sid": s.dental, "at": t + timedelta(seconds=7.7), "kind": "barge_in", "detail": {"response_id": "resp_1"}})
    say(s.dental, 4, "user", t + timedelta(seconds=7.8), "Can I book a cleaning for the 5th?")
    tool(s.dental, 1, t + timedelta(seconds=10), "check_availability", {"date": "2026-12-05"}, "ok",
         '{"slots": ["09:00", "10:30"]}', 312)
    say(s.dental, 5, "assistant", t + timedelta(seconds=10.5), "I have nine or ten thirty.", latency_ms=510, audio_ms=2000, heard_ms=2000)
    tool(s.dental, 2, t + timedelta(seconds=14), "book_appointment", {"date": "2026-12-05", "time": "09:00"}, "timeout",
         "No result returned.", 20000)
    say(s.dental, 6, "assistant", t + timedelta(seconds=34.5), "Sorry, I could not book that just now.", latency_ms=380)
    end(s.dental, t + timedelta(seconds=83), "customer-ended-call")

    t2 = T0 + timedelta(hours=1)
    call(s.xss, t2, "+15550002222", "+15557654321", "dental", "Brightside Dental")
    say(s.xss, 1, "user", t2 + timedelta(seconds=1), XSS)
    tool(s.xss, 1, t2 + timedelta(seconds=2), "lookup", {"q": XSS}, "error", f"Error: {XSS}", 40, error=XSS)
    say(s.xss, 2, "assistant", t2 + timedelta(seconds=3), f"You said {XSS}", interrupted=True, full_text=f"You said {XSS} indeed",
        audio_ms=800, heard_ms=300, latency_ms=700)
    end(s.xss, t2 + timedelta(seconds=9), "customer-ended-call")

    t3 = T0 + timedelta(hours=2)
    call(s.failed, t3, "+15550003333", "+15559990000", "luna", "Luna Trattoria")
    rec.insert("call_events", {"call_sid": s.failed, "at": t3 + timedelta(seconds=2), "kind": "model_error",
                               "detail": {"code": "server_error", "message": "The server had an error", "param": None}})
    end(s.failed, t3 + timedelta(seconds=2.5), "pipeline-error-openai-llm-failed")

    t4 = T0 - timedelta(days=8)
    call(s.old, t4, "+15550001111", "+15559990000", "luna", "Luna Trattoria")
    say(s.old, 1, "assistant", t4 + timedelta(seconds=0.4), "Ciao, Luna Trattoria.", latency_ms=None)
    end(s.old, t4 + timedelta(seconds=20), "silence-timed-out")

    assert await rec.drain(10), "rows not written"
    await rec.close()
    return s
