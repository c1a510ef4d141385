"""Local stand-ins for the shim's two peers, used by the tests and the demo.

* `shim.testing.fake_realtime`: an OpenAI Realtime (GA) WebSocket server that validates every event.
* `shim.testing.twilio_caller`: a Twilio Media Streams peer that plays back what the shim sends.
* `assets/`: recorded caller phrases (raw 8 kHz mu-law), see assets/README.md.
"""

from __future__ import annotations

from importlib import resources

# Transcripts of the bundled caller recordings (what Script.user_transcripts should report).
CALLER_QUESTION_TEXT = "Hi, I'd like to know your opening hours on Saturday."
CALLER_INTERRUPT_TEXT = "Sorry, actually, can I book a cleaning?"


def load_asset(name: str) -> bytes:
    """Bytes of shim/testing/assets/<name>; ".ulaw" is implied when `name` has no extension."""
    if "." not in name:
        name += ".ulaw"
    return resources.files(__name__).joinpath("assets", name).read_bytes()


__all__ = ["CALLER_INTERRUPT_TEXT", "CALLER_QUESTION_TEXT", "load_asset"]
