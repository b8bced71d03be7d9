"""All SQL for the foundation's tables; returns `core.model` types, never ORM rows.

A `Repository` wraps one session (one transaction) and the keyring. Secrets are encrypted on
the way in and decrypted on the way out, so nothing above the store ever sees ciphertext and
nothing below it ever sees an unencrypted secret column.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import (
    AfterProcessing,
    Alert,
    ApprovalStatus,
    Channel,
    ChannelState,
    ChannelStatus,
    CredentialSource,
    Endpoint,
    ImpersonationMethod,
    Mailbox,
    OrgSettings,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    Severity,
    SyncMethod,
    TlsMode,
    TrackingRule,
)
from serversync.core.secret import Secret
from serversync.core.times import utc
from serversync.store.crypto import Keyring
from serversync.store.tables import (
    SECRET_COLUMNS,
    AlertRow,
    MailboxRow,
    PartyEmailRow,
    PartyRow,
    ProfileRow,
    SettingRow,
)

E = TypeVar("E", bound=enum.Enum)

PROFILE_SECRETS = ("service_secret", "outgoing_service_secret", "client_secret",
                   "client_certificate")
_PROFILE_ENUMS: dict[str, type[enum.Enum]] = {
    "kind": ServerKind, "credential_source": CredentialSource,
    "impersonation_method": ImpersonationMethod, "outgoing_credential_source": CredentialSource,
}


def _enum(kind: type[E], value: str | None) -> E | None:
    return None if value is None else kind(value)


class Repository:
    """One unit of work over the foundation's tables."""

    def __init__(self, session: AsyncSession, keyring: Keyring) -> None:
        self.session = session
        self.keyring = keyring

    # ------------------------------------------------------------ secrets

    def _seal(self, secret: Secret | None, column: str) -> str | None:
        return None if secret is None else self.keyring.encrypt(secret, column)

    def _open(self, stored: str | None, column: str) -> Secret | None:
        return None if stored is None else self.keyring.decrypt(stored, column)

    # ------------------------------------------------------------ profiles

    def _profile(self, row: ProfileRow) -> Profile:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(Profile):
            name = f.name
            if name in ("incoming", "outgoing"):
                host = getattr(row, f"{name}_host")
                values[name] = None if host is None else Endpoint(
                    host, getattr(row, f"{name}_port"), TlsMode(getattr(row, f"{name}_tls")))
            elif name in PROFILE_SECRETS:
                values[name] = self._open(getattr(row, name), f"profiles.{name}")
            elif name in _PROFILE_ENUMS:
                values[name] = _enum(_PROFILE_ENUMS[name], getattr(row, name))
            elif name == "impersonation_scope":
                values[name] = tuple(row.impersonation_scope or ())
            elif name == "process_email_from":
                values[name] = utc(row.process_email_from)
            else:
                values[name] = getattr(row, name)
        return Profile(**values)

    def _fill_profile(self, row: ProfileRow, profile: Profile) -> None:
        for f in dataclasses.fields(Profile):
            name, value = f.name, getattr(profile, f.name)
            if name == "id":
                continue
            if name in ("incoming", "outgoing"):
                endpoint: Endpoint | None = value
                setattr(row, f"{name}_host", endpoint.host if endpoint else None)
                setattr(row, f"{name}_port", endpoint.port if endpoint else None)
                setattr(row, f"{name}_tls", endpoint.tls.value if endpoint else None)
            elif name in PROFILE_SECRETS:
                setattr(row, name, self._seal(value, f"profiles.{name}"))
            elif isinstance(value, enum.Enum):
                setattr(row, name, value.value)
            elif isinstance(value, tuple):
                setattr(row, name, list(value))
            else:
                setattr(row, name, value)

    async def _profile_row(self, name: str) -> ProfileRow:
        row = await self.session.scalar(select(ProfileRow).where(ProfileRow.name == name))
        if row is None:
            raise NotFound(f"no profile named {name!r}",
                           fix="list them with: serversync profile list")
        return row

    async def get_profile(self, name: str) -> Profile:
        return self._profile(await self._profile_row(name))

    async def find_profile(self, name: str) -> Profile | None:
        row = await self.session.scalar(select(ProfileRow).where(ProfileRow.name == name))
        return None if row is None else self._profile(row)

    async def list_profiles(self) -> list[Profile]:
        rows = await self.session.scalars(select(ProfileRow).order_by(ProfileRow.name))
        return [self._profile(r) for r in rows]

    async def save_profile(self, profile: Profile) -> Profile:
        """Insert or update by name."""
        row = await self.session.scalar(select(ProfileRow).where(ProfileRow.name == profile.name))
        if row is None:
            row = ProfileRow()
            self.session.add(row)
        self._fill_profile(row, profile)
        await self.session.flush()
        return dataclasses.replace(profile, id=row.id)

    async def lock_profile(self, name: str) -> None:
        """Hold the profile's row until the transaction ends (PostgreSQL ``FOR UPDATE``;
        SQLite serialises writers anyway), so that decisions over all of a profile's
        mailboxes — "most of them are failing" — see each other's committed results."""
        await self.session.execute(
            select(ProfileRow.id).where(ProfileRow.name == name).with_for_update())

    async def delete_profile(self, name: str) -> None:
        row = await self._profile_row(name)
        users = await self.session.scalars(
            select(MailboxRow.address).where(MailboxRow.profile_id == row.id))
        addresses = sorted(users)
        if addresses:
            raise RuleViolation(
                f"profile {name!r} still has mailboxes: {', '.join(addresses)}",
                fix="move or delete those mailboxes first", code="profile-in-use")
        await self.session.delete(row)

    async def mailbox_count(self, profile: str) -> int:
        row = await self._profile_row(profile)
        count = await self.session.scalar(
            select(func.count()).select_from(MailboxRow).where(MailboxRow.profile_id == row.id))
        return int(count or 0)

    # ------------------------------------------------------------ mailboxes

    def _mailbox(self, row: MailboxRow, profile_name: str) -> Mailbox:
        def state(prefix: str) -> ChannelState:
            return ChannelState(SyncMethod(getattr(row, f"{prefix}_method")),
                                bool(getattr(row, f"{prefix}_enabled")),
                                ChannelStatus(getattr(row, f"{prefix}_status")))
        return Mailbox(
            address=row.address, owner_kind=PartyKind(row.owner_kind), owner=row.owner,
            profile=profile_name, incoming=state("incoming"), outgoing=state("outgoing"),
            act=state("act"), allow_credentials=row.allow_credentials, username=row.username,
            secret=self._open(row.secret, "mailboxes.secret"),
            approval=ApprovalStatus(row.approval), process_email_from=utc(row.process_email_from),
            after_processing=AfterProcessing(row.after_processing),
            after_processing_folder=row.after_processing_folder,
            tracking_rule=TrackingRule(row.tracking_rule), folders=tuple(row.folders),
            track_sent=row.track_sent, name=row.name, last_tested_at=utc(row.last_tested_at),
            id=row.id)

    async def _mailbox_row(self, address: str) -> tuple[MailboxRow, str]:
        result = (await self.session.execute(
            select(MailboxRow, ProfileRow.name).join(ProfileRow)
            .where(MailboxRow.address == address.strip().lower()))).first()
        if result is None:
            raise NotFound(f"no mailbox {address!r}", fix="list them with: serversync mailbox list")
        return result[0], result[1]

    async def get_mailbox(self, address: str) -> Mailbox:
        row, profile = await self._mailbox_row(address)
        return self._mailbox(row, profile)

    async def find_mailbox(self, address: str) -> Mailbox | None:
        try:
            return await self.get_mailbox(address)
        except NotFound:
            return None

    async def get_mailbox_by_id(self, mailbox_id: int) -> Mailbox:
        result = (await self.session.execute(
            select(MailboxRow, ProfileRow.name).join(ProfileRow)
            .where(MailboxRow.id == mailbox_id))).first()
        if result is None:
            raise NotFound(f"no mailbox with id {mailbox_id}")
        return self._mailbox(result[0], result[1])

    async def list_mailboxes(self, profile: str | None = None) -> list[Mailbox]:
        query = select(MailboxRow, ProfileRow.name).join(ProfileRow).order_by(MailboxRow.address)
        if profile is not None:
            query = query.where(ProfileRow.name == profile)
        return [self._mailbox(m, p) for m, p in (await self.session.execute(query)).all()]

    async def save_mailbox(self, mailbox: Mailbox) -> Mailbox:
        """Insert or update by address."""
        profile_row = await self._profile_row(mailbox.profile)
        row = await self.session.scalar(
            select(MailboxRow).where(MailboxRow.address == mailbox.address))
        if row is None:
            row = MailboxRow(address=mailbox.address)
            self.session.add(row)
        row.profile_id = profile_row.id
        row.name, row.owner_kind, row.owner = mailbox.name, mailbox.owner_kind.value, mailbox.owner
        for prefix in ("incoming", "outgoing", "act"):
            state: ChannelState = getattr(mailbox, prefix)
            setattr(row, f"{prefix}_method", state.method.value)
            setattr(row, f"{prefix}_enabled", state.enabled)
            setattr(row, f"{prefix}_status", state.status.value)
        row.allow_credentials, row.username = mailbox.allow_credentials, mailbox.username
        row.secret = self._seal(mailbox.secret, "mailboxes.secret")
        row.approval = mailbox.approval.value
        row.process_email_from = mailbox.process_email_from
        row.after_processing = mailbox.after_processing.value
        row.after_processing_folder = mailbox.after_processing_folder
        row.tracking_rule = mailbox.tracking_rule.value
        row.folders, row.track_sent = list(mailbox.folders), mailbox.track_sent
        row.last_tested_at = mailbox.last_tested_at
        await self.session.flush()
        return dataclasses.replace(mailbox, id=row.id)

    async def set_mailbox_secret(self, address: str, secret: Secret) -> None:
        """Replace the mailbox's secret (a new sign-in), leaving everything else as it is."""
        row, _ = await self._mailbox_row(address)
        row.secret = self._seal(secret, "mailboxes.secret")
        await self.session.flush()

    async def swap_mailbox_secret(self, address: str, expected: Sequence[Secret],
                                  new: Secret) -> bool:
        """Store ``new`` as the mailbox's secret if the stored one is one of ``expected``
        (compare-and-set: a rotated OAuth refresh token never overwrites a newer sign-in)."""
        row = await self.session.scalar(
            select(MailboxRow).where(MailboxRow.address == address).with_for_update())
        if row is None:
            return False
        current = self._open(row.secret, "mailboxes.secret")
        if current is None or current not in expected:
            return False
        row.secret = self._seal(new, "mailboxes.secret")
        await self.session.flush()
        return True

    async def delete_mailbox(self, address: str) -> None:
        row, _ = await self._mailbox_row(address)
        await self.session.delete(row)

    async def set_channel(self, address: str, channel: Channel, *, enabled: bool | None = None,
                          status: ChannelStatus | None = None) -> None:
        values: dict[str, Any] = {}
        if enabled is not None:
            values[f"{channel.value}_enabled"] = enabled
        if status is not None:
            values[f"{channel.value}_status"] = status.value
        if values:
            await self.session.execute(
                update(MailboxRow).where(MailboxRow.address == address).values(**values))

    # ------------------------------------------------------------ directory

    @staticmethod
    def _party(row: PartyRow) -> Party:
        return Party(PartyKind(row.kind), row.key, row.name,
                     tuple(e.address for e in row.emails), TrackingRule(row.tracking_rule),
                     id=row.id)

    async def save_party(self, party: Party) -> Party:
        row = await self.session.scalar(
            select(PartyRow).where(PartyRow.kind == party.kind.value, PartyRow.key == party.key))
        wanted = list(dict.fromkeys(a.strip().lower() for a in party.emails))
        if row is None:
            row = PartyRow(kind=party.kind.value, key=party.key, emails=[
                PartyEmailRow(address=a, position=i) for i, a in enumerate(wanted)])
            self.session.add(row)
        row.name, row.tracking_rule = party.name, party.tracking_rule.value
        if [e.address for e in row.emails] != wanted:
            row.emails.clear()
            await self.session.flush()  # delete the old rows before inserting the new ones
            row.emails.extend(PartyEmailRow(address=a, position=i) for i, a in enumerate(wanted))
        await self.session.flush()
        return dataclasses.replace(party, id=row.id, emails=tuple(wanted))

    async def list_parties(self, kind: PartyKind | None = None) -> list[Party]:
        query = select(PartyRow).order_by(PartyRow.kind, PartyRow.key)
        if kind is not None:
            query = query.where(PartyRow.kind == kind.value)
        return [self._party(r) for r in await self.session.scalars(query)]

    async def get_party(self, kind: PartyKind, key: str) -> Party | None:
        row = await self.session.scalar(
            select(PartyRow).where(PartyRow.kind == kind.value, PartyRow.key == key))
        return None if row is None else self._party(row)

    async def delete_party(self, kind: PartyKind, key: str) -> None:
        await self.session.execute(
            delete(PartyRow).where(PartyRow.kind == kind.value, PartyRow.key == key))

    async def parties_by_address(self, addresses: Iterable[str]) -> dict[str, list[Party]]:
        """Every directory record for each address (one query), for resolution."""
        wanted = {a.strip().lower() for a in addresses}
        if not wanted:
            return {}
        rows = await self.session.execute(
            select(PartyEmailRow.address, PartyRow).join(PartyRow)
            .where(PartyEmailRow.address.in_(wanted)))
        found: dict[str, list[Party]] = {a: [] for a in wanted}
        for address, party in rows.all():
            found[address].append(self._party(party))
        return found

    # ------------------------------------------------------------ alerts

    async def add_alert(self, alert: Alert) -> Alert:
        mailbox_id = profile_id = None
        if alert.mailbox:
            row, _ = await self._mailbox_row(alert.mailbox)
            mailbox_id, profile_id = row.id, row.profile_id
        elif alert.profile:
            profile_id = (await self._profile_row(alert.profile)).id
        stored = AlertRow(severity=alert.severity.value, code=alert.code, message=alert.message,
                          fix=alert.fix, mailbox_id=mailbox_id, profile_id=profile_id,
                          channel=alert.channel.value if alert.channel else None,
                          created_at=alert.created_at)
        self.session.add(stored)
        await self.session.flush()
        return dataclasses.replace(alert, id=stored.id)

    async def list_alerts(self, *, mailbox: str | None = None, profile: str | None = None,
                          include_resolved: bool = False, limit: int = 200) -> list[Alert]:
        query = (select(AlertRow, MailboxRow.address, ProfileRow.name)
                 .outerjoin(MailboxRow, AlertRow.mailbox_id == MailboxRow.id)
                 .outerjoin(ProfileRow, AlertRow.profile_id == ProfileRow.id)
                 .order_by(AlertRow.created_at.desc(), AlertRow.id.desc()).limit(limit))
        if mailbox is not None:
            query = query.where(MailboxRow.address == mailbox.strip().lower())
        if profile is not None:
            query = query.where(ProfileRow.name == profile)
        if not include_resolved:
            query = query.where(AlertRow.resolved_at.is_(None))
        return [Alert(Severity(a.severity), a.code, a.message, a.fix, mailbox=m, profile=p,
                      channel=_enum(Channel, a.channel), created_at=utc(a.created_at) or a.created_at,
                      id=a.id)
                for a, m, p in (await self.session.execute(query)).all()]

    async def resolve_alerts(self, mailbox: str, channel: Channel | None = None) -> None:
        """Mark a mailbox's open alerts resolved (after a successful test or sync)."""
        row, _ = await self._mailbox_row(mailbox)
        query = update(AlertRow).where(AlertRow.mailbox_id == row.id,
                                       AlertRow.resolved_at.is_(None))
        if channel is not None:
            query = query.where(AlertRow.channel == channel.value)
        await self.session.execute(query.values(resolved_at=dt.datetime.now(dt.UTC)))

    # ------------------------------------------------------------ settings

    async def get_settings(self) -> OrgSettings:
        stored = {r.key: r.value["v"] for r in await self.session.scalars(select(SettingRow))}
        known = {f.name for f in dataclasses.fields(OrgSettings)}
        return OrgSettings(**{k: v for k, v in stored.items() if k in known})

    async def save_settings(self, settings: OrgSettings) -> None:
        for f in dataclasses.fields(OrgSettings):
            await self.session.merge(SettingRow(key=f.name, value={"v": getattr(settings, f.name)}))
        await self.session.flush()

    # ------------------------------------------------------------ key rotation

    async def reencrypt_all(self, old: Keyring) -> int:
        """Decrypt every secret column with ``old`` and seal it again with our keyring."""
        count = 0
        for table, columns in SECRET_COLUMNS.items():
            for row in await self.session.scalars(select(table)):
                for name in columns:
                    value = getattr(row, name)
                    if value is not None:
                        column = f"{table.__tablename__}.{name}"
                        sealed = self.keyring.encrypt(old.decrypt(value, column), column)
                        setattr(row, name, sealed)
                        count += 1
        await self.session.flush()
        return count

