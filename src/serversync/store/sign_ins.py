"""The sign-ins of Exchange Online mailboxes in progress and their outcome (``sign_ins``).

One row per mailbox (migration ``0015``): the latest device-code sign-in started for it.
The row lives in the database rather than in the memory of the process that started it so
that every web worker answers ``GET .../sign-in`` the same, and so that another process can
take over the polling when the one that started it stopped (a worker recycled, a restart).
That is also why the device code is kept at all: it is the secret that turns the user's
approval into tokens, so it is encrypted with the keyring like every other secret column
(AAD ``sign_ins.device_code``, listed in ``tables.SECRET_COLUMNS`` for key rotation) and
cleared as soon as the attempt is finished. Tokens are never stored here: the refresh token
goes to the mailbox's own encrypted secret.

``attempt`` is a random id per start, so a poller whose attempt was replaced by a newer
start (or taken over by another process) notices and stops instead of overwriting it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Float, ForeignKey, String, Text, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.core.secret import Secret
from serversync.core.signin import SignIn, SignInStatus
from serversync.core.times import as_utc, utc
from serversync.store.crypto import Keyring
from serversync.store.tables import SECRET_COLUMNS, Base, MailboxRow

COLUMN = "sign_ins.device_code"


class SignInRow(Base):
    __tablename__ = "sign_ins"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(
        ForeignKey("mailboxes.id", ondelete="CASCADE"), unique=True)
    attempt: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(10))
    user_code: Mapped[str] = mapped_column(String(64))
    verification_uri: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text, default="")
    device_code: Mapped[str | None] = mapped_column(Text)  # ciphertext; None once finished
    interval_s: Mapped[float] = mapped_column(Float)
    started_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    polled_at: Mapped[dt.datetime]  # the poller's heartbeat
    finished_at: Mapped[dt.datetime | None]
    signed_in_as: Mapped[str | None] = mapped_column(String(320))
    error_code: Mapped[str] = mapped_column(String(64), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    error_fix: Mapped[str] = mapped_column(Text, default="")


SECRET_COLUMNS[SignInRow] = ("device_code",)


class Pending:
    """A pending attempt as its poller needs it (with the device code, decrypted)."""

    def __init__(self, attempt: str, device_code: Secret, interval_s: float,
                 sign_in: SignIn) -> None:
        self.attempt, self.device_code, self.interval_s = attempt, device_code, interval_s
        self.sign_in = sign_in


class SignInStore:
    """Reads and writes ``sign_ins`` inside the caller's transaction."""

    def __init__(self, session: AsyncSession, keyring: Keyring) -> None:
        self.session = session
        self.keyring = keyring

    async def _row(self, address: str, *, lock: bool = False) -> SignInRow | None:
        query = (select(SignInRow).join(MailboxRow, MailboxRow.id == SignInRow.mailbox_id)
                 .where(MailboxRow.address == address.strip().lower()))
        return await self.session.scalar(query.with_for_update() if lock else query)

    @staticmethod
    def _out(row: SignInRow, address: str) -> SignIn:
        return SignIn(address, SignInStatus(row.status), row.user_code, row.verification_uri,
                      row.message, as_utc(row.started_at), as_utc(row.expires_at),
                      row.started_by, utc(row.finished_at), row.signed_in_as, row.error_code,
                      row.error_message, row.error_fix)

    async def start(self, mailbox_id: int, address: str, attempt: str, device_code: Secret,
                    interval_s: float, sign_in: SignIn) -> None:
        """Record a new attempt, replacing the mailbox's previous one (whatever its state)."""
        row = await self.session.scalar(
            select(SignInRow).where(SignInRow.mailbox_id == mailbox_id).with_for_update())
        if row is None:
            row = SignInRow(mailbox_id=mailbox_id)
            self.session.add(row)
        row.attempt, row.status = attempt, SignInStatus.PENDING.value
        row.user_code, row.verification_uri = sign_in.user_code, sign_in.verification_uri
        row.message, row.device_code = sign_in.message, self.keyring.encrypt(device_code, COLUMN)
        row.interval_s, row.started_by = interval_s, sign_in.started_by
        row.started_at, row.expires_at = sign_in.started_at, sign_in.expires_at
        row.polled_at, row.finished_at, row.signed_in_as = sign_in.started_at, None, None
        row.error_code = row.error_message = row.error_fix = ""
        await self.session.flush()

    async def get(self, address: str) -> SignIn | None:
        row = await self._row(address)
        return None if row is None else self._out(row, address)

    async def heartbeat(self, address: str, attempt: str, now: dt.datetime) -> bool:
        """Note that ``attempt``'s poller is alive; False if it is no longer the pending one."""
        row = await self._row(address, lock=True)
        if row is None or row.attempt != attempt or row.status != SignInStatus.PENDING.value:
            return False
        row.polled_at = now
        await self.session.flush()
        return True

    async def take_over(self, address: str, now: dt.datetime, grace: dt.timedelta,
                        new_attempt: str) -> Pending | None:
        """Claim a pending attempt whose poller has been silent for three of its polling
        intervals plus ``grace``.

        The attempt id changes, so the old poller, should it wake up, stops; only one
        process can win the claim (the row is locked and the check made under the lock).
        """
        row = await self._row(address, lock=True)
        if row is None or row.status != SignInStatus.PENDING.value or row.device_code is None \
                or as_utc(row.expires_at) <= now:
            return None
        silent_since = now - grace - dt.timedelta(seconds=3 * row.interval_s)
        if as_utc(row.polled_at) >= silent_since:
            return None
        row.attempt, row.polled_at = new_attempt, now
        await self.session.flush()
        return Pending(new_attempt, self.keyring.decrypt(row.device_code, COLUMN),
                       row.interval_s, self._out(row, address))

    async def finish(self, address: str, attempt: str | None, status: SignInStatus,
                     now: dt.datetime, *, signed_in_as: str | None = None, code: str = "",
                     message: str = "", fix: str = "") -> bool:
        """Record the outcome and forget the device code. With ``attempt``, only if that
        attempt is still the pending one (False otherwise: a newer one owns the row)."""
        row = await self._row(address, lock=True)
        if row is None or row.status != SignInStatus.PENDING.value \
                or (attempt is not None and row.attempt != attempt):
            return False
        row.status, row.device_code, row.finished_at = status.value, None, now
        row.signed_in_as, row.error_code, row.error_message, row.error_fix = (
            signed_in_as, code, message, fix)
        await self.session.flush()
        return True
