"""Calls to Twilio's REST API, through the `twilio` package (its blocking client, run in a
worker thread: these are one-off calls per phone call, never on the audio path).
TWILIO_API_BASE points the client at a stand-in in tests; production uses api.twilio.com."""

from __future__ import annotations

from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from .config import Config


REST_TIMEOUT_S = 10.0


class TwilioRestError(RuntimeError):
    """A REST call failed; the message says which one, never the credentials."""


def client(config: Config) -> Client:
    if not (config.twilio_account_sid and config.twilio_auth_token):
        raise TwilioRestError("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are needed for Twilio's REST API")
    # environment={}: a developer's TWILIO_EDGE/REGION must not rewrite the host; a timeout so a
    # hung API call cannot hold a worker thread for long.
    rest = Client(config.twilio_account_sid, config.twilio_auth_token, environment={},
                  http_client=TwilioHttpClient(timeout=REST_TIMEOUT_S))
    rest.api.base_url = config.twilio_api_base
    return rest


def start_recording(config: Config, account_sid: str, call_sid: str) -> str:
    """Start a dual-channel recording of the live call (caller left, assistant right, as Vapi's
    stereo recording); returns the recording's media URL (append .wav or .mp3 to download)."""
    rest = client(config)
    try:
        recording = rest.api.v2010.accounts(account_sid or config.twilio_account_sid).calls(call_sid).recordings.create(
            recording_channels="dual", recording_track="both"
        )
    except TwilioException as exc:
        raise TwilioRestError(f"starting the recording of {call_sid}: {exc}") from None
    except Exception as exc:  # network errors from `requests` (DNS, refused, timeout)
        raise TwilioRestError(f"starting the recording of {call_sid}: {type(exc).__name__}") from None
    account = recording.account_sid or account_sid or config.twilio_account_sid
    return f"{config.twilio_api_base}/2010-04-01/Accounts/{account}/Recordings/{recording.sid}"
