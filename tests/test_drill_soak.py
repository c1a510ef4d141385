"""scripts/drill_soak.py: a short run end to end (so the drill cannot rot), and its judge."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from drill_soak import SESSION_OWNER, first_tag, judge, parse_tag  # noqa: E402

def stream(owner: int, **kw) -> dict:
    return {"owner": owner, "sent": 0, "received": 0, "source": None, "foreign": 0, "gaps": 0, "last_seq": 0,
            "recent_sends": [], **kw}

def whole_call(n: int, frames: int = 50, deltas: int = 10) -> tuple[dict, dict]:
    session = SESSION_OWNER + n
    call = {"n": n, "call_sid": f"CA{n}", "closed_early": False, "hangup_at": 100.0, "error": None,
            "out": stream(n, sent=frames), "back": stream(n, received=deltas, source=session)}
    model = {"heard": stream(session, received=frames, source=n),
             "said": stream(session, sent=deltas, recent_sends=[90.0, 95.0])}
    return call, model

def test_whole_calls_pass():
    (a, ma), (b, mb) = whole_call(1), whole_call(2)
    assert judge([a, b], [ma, mb]) == {}

def test_a_lost_frame_each_way_is_named_for_its_call():
    (a, ma), (b, mb) = whole_call(1), whole_call(2)
    mb["heard"]["received"] -= 1
    a["back"]["received"] -= 1
    problems = judge([a, b], [ma, mb])
    assert problems == {"CA1": ["the model sent 10 frames before the hang-up (10 in all), the caller received 9"],
                        "CA2": ["caller sent 50 frames, the model received 49"]}

def test_audio_sent_after_the_hang_up_is_not_a_loss():
    a, ma = whole_call(1)
    ma["said"].update(sent=11, recent_sends=[95.0, 100.5])  # the model's next answer began after the hang-up
    assert judge([a], [ma]) == {}
    a["back"]["received"] = 11  # ...and its first frame was relayed before the shim handled the stop
    assert judge([a], [ma]) == {}
    a["back"]["received"] = 12  # more than the model ever sent
    assert judge([a], [ma])["CA1"] == ["the model sent 10 frames before the hang-up (11 in all), the caller received 12"]

def test_crossed_and_reordered_frames_fail_the_call():
    (a, ma), (b, mb) = whole_call(1), whole_call(2)
    ma["heard"]["foreign"] = 1  # a frame of call 2 reached call 1's model session
    b["back"].update(source=SESSION_OWNER + 1)  # call 2 heard call 1's assistant
    a["back"]["gaps"] = 1
    problems = judge([a, b], [ma, mb])
    assert set(problems) == {"CA1", "CA2"}
    assert any("another call" in p for p in problems["CA1"]) and any("out of sequence" in p for p in problems["CA1"])
    assert any("not its own" in p for p in problems["CA2"])

def test_a_call_with_no_model_session_or_dropped_by_the_shim_fails():
    a, _ = whole_call(1)
    b, mb = whole_call(2)
    b["closed_early"] = True
    problems = judge([a, b], [mb])
    assert problems["CA1"] == ["0 model sessions heard this call, expected 1"]
    assert problems["CA2"] == ["the shim closed the stream before the caller hung up"]

def test_tags_carry_their_owner_and_sequence_and_ambience_is_not_a_tag():
    assert parse_tag(first_tag(7)) == (7, 1)
    assert parse_tag(first_tag(SESSION_OWNER + 3) + 41) == (SESSION_OWNER + 3, 42)
    assert parse_tag(0x1234_5678_9ABC_DEF0) is None and parse_tag(None) is None

def test_a_short_soak_through_the_real_server_passes(db_dsn):
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "drill_soak.py"), "--calls", "5", "--minutes", "0.12",
         "--ramp", "0.5", "--cycle", "2.5", "--talk", "0.5", "--call-seconds", "1", "--database-url", db_dsn],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert "caller -> model:" in out and "(lost 0)" in out
    placed = int(re.search(r"== (\d+) calls placed", out).group(1))
    assert placed > 5  # calls ended and were replaced during the run
    assert f"{placed} of {placed} call rows" in out and f"'customer-ended-call'): {placed}" in out
    assert "event-loop lag (shim_event_loop_lag_seconds" in out
    assert "FAIL" not in out
