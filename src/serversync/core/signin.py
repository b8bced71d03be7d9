"""A user's sign-in for their own Exchange Online mailbox, as the API and the UI see it.

The device authorization grant (RFC 8628) takes minutes: the administrator starts it, the
user types the code on Microsoft's page whenever they get to it, and serversync polls the
token endpoint meanwhile. `SignIn` is that attempt's state, readable from any process:
``pending`` (show the code), ``done`` (who signed in), ``failed`` (code, message, fix) or
``expired`` (nobody signed in before the code ran out). It never carries the device code
or a token: only what may be shown to an administrator.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass


class SignInStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class SignIn:
    mailbox: str
    status: SignInStatus
    user_code: str
    verification_uri: str
    message: str  # Microsoft's own instructions, in the language it chose
    started_at: dt.datetime
    expires_at: dt.datetime
    started_by: str  # "api:<token name>", "ui:<token name>", "cli:<OS user>"
    finished_at: dt.datetime | None = None
    signed_in_as: str | None = None  # done: the account Microsoft says signed in
    error_code: str = ""  # failed / expired: what went wrong and what to do
    error_message: str = ""
    error_fix: str = ""

    @property
    def finished(self) -> bool:
        return self.status is not SignInStatus.PENDING
