"""Small helpers shared by the stand-ins."""

from shim.twilio_peer import Changes  # noqa: F401  (one copy, in the product module that needs it)
