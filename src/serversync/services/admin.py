"""The use cases: configure profiles and mailboxes, apply a config file, Test & Enable.

Each use case runs in one transaction (`store.db.Database.transaction`): it validates
everything first, with the seed's rules from `core.rules`, and writes all or nothing. The
CLI, the REST API and the runtime call these functions; none of them touch tables.
Connectors are reached only through the `Prober` registry given at construction
(`serversync.wiring` builds it), so tests and the demo can pass their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import Prober
from serversync.core import rules
from serversync.core.errors import ConfigError, NotFound, RuleViolation, SyncError, TransientError
from serversync.core.model import (
    Alert,
    ApprovalStatus,
    Channel,
    ChannelState,
    ChannelStatus,
    Mailbox,
    OrgSettings,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    Severity,
    SyncMethod,
)
from serversync.core.signin import SignIn
from serversync.core.times import utcnow as utcnow  # re-exported: the services import it here
from serversync.manifest import (
    MailboxSpec,
    Manifest,
    ProfileSpec,
    mailbox_to_spec,
    profile_to_spec,
    validate,
)
from serversync.services import consent
from serversync.services.channels import ChannelJob, RunSummary
from serversync.store.db import Database
from serversync.store.repos import Repository

Clock = Callable[[], dt.datetime]
ProberRegistry = Mapping[tuple[ServerKind, Channel], Prober]


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """The outcome of testing one channel of one mailbox."""

    channel: Channel
    ok: bool
    summary: str
    code: str = ""
    fix: str = ""


@dataclass(frozen=True, slots=True)
class TestReport:
    mailbox: str
    results: tuple[ChannelResult, ...]

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProfileReach:
    """The blast radius of a profile's service account (the seed's warning, in numbers)."""

    profile: str
    uses_service_account: bool
    mailboxes: int
    scope: tuple[str, ...]


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a partial update: nested mappings (endpoints) merge field by field."""
    merged = dict(base)
    for key, value in changes.items():
        old = merged.get(key)
        merged[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) \
            else value
    return merged


def connect_options(profile: Profile) -> ConnectOptions:
    return ConnectOptions(timeout=profile.connection_timeout_s, ca_file=profile.ca_file,
                          shared_namespace=profile.shared_namespace)


