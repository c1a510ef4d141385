"""Is this request really from Twilio? The one place the shim checks it.

Twilio signs every webhook and the Media Streams WebSocket upgrade with X-Twilio-Signature:
HMAC-SHA1 of the full URL (plus, for form posts, the sorted POST parameters) with the account's
auth token (https://www.twilio.com/docs/usage/security#validating-requests). The `twilio`
package's RequestValidator computes it; the URL is always the one we rendered from PUBLIC_URL,
never one rebuilt from request headers. A stream's `start` frame also carries a per-call token
(HMAC-SHA256 of the CallSid) that the signed voice webhook issued as a <Parameter>, so an
upgrade replayed for another call is refused.
"""

from __future__ import annotations

import hashlib
import hmac

from twilio.request_validator import RequestValidator


class TwilioSignatures:
    def __init__(self, auth_token: str):
        self._auth_token = auth_token
        self._validator = RequestValidator(auth_token)

    def valid(self, url: str, params: dict[str, str], signature: str | None) -> bool:
        """A signed request to `url` with these form parameters ({} for GET and the WebSocket
        upgrade). Without an auth token nothing is trusted. For a request without parameters
        the URL is also tried with a trailing slash, as Twilio's docs suggest for the upgrade."""
        if not signature or not self._auth_token:
            return False
        if self._validator.validate(url, params, signature):
            return True
        return not params and self._validator.validate(url + "/", {}, signature)

    def stream_token(self, call_sid: str) -> str:
        """The per-call token the voice webhook gives the stream (a <Parameter name="token">)."""
        return hmac.new(self._auth_token.encode(), call_sid.encode(), hashlib.sha256).hexdigest()[:32]

    def start_token_ok(self, call_sid: str, given: str) -> bool:
        # Compared as bytes: compare_digest refuses non-ASCII str, and the token is caller input.
        expected = self.stream_token(call_sid).encode()
        return bool(self._auth_token) and hmac.compare_digest(given.encode("utf-8", "replace"), expected)
