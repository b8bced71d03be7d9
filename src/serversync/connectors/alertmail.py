"""Email a profile-level alert to the profile's owner (``alert_owner``) over SMTP.

The reference notifies the profile owner of profile-level errors (``dynamics-sss.md`` §4.1).
We send from the profile's own service account through the profile's outgoing server, the
one login that exists independently of any mailbox; a profile that uses per-mailbox
credentials has no such account, so its alerts stay on the alert wall only (the caller is
told with a `PermanentError`). The message is plain text and carries no secrets.
"""

from __future__ import annotations

import email.message
import email.utils

import aiosmtplib

from serversync.connectors.net import ConnectOptions
from serversync.connectors.smtp import classify_reply, session
from serversync.core.errors import PermanentError
from serversync.core.model import AccessMode, Alert, CredentialSource, Profile
from serversync.core.rules import Login


def compose(profile: Profile, alert: Alert, sender: str) -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = sender
    message["To"] = profile.alert_owner or ""
    message["Subject"] = f"[serversync] {alert.severity.value}: profile {profile.name}: {alert.code}"
    message["Date"] = email.utils.format_datetime(alert.created_at)
    message["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or None)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    message.set_content(f"{alert.message}\n\nWhat to do: {alert.fix}\n")
    return message


async def send(profile: Profile, alert: Alert, options: ConnectOptions) -> None:
    if not profile.alert_owner:
        return
    if profile.credential_source is not CredentialSource.PROFILE or not profile.service_user:
        raise PermanentError(
            f"profile {profile.name} has no service account to send its alerts from",
            fix="read the alert wall, or use a profile with a service account",
            code="alert-mail-unavailable")
    endpoint = profile.outgoing or profile.incoming
    if endpoint is None:
        raise PermanentError(f"profile {profile.name} has no server to send mail through",
                             code="alert-mail-unavailable")
    user = profile.outgoing_service_user if not profile.use_same_settings_for_outgoing \
        and profile.outgoing_service_user else profile.service_user
    secret = profile.outgoing_service_secret if not profile.use_same_settings_for_outgoing \
        and profile.outgoing_service_secret else profile.service_secret
    login = Login(AccessMode.OWN, user, secret, user)
    async with session(endpoint, login, options) as client:
        try:
            await client.send_message(compose(profile, alert, user))
        except aiosmtplib.SMTPResponseException as exc:
            raise classify_reply(exc.code, exc.message, sender=user, what="alert") from None