class Services:
    """Every configuration and health use case, over one database."""

    def __init__(self, db: Database, probers: ProberRegistry,
                 jobs: Mapping[Channel, ChannelJob] | None = None,
                 clock: Clock = utcnow) -> None:
        self.db = db
        self.probers = probers
        self.jobs: dict[Channel, ChannelJob] = dict(jobs or {})
        self.clock = clock
        # device-code sign-ins: real time, as Microsoft's codes expire in real time
        self.sign_ins = consent.SignIns(db, connect_options)

    async def run_channel(self, address: str, channel: Channel) -> RunSummary:
        """Run one channel of one mailbox once (the runtime's unit of work)."""
        job = self.jobs.get(channel)
        if job is None:
            raise RuleViolation(f"no {channel.value} sync is installed",
                                code="connector-unavailable")
        try:
            return await job(address)
        finally:
            await consent.save_rotated(self.db)  # renewed sign-ins survive a restart

    async def sign_in(self, address: str, on_code: Callable[[SignIn], None], *,
                      by: str = "cli") -> str:
        """A user's own sign-in for an Exchange Online mailbox, waited for here (the CLI).

        The REST API and the admin UI use `sign_ins` (start, then read the state).
        """
        return await self.sign_ins.sign_in(address, on_code, by=by)

    # ------------------------------------------------------------ profiles

    async def list_profiles(self) -> list[Profile]:
        async with self.db.transaction() as repo:
            return await repo.list_profiles()

    async def get_profile(self, name: str) -> Profile:
        async with self.db.transaction() as repo:
            return await repo.get_profile(name)

    async def create_profile(self, spec: ProfileSpec) -> Profile:
        async with self.db.transaction() as repo:
            if await repo.find_profile(spec.name) is not None:
                raise RuleViolation(f"profile {spec.name!r} already exists",
                                    fix="use `profile update`, or `apply` to create-or-update",
                                    code="exists")
            return await repo.save_profile(spec.to_core())

    async def update_profile(self, name: str, changes: Mapping[str, Any]) -> Profile:
        async with self.db.transaction() as repo:
            existing = await repo.get_profile(name)
            spec: ProfileSpec = validate(ProfileSpec, merge(profile_to_spec(existing), changes))
            return await self._save_profile(repo, spec, existing)

    async def _save_profile(self, repo: Repository, spec: ProfileSpec,
                            existing: Profile | None) -> Profile:
        profile = spec.to_core(existing)
        if existing is not None and existing.name != profile.name:
            raise RuleViolation("a profile cannot be renamed", code="rename")
        if existing is not None:
            mailboxes = await repo.list_mailboxes(profile.name)
            rules.delegation_conflicts(profile, mailboxes)
            for mailbox in mailboxes:
                rules.validate_mailbox(profile, mailbox)
        return await repo.save_profile(profile)

    async def delete_profile(self, name: str) -> None:
        async with self.db.transaction() as repo:
            await repo.delete_profile(name)

    async def reach(self, name: str) -> ProfileReach:
        async with self.db.transaction() as repo:
            profile = await repo.get_profile(name)
            count = await repo.mailbox_count(name)
        return ProfileReach(name, rules.uses_service_account(profile), count,
                            profile.impersonation_scope)

    # ------------------------------------------------------------ mailboxes

    async def list_mailboxes(self, profile: str | None = None) -> list[Mailbox]:
        async with self.db.transaction() as repo:
            return await repo.list_mailboxes(profile)

    async def get_mailbox(self, address: str) -> Mailbox:
        async with self.db.transaction() as repo:
            return await repo.get_mailbox(address)

    async def create_mailbox(self, spec: MailboxSpec) -> Mailbox:
        async with self.db.transaction() as repo:
            if await repo.find_mailbox(spec.address) is not None:
                raise RuleViolation(f"mailbox {spec.address} already exists",
                                    fix="use `mailbox update`", code="exists")
            return await self._save_mailbox(repo, spec, None)

    async def update_mailbox(self, address: str, changes: Mapping[str, Any]) -> Mailbox:
        async with self.db.transaction() as repo:
            existing = await repo.get_mailbox(address)
            merged = merge(mailbox_to_spec(existing), changes)
            spec: MailboxSpec = validate(MailboxSpec, merged)
            if spec.address != existing.address:
                raise RuleViolation("a mailbox's address cannot be changed; create a new one",
                                    code="rename")
            return await self._save_mailbox(repo, spec, existing)

    async def _save_mailbox(self, repo: Repository, spec: MailboxSpec,
                            existing: Mailbox | None) -> Mailbox:
        mailbox = spec.to_core(existing)
        profile = await repo.get_profile(mailbox.profile)
        rules.validate_mailbox(profile, mailbox)
        owner = await repo.get_party(mailbox.owner_kind, mailbox.owner)
        if owner is None:
            raise NotFound(
                f"mailbox {mailbox.address}: no {mailbox.owner_kind.value} {mailbox.owner!r} "
                "in the directory",
                fix=f"add the {mailbox.owner_kind.value} to the directory first")
        if existing is not None and existing.profile != mailbox.profile:
            # Another profile means other credentials: every channel must be tested again.
            mailbox = dataclasses.replace(
                mailbox, incoming=ChannelState(mailbox.incoming.method),
                outgoing=ChannelState(mailbox.outgoing.method), act=ChannelState(mailbox.act.method))
        return await repo.save_mailbox(mailbox)

    async def delete_mailbox(self, address: str) -> None:
        async with self.db.transaction() as repo:
            await repo.delete_mailbox(address)

    async def set_approval(self, address: str, approval: ApprovalStatus) -> Mailbox:
        """Approve or reject a mailbox's address. Rejecting also disables every channel."""
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            changed = dataclasses.replace(mailbox, approval=approval)
            if approval is not ApprovalStatus.APPROVED:
                changed = dataclasses.replace(
                    changed, incoming=dataclasses.replace(mailbox.incoming, enabled=False),
                    outgoing=dataclasses.replace(mailbox.outgoing, enabled=False),
                    act=dataclasses.replace(mailbox.act, enabled=False))
            return await repo.save_mailbox(changed)

    # ------------------------------------------------------------ directory and settings

    async def save_party(self, party: Party) -> Party:
        async with self.db.transaction() as repo:
            return await repo.save_party(party)

    async def list_parties(self, kind: PartyKind | None = None) -> list[Party]:
        async with self.db.transaction() as repo:
            return await repo.list_parties(kind)

    async def settings(self) -> OrgSettings:
        async with self.db.transaction() as repo:
            return await repo.get_settings()

    async def save_settings(self, settings: OrgSettings) -> None:
        async with self.db.transaction() as repo:
            await repo.save_settings(settings)

    # ------------------------------------------------------------ apply

    async def apply(self, manifest: Manifest) -> ApplyReport:
        """Create or update everything in ``manifest`` in one transaction (idempotent)."""
        report = ApplyReport()

        def note(kind: str, key: str, before: object, after: object) -> None:
            label = f"{kind} {key}"
            if before is None:
                report.created.append(label)
            elif before != after:
                report.updated.append(label)
            else:
                report.unchanged.append(label)

        async with self.db.transaction() as repo:
            if manifest.settings is not None:
                before_settings = await repo.get_settings()
                settings = manifest.settings.to_core()
                await repo.save_settings(settings)
                note("settings", "org", before_settings, settings)
            for i, party_spec in enumerate(manifest.directory):
                party = party_spec.to_core()
                old = await repo.get_party(party.kind, party.key)
                saved = await self._with_prefix(f"directory[{i}]", repo.save_party(party))
                note(party.kind.value, party.key, old and dataclasses.replace(old, id=None),
                     dataclasses.replace(saved, id=None))
            for i, profile_spec in enumerate(manifest.profiles):
                old_profile = await repo.find_profile(profile_spec.name)
                saved_profile = await self._with_prefix(
                    f"profiles[{i}]", self._save_profile(repo, profile_spec, old_profile))
                note("profile", saved_profile.name, old_profile, saved_profile)
            for i, mailbox_spec in enumerate(manifest.mailboxes):
                old_mailbox = await repo.find_mailbox(mailbox_spec.address)
                saved_mailbox = await self._with_prefix(
                    f"mailboxes[{i}]", self._save_mailbox(repo, mailbox_spec, old_mailbox))
                note("mailbox", saved_mailbox.address, old_mailbox, saved_mailbox)
            for profile in await repo.list_profiles():
                rules.delegation_conflicts(profile, await repo.list_mailboxes(profile.name))
        return report

    @staticmethod
    async def _with_prefix(prefix: str, work: Any) -> Any:
        """Name the config entry an error came from (``profiles[1].service_user: ...``)."""
        try:
            return await work
        except ConfigError as exc:
            exc.field = f"{prefix}.{exc.field}" if exc.field else prefix
            exc.message = f"{exc.field}: {exc.message.split(': ', 1)[-1]}"
            raise
        except SyncError as exc:
            exc.message = f"{prefix}: {exc.message}"
            raise

    # ------------------------------------------------------------ Test & Enable

    async def test_enable(self, address: str) -> TestReport:
        """Connect for real on every server-side channel; record status, enablement, alerts."""
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            profile = await repo.get_profile(mailbox.profile)
            settings = await repo.get_settings()
        channels = [c for c in Channel if mailbox.channel(c).method is SyncMethod.SERVER_SIDE]
        if not channels:
            raise RuleViolation(f"mailbox {address} syncs nothing: every channel's method is none",
                                fix="set incoming, outgoing or act to server-side first",
                                code="nothing-to-test")
        results = await asyncio.gather(
            *(self._test_channel(settings, profile, mailbox, c) for c in channels))
        await consent.save_rotated(self.db)
        now = self.clock()
        async with self.db.transaction() as repo:
            current = await repo.get_mailbox(address)
            for result in results:
                await repo.set_channel(
                    current.address, result.channel, enabled=result.ok,
                    status=ChannelStatus.SUCCESS if result.ok else ChannelStatus.FAILURE)
                await repo.resolve_alerts(current.address, result.channel)
                if not result.ok:
                    await repo.add_alert(Alert(
                        Severity.ERROR, result.code, result.summary, result.fix,
                        mailbox=current.address, profile=profile.name, channel=result.channel,
                        created_at=now))
            fresh = await repo.get_mailbox(address)
            await repo.save_mailbox(dataclasses.replace(fresh, last_tested_at=now))
        return TestReport(address, tuple(results))

    async def _test_channel(self, settings: OrgSettings, profile: Profile, mailbox: Mailbox,
                            channel: Channel) -> ChannelResult:
        problem = rules.enable_problems(settings, profile, mailbox, channel)
        if problem is not None:
            return ChannelResult(channel, False, problem.message, problem.code, problem.fix)
        prober = self.probers.get((profile.kind, channel))
        if prober is None:
            return ChannelResult(
                channel, False,
                f"no {channel.value} connector is installed for {profile.kind.value} servers",
                "connector-unavailable", "upgrade serversync, or set this channel to none")
        try:
            login = rules.login_for(profile, mailbox, channel)
            options = connect_options(profile)
            result = await asyncio.wait_for(
                prober(profile, mailbox, channel, login, options),
                profile.connection_timeout_s * 3)
        except SyncError as exc:
            return ChannelResult(channel, False, exc.message, exc.code, exc.fix)
        except TimeoutError:
            error = TransientError(f"{channel.value} test of {mailbox.address} took too long",
                                   fix="check the server and the profile's connection timeout",
                                   code="timeout")
            return ChannelResult(channel, False, error.message, error.code, error.fix)
        return ChannelResult(channel, True, result.summary)

    async def test_enable_profile(self, name: str) -> list[TestReport]:
        """Test & Enable every mailbox of a profile, at most max_concurrent_connections at once."""
        async with self.db.transaction() as repo:
            profile = await repo.get_profile(name)
            mailboxes = await repo.list_mailboxes(name)
        gate = asyncio.Semaphore(profile.max_concurrent_connections)

        async def one(mailbox: Mailbox) -> TestReport:
            async with gate:
                try:
                    return await self.test_enable(mailbox.address)
                except SyncError as exc:
                    return TestReport(mailbox.address, (ChannelResult(
                        Channel.INCOMING, False, exc.message, exc.code, exc.fix),))
        return list(await asyncio.gather(*(one(m) for m in mailboxes)))

    # ------------------------------------------------------------ alerts

    async def alerts(self, *, mailbox: str | None = None, profile: str | None = None,
                     include_resolved: bool = False) -> list[Alert]:
        async with self.db.transaction() as repo:
            return await repo.list_alerts(mailbox=mailbox, profile=profile,
                                          include_resolved=include_resolved)
