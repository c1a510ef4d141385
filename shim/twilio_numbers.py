"""Twilio's IncomingPhoneNumbers resource, through the `twilio` package (blocking client: the
CLI runs these in a worker thread). The base URL comes from TWILIO_API_BASE (see
shim/twilio_rest.py); errors become three kinds the CLI maps to exit codes and messages.

Resource: https://www.twilio.com/docs/phone-numbers/api/incomingphonenumber-resource
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from twilio.base.exceptions import TwilioException
from twilio.http.response import Response
from twilio.rest import Client

from .config import Config
from .numbers import VoiceSettings
from .twilio_rest import client

T = TypeVar("T")
RETRIES_ON_429 = 3  # Twilio's "Too Many Requests": back off and try again, then give up
PAGE_SIZE = 200


class TwilioAuthError(RuntimeError):
    """401 from Twilio: the account SID / auth token pair was refused."""


class TwilioApiError(RuntimeError):
    """Twilio answered with an error (its code and message are in the text), or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None, applied: bool | None = False):
        super().__init__(message)
        self.status, self.code = status, code
        # For updates: False = Twilio refused it (nothing changed); None = unknown (network error
        # after the request was sent; the change may or may not have been applied).
        self.applied = applied


@dataclass(frozen=True)
class PhoneNumber:
    sid: str
    phone_number: str
    friendly_name: str
    settings: VoiceSettings
    voice_application_sid: str | None
    trunk_sid: str | None

    @classmethod
    def from_instance(cls, instance: Any) -> PhoneNumber:
        return cls(
            sid=instance.sid, phone_number=instance.phone_number, friendly_name=instance.friendly_name or "",
            settings=VoiceSettings.from_instance(instance), voice_application_sid=instance.voice_application_sid or None,
            trunk_sid=instance.trunk_sid or None,
        )


class NumbersApi:
    def __init__(self, config: Config, *, sleep: Callable[[float], None] = time.sleep):
        self.rest: Client = client(config)  # the CLI checked the credentials are set
        self.account_sid = config.twilio_account_sid
        self.sleep = sleep

    @property
    def _numbers(self):
        return self.rest.api.v2010.accounts(self.account_sid).incoming_phone_numbers

    def _call(self, what: str, fn: Callable[[], T], *, mutation: bool = False) -> T:
        for attempt in range(RETRIES_ON_429 + 1):
            try:
                return fn()
            except TwilioException as exc:
                status, code, message = _error_fields(exc)
                if status == 429 and attempt < RETRIES_ON_429:
                    self.sleep(0.5 * 2**attempt)
                    continue
                if status == 401:
                    raise TwilioAuthError(
                        f"{what}: Twilio refused the credentials (HTTP 401, code {code}: {message}); "
                        "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"
                    ) from None
                if status is None:
                    raise TwilioApiError(f"{what}: {type(exc).__name__}: {message or exc}", applied=None if mutation else False) from None
                raise TwilioApiError(
                    f"{what}: Twilio error {code} (HTTP {status}): {message}", status=status, code=code,
                    # a 5xx on a change does not say whether it was applied
                    applied=None if mutation and status >= 500 else False,
                ) from None
            except Exception as exc:  # `requests` network errors (refused, DNS, timeout)
                raise TwilioApiError(
                    f"{what}: could not reach Twilio at {self.rest.api.base_url} ({type(exc).__name__})",
                    applied=None if mutation else False,
                ) from None
        raise AssertionError("unreachable")

    def list_all(self) -> list[PhoneNumber]:
        """Every number on the account (the package follows next_page_uri)."""
        return self._call("listing the account's phone numbers",
                          lambda: [PhoneNumber.from_instance(i) for i in self._numbers.list(page_size=PAGE_SIZE)])

    def find(self, number: str) -> PhoneNumber | None:
        """The account's number, exactly; None when it is not on the account. (Twilio's
        PhoneNumber filter also matches partial numbers, so the answer is filtered again.)"""
        found = self._call(f"looking up {number}",
                           lambda: [PhoneNumber.from_instance(i) for i in self._numbers.list(phone_number=number, page_size=50)])
        for item in found:
            if item.phone_number == number:
                return item
        return None

    def fetch(self, sid: str) -> PhoneNumber:
        return self._call(f"fetching {sid}", lambda: PhoneNumber.from_instance(self._numbers(sid).fetch()))

    def update(self, sid: str, settings: VoiceSettings) -> PhoneNumber:
        return self._call(
            f"updating {sid}",
            lambda: PhoneNumber.from_instance(self._numbers(sid).update(**settings.update_params())),
            mutation=True,
        )


def _error_fields(exc: TwilioException) -> tuple[int | None, int | None, str]:
    """(HTTP status, Twilio code, message) of a twilio-python exception. A failed list page
    is a bare TwilioException("Unable to fetch page", response) that carries the response."""
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    message = getattr(exc, "msg", None) or getattr(exc, "detail", None) or getattr(exc, "title", None) or ""
    if status is None:
        response = next((a for a in exc.args if isinstance(a, Response)), None)
        if response is not None:
            status = response.status_code
            try:
                body = json.loads(response.text)
            except (TypeError, ValueError):
                body = {}
            if isinstance(body, dict):
                code, message = body.get("code"), str(body.get("message") or "")
    return status, code, str(message)
