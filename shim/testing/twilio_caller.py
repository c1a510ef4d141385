"""The simulated Twilio peer lives in the product (`shim parity run` plays Twilio with it):
re-exported here for the tests and the demo."""

from shim.twilio_peer import (  # noqa: F401
    BYTES_PER_MS, FRAME_BYTES, FRAME_MS, SILENCE, TwilioCaller, incoming_call_params, keep_line_open,
    post_twilio_webhook, sign,
)

__all__ = ["TwilioCaller", "incoming_call_params", "keep_line_open", "post_twilio_webhook", "sign"]
