"""serversync: server-side synchronization of mailboxes, calendars and contacts.

Readable tables by default (rich), ``--json`` for scripts. Every error is one line on stderr
that names the field or the object and says what to fix, with a non-zero exit code (2 for
bad input, 1 for everything else) and never a traceback. Secrets are never taken from the
command line (they would land in shell history and ``ps``): use ``--secret-env VAR`` or
``--secret-stdin``, or ``{env: VAR}`` in a config file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table

from serversync import wiring
from serversync.config import Settings
from serversync.core.errors import ConfigError, SyncError
from serversync.core.model import (
    Alert,
    ApprovalStatus,
    CredentialSource,
    Mailbox,
    Party,
    PartyKind,
    Profile,
    ServerKind,
    SyncMethod,
    TlsMode,
    TrackingRule,
)
from serversync.core.rules import access_mode
from serversync.core.secret import Secret
from serversync.core.signin import SignIn
from serversync.manifest import MailboxSpec, PartySpec, ProfileSpec, load_manifest, validate
from serversync.services import Services, TestReport
from serversync.services.quarantine import QuarantinedMessage, RetryResult, quarantine_of
from serversync.store import blobfiles, crypto

T = TypeVar("T")

HELP = """Server-side synchronization: keep users' and queues' mailboxes, calendars and
contacts in sync with your application's records.

Start with `serversync apply -f config.yaml` (profiles, mailboxes, directory), then
`serversync mailbox test-enable ADDRESS`. Settings come from SERVERSYNC_DATABASE_URL
(default: sqlite:///serversync.db) and SERVERSYNC_SECRET_KEY or SERVERSYNC_KEY_FILE.
"""

app = typer.Typer(help=HELP,
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
profile_app = typer.Typer(help="Email server profiles: connection settings and whose "
                          "credentials reach the mailboxes.", no_args_is_help=True)
mailbox_app = typer.Typer(help="Mailboxes of users and queues: channels, credentials, approval, "
                          "Test & Enable.", no_args_is_help=True)
directory_app = typer.Typer(help="Users, queues, contacts, accounts and leads with their email "
                            "addresses.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")
app.add_typer(mailbox_app, name="mailbox")
app.add_typer(directory_app, name="directory")

# Wide tables when piped into a file or a pager; the terminal's width otherwise.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


# ---------------------------------------------------------------- plumbing

def fail(exc: SyncError) -> None:
    err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True,
              markup=True, end="")
    err.print(f" [dim]— {exc.fix}[/]" if exc.fix else "", highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def run(work: Callable[[Services], Awaitable[T]]) -> T:
    """Build the services, run one use case, close the database; turn errors into one line."""
    async def main() -> T:
        services = await wiring.services(Settings.from_env())
        try:
            return await work(services)
        finally:
            await services.db.close()
    try:
        return asyncio.run(main())
    except SyncError as exc:
        fail(exc)
    except Exception as exc:
        if Settings.from_env().debug:
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} [dim]— set "
                  "SERVERSYNC_DEBUG=1 for a traceback and report it[/]", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1) from None
    raise AssertionError("unreachable")


def plain(value: Any) -> Any:
    """JSON-ready form of core objects; secrets become "set"."""
    if isinstance(value, Secret):
        return "set"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(plain(data), indent=2, sort_keys=False) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    grid = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*[str(plain(c)) if c is not None else "" for c in row])
    out.print(grid)


def details(title: str, data: dict[str, Any]) -> None:
    grid = Table(title=title, title_justify="left", show_header=False, box=None)
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in data.items():
        grid.add_row(key, "" if value is None else str(value))
    out.print(grid)


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set key=value``: the value is read as a YAML scalar or list (``[a, b]``)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(ConfigError(pair, "expected KEY=VALUE"))
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def read_secret(env: str | None, stdin: bool, field: str) -> Secret | None:
    if env:
        value = os.environ.get(env)
        if not value:
            fail(ConfigError(field, f"environment variable {env} is not set"))
        return Secret(value or "")
    if stdin:
        value = sys.stdin.readline().rstrip("\r\n")
        if not value:
            fail(ConfigError(field, "nothing was read from standard input"))
        return Secret(value)
    return None


def endpoint_changes(prefix: str, host: str | None, port: int | None,
                     tls: TlsMode | None) -> dict[str, Any]:
    part = {k: v for k, v in (("host", host), ("port", port), ("tls", tls)) if v is not None}
    return {prefix: part} if part else {}


# ---------------------------------------------------------------- output of core objects

def status_cell(mailbox: Mailbox, name: str) -> str:
    state = getattr(mailbox, name)
    if state.method is SyncMethod.NONE:
        return "-"
    mark = {"success": "[green]✔[/]", "failure": "[red]✘[/]", "not-run": "[dim]·[/]"}
    return f"{mark[state.status.value]} {state.status.value}{'' if state.enabled else ' (off)'}"


def show_profile(profile: Profile) -> dict[str, Any]:
    data = plain(profile)
    for name in ("service_secret", "outgoing_service_secret", "client_secret",
                 "client_certificate"):
        data[name] = "set" if getattr(profile, name) is not None else "not set"
    return dict(data)


def print_report(report: TestReport) -> None:
    for result in report.results:
        mark = "[green]✔[/]" if result.ok else "[red]✘[/]"
        out.print(f"{mark} {report.mailbox} {result.channel.value}: {result.summary}",
                  highlight=False, soft_wrap=True)
        if not result.ok and result.fix:
            out.print(f"    [bold]fix:[/] {result.fix}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- top-level commands

@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (every command also does this on start)."""
    run(lambda s: asyncio.sleep(0))
    out.print("schema is up to date")


@app.command("sweep-blobs")
def sweep_blobs(older_than: Annotated[float, typer.Option(
        help="Only files older than this many hours (a batch may still be committing).")]
        = 1.0) -> None:
    """Delete blob packs no row points at (left by a crash between writing and committing)."""
    async def work(s: Services) -> int:
        async with s.db.transaction() as repo:
            return await blobfiles.sweep_orphans(repo.session, older_than=older_than * 3600)
    out.print(f"removed {run(work)} orphan blob file(s)")


@app.command()
def apply(file: Annotated[Path, typer.Option("-f", "--file", help="YAML config file.")],
          as_json: JsonOpt = False) -> None:
    """Create or update profiles, mailboxes, the directory and settings from a config file.

    Idempotent: running it twice changes nothing the second time. Everything is validated
    first and written in one transaction, so a bad entry leaves the store untouched.
    """
    manifest = _checked(lambda: load_manifest(file))
    report = run(lambda s: s.apply(manifest))
    if as_json:
        emit_json(dataclasses.asdict(report))
        return
    for label, items in (("created", report.created), ("updated", report.updated),
                         ("unchanged", report.unchanged)):
        if items:
            out.print(f"[bold]{label}[/] ({len(items)}): {', '.join(items)}", soft_wrap=True)
    if not (report.created or report.updated or report.unchanged):
        out.print("nothing to apply")


def _checked(work: Callable[[], T]) -> T:
    try:
        return work()
    except SyncError as exc:
        fail(exc)
        raise AssertionError("unreachable") from None


@app.command()
def alerts(mailbox: Annotated[str | None, typer.Option(help="Only this mailbox.")] = None,
           profile: Annotated[str | None, typer.Option(help="Only this profile.")] = None,
           include_resolved: Annotated[bool, typer.Option("--all", help="Include resolved.")
                                       ] = False,
           as_json: JsonOpt = False) -> None:
    """Alerts: what went wrong and what to fix, newest first."""
    found: list[Alert] = run(lambda s: s.alerts(mailbox=mailbox, profile=profile,
                                                include_resolved=include_resolved))
    if as_json:
        emit_json(found)
        return
    table("Alerts", ["time", "severity", "mailbox", "channel", "code", "message", "fix"],
          [(a.created_at.strftime("%Y-%m-%d %H:%M:%S"), a.severity, a.mailbox or a.profile,
            a.channel, a.code, a.message, a.fix) for a in found])


@app.command("generate-key")
def generate_key(file: Annotated[Path, typer.Argument(help="Where to write the new key (0600).")]
                 ) -> None:
    """Write a new secret key to FILE with mode 0600 (never to the terminal)."""
    try:
        crypto.write_private(file, crypto.encode_key(crypto.new_key()))
    except FileExistsError:
        fail(ConfigError(str(file), "already exists; refusing to overwrite a key"))
    out.print(f"wrote a new key to {file}")


@app.command("rotate-key")
def rotate_key() -> None:
    """Re-encrypt every stored secret with a new key.

    With a key file: a new key is generated and installed (the old one is kept until every
    secret is re-encrypted, so a crash at any point leaves a readable database). With
    SERVERSYNC_SECRET_KEY: put the new key first (``NEW,OLD``), run this, then drop OLD.
    """
    settings = Settings.from_env()

    async def main() -> int:
        db = wiring.database(settings)
        try:
            await db.migrate()
            old = db.keyring
            if settings.secret_keys is None:
                new = crypto.new_key()
                crypto.install_rotated_key(settings.key_file, new, old.primary)
                db.keyring = crypto.load_keyring(None, settings.key_file)
            async with db.transaction() as repo:
                count = await repo.reencrypt_all(old)
            if settings.secret_keys is None:
                crypto.retire_old_keys(settings.key_file)
            return count
        finally:
            await db.close()
    try:
        count = asyncio.run(main())
    except SyncError as exc:
        fail(exc)
    out.print(f"re-encrypted {count} secrets with the new key")


# ---------------------------------------------------------------- profiles

@profile_app.command("list")
def profile_list(as_json: JsonOpt = False) -> None:
    """All profiles with their server, credential model and reach."""
    async def work(s: Services) -> list[tuple[Profile, int]]:
        return [(p, (await s.reach(p.name)).mailboxes) for p in await s.list_profiles()]
    found = run(work)
    if as_json:
        emit_json([{**show_profile(p), "mailboxes": n} for p, n in found])
        return
    table("Email server profiles", ["name", "kind", "incoming", "credentials", "access",
                                    "mailboxes", "scope"],
          [(p.name, p.kind, f"{p.incoming.host}:{p.incoming.port} ({p.incoming.tls})"
            if p.incoming else "", p.credential_source, _access(p), n,
            ", ".join(p.impersonation_scope) or ("unrestricted" if p.credential_source
                                                 is not CredentialSource.MAILBOX else ""))
           for p, n in found])


def _access(profile: Profile) -> str:
    return access_mode(profile).value


@profile_app.command("show")
def profile_show(name: str, as_json: JsonOpt = False) -> None:
    """One profile in full (secrets show only whether they are set)."""
    async def work(s: Services) -> tuple[Profile, int]:
        return await s.get_profile(name), (await s.reach(name)).mailboxes
    profile, count = run(work)
    data = {**show_profile(profile), "mailboxes": count}
    if as_json:
        emit_json(data)
        return
    details(f"Profile {profile.name}", {k: v for k, v in data.items() if v not in (None, [], "")})
    if profile.credential_source is not CredentialSource.MAILBOX:
        scope = ", ".join(profile.impersonation_scope) or "every mailbox on the server"
        out.print(f"\n[yellow]warning:[/] this profile's service account opens {count} "
                  f"mailbox(es) here and may reach {scope}; if it is compromised, all of them "
                  "are.", soft_wrap=True)


ProfileOpts = dict[str, Any]


def _profile_options(kind: ServerKind | None, incoming_host: str | None,
                     incoming_port: int | None, incoming_tls: TlsMode | None,
                     outgoing_host: str | None, outgoing_port: int | None,
                     outgoing_tls: TlsMode | None, credential_source: CredentialSource | None,
                     service_user: str | None, service_secret_env: str | None,
                     service_secret_stdin: bool, use_impersonation: bool | None,
                     scope: list[str] | None, dav_url: str | None, ca_file: str | None,
                     sets: list[str] | None, client_certificate_file: Path | None = None,
                     ) -> ProfileOpts:
    changes: ProfileOpts = parse_sets(sets or [])
    for key, value in (("kind", kind), ("credential_source", credential_source),
                       ("service_user", service_user), ("use_impersonation", use_impersonation),
                       ("dav_url", dav_url), ("ca_file", ca_file)):
        if value is not None:
            changes[key] = value
    if scope:
        changes["impersonation_scope"] = scope
    changes |= endpoint_changes("incoming", incoming_host, incoming_port, incoming_tls)
    changes |= endpoint_changes("outgoing", outgoing_host, outgoing_port, outgoing_tls)
    secret = read_secret(service_secret_env, service_secret_stdin, "service_secret")
    if secret is not None:
        changes["service_secret"] = secret.reveal()
    if client_certificate_file is not None:
        # A PEM spans many lines (no --…-stdin); the path on the command line is no secret.
        try:
            changes["client_certificate"] = client_certificate_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(ConfigError("client_certificate", f"cannot read {client_certificate_file} "
                             f"({getattr(exc, 'strerror', None) or exc.__class__.__name__})"))
    return changes


KindOpt = Annotated[ServerKind | None, typer.Option(help="Server kind.")]
HostOpt = Annotated[str | None, typer.Option()]
PortOpt = Annotated[int | None, typer.Option()]
TlsOpt = Annotated[TlsMode | None, typer.Option()]
SourceOpt = Annotated[CredentialSource | None, typer.Option(
    help="profile: one service account; mailbox: each mailbox's own; app: OAuth app-only.")]
UserOpt = Annotated[str | None, typer.Option(help="Service account user name.")]
SecretEnvOpt = Annotated[str | None, typer.Option(
    help="Read the service account's secret from this environment variable.")]
SecretStdinOpt = Annotated[bool, typer.Option(help="Read the secret from standard input.")]
ImpOpt = Annotated[bool | None, typer.Option(
    "--use-impersonation/--delegation",
    help="Service account acts as each user (impersonation) or as a delegate.")]
ScopeOpt = Annotated[list[str] | None, typer.Option(
    "--scope", help="Allowed domain or address for the service account (repeat).")]
DavOpt = Annotated[str | None, typer.Option(help="CalDAV/CardDAV root URL (ACT on IMAP).")]
CaOpt = Annotated[str | None, typer.Option(help="Extra CA certificate (PEM) to trust.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Any other profile field as KEY=VALUE (repeat).")]
CertOpt = Annotated[Path | None, typer.Option(
    help="exchange-online: PEM file with the app's certificate and private key (replaces "
         "client_secret).")]


@profile_app.command("create")
def profile_create(name: str, kind: KindOpt = None, incoming_host: HostOpt = None,
                   incoming_port: PortOpt = None, incoming_tls: TlsOpt = None,
                   outgoing_host: HostOpt = None, outgoing_port: PortOpt = None,
                   outgoing_tls: TlsOpt = None, credential_source: SourceOpt = None,
                   service_user: UserOpt = None, service_secret_env: SecretEnvOpt = None,
                   service_secret_stdin: SecretStdinOpt = False,
                   use_impersonation: ImpOpt = None, scope: ScopeOpt = None,
                   dav_url: DavOpt = None, ca_file: CaOpt = None, sets: SetOpt = None,
                   client_certificate_file: CertOpt = None, as_json: JsonOpt = False) -> None:
    """Create a profile."""
    data = {"name": name, **_profile_options(
        kind, incoming_host, incoming_port, incoming_tls, outgoing_host, outgoing_port,
        outgoing_tls, credential_source, service_user, service_secret_env,
        service_secret_stdin, use_impersonation, scope, dav_url, ca_file, sets,
        client_certificate_file)}
    spec: ProfileSpec = _checked(lambda: validate(ProfileSpec, data))
    profile = run(lambda s: s.create_profile(spec))
    _done("created", profile, as_json)


@profile_app.command("update")
def profile_update(name: str, kind: KindOpt = None, incoming_host: HostOpt = None,
                   incoming_port: PortOpt = None, incoming_tls: TlsOpt = None,
                   outgoing_host: HostOpt = None, outgoing_port: PortOpt = None,
                   outgoing_tls: TlsOpt = None, credential_source: SourceOpt = None,
                   service_user: UserOpt = None, service_secret_env: SecretEnvOpt = None,
                   service_secret_stdin: SecretStdinOpt = False,
                   use_impersonation: ImpOpt = None, scope: ScopeOpt = None,
                   dav_url: DavOpt = None, ca_file: CaOpt = None, sets: SetOpt = None,
                   client_certificate_file: CertOpt = None, as_json: JsonOpt = False) -> None:
    """Change some fields of a profile; the rest keep their values."""
    changes = _profile_options(
        kind, incoming_host, incoming_port, incoming_tls, outgoing_host, outgoing_port,
        outgoing_tls, credential_source, service_user, service_secret_env,
        service_secret_stdin, use_impersonation, scope, dav_url, ca_file, sets,
        client_certificate_file)
    profile = run(lambda s: s.update_profile(name, changes))
    _done("updated", profile, as_json)


def _done(verb: str, profile: Profile, as_json: bool) -> None:
    if as_json:
        emit_json(show_profile(profile))
    else:
        out.print(f"{verb} profile {profile.name} ({profile.kind.value}, "
                  f"{_access(profile)} access)")


@profile_app.command("delete")
def profile_delete(name: str) -> None:
    """Delete a profile that has no mailboxes."""
    run(lambda s: s.delete_profile(name))
    out.print(f"deleted profile {name}")


@profile_app.command("test-enable")
def profile_test_enable(name: str, as_json: JsonOpt = False) -> None:
    """Test & Enable every mailbox of a profile."""
    reports = run(lambda s: s.test_enable_profile(name))
    if as_json:
        emit_json([{"mailbox": r.mailbox, "ok": r.ok, "results": plain(r.results)}
                   for r in reports])
    else:
        for report in reports:
            print_report(report)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


# ---------------------------------------------------------------- mailboxes

@mailbox_app.command("list")
def mailbox_list(profile: Annotated[str | None, typer.Option(help="Only this profile.")] = None,
                 as_json: JsonOpt = False) -> None:
    """All mailboxes with approval and per-channel status."""
    found: list[Mailbox] = run(lambda s: s.list_mailboxes(profile))
    if as_json:
        emit_json(found)
        return
    table("Mailboxes", ["address", "owner", "profile", "approval", "incoming", "outgoing",
                        "act", "last tested"],
          [(m.address, f"{m.owner_kind.value}:{m.owner}", m.profile, m.approval,
            status_cell(m, "incoming"), status_cell(m, "outgoing"), status_cell(m, "act"),
            m.last_tested_at.strftime("%Y-%m-%d %H:%M") if m.last_tested_at else "never")
           for m in found])


@mailbox_app.command("show")
def mailbox_show(address: str, as_json: JsonOpt = False) -> None:
    """One mailbox in full, with its open alerts."""
    async def work(s: Services) -> tuple[Mailbox, list[Alert]]:
        return await s.get_mailbox(address), await s.alerts(mailbox=address)
    mailbox, open_alerts = run(work)
    data = plain(mailbox)
    data["secret"] = "set" if mailbox.secret is not None else "not set"
    if as_json:
        emit_json({**data, "alerts": plain(open_alerts)})
        return
    for channel in ("incoming", "outgoing", "act"):
        state = getattr(mailbox, channel)
        data[channel] = (f"{state.method.value}, {'enabled' if state.enabled else 'disabled'}, "
                         f"{state.status.value}")
    details(f"Mailbox {mailbox.address}", {k: v for k, v in data.items()
                                          if v not in (None, [], "")})
    for alert in open_alerts:
        out.print(f"[red]alert[/] {alert.channel.value if alert.channel else ''} "
                  f"{alert.code}: {alert.message}\n    [bold]fix:[/] {alert.fix}", soft_wrap=True)


def _mailbox_options(profile: str | None, owner: str | None, queue: bool | None,
                     incoming: SyncMethod | None, outgoing: SyncMethod | None,
                     act: SyncMethod | None, allow_credentials: bool | None,
                     username: str | None, secret_env: str | None, secret_stdin: bool,
                     tracking_rule: TrackingRule | None, sets: list[str] | None
                     ) -> dict[str, Any]:
    changes = parse_sets(sets or [])
    for key, value in (("profile", profile), ("owner", owner), ("incoming", incoming),
                       ("outgoing", outgoing), ("act", act),
                       ("allow_credentials", allow_credentials), ("username", username),
                       ("tracking_rule", tracking_rule)):
        if value is not None:
            changes[key] = value
    if queue is not None:
        changes["owner_kind"] = "queue" if queue else "user"
    secret = read_secret(secret_env, secret_stdin, "secret")
    if secret is not None:
        changes["secret"] = secret.reveal()
    return changes


ProfileNameOpt = Annotated[str | None, typer.Option(help="The mailbox's email server profile.")]
OwnerOpt = Annotated[str | None, typer.Option(help="Directory key of the owning user or queue.")]
QueueOpt = Annotated[bool | None, typer.Option("--queue/--user",
                                              help="Owned by a queue or by a user.")]
MethodOpt = Annotated[SyncMethod | None, typer.Option()]
AllowOpt = Annotated[bool | None, typer.Option(
    "--allow-credentials/--no-allow-credentials",
    help="Allow to Use Credentials for Email Processing.")]
LoginOpt = Annotated[str | None, typer.Option(help="Login name on the server.")]
RuleOpt = Annotated[TrackingRule | None, typer.Option(help="Which incoming mail is tracked.")]
MSetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Any other mailbox field as KEY=VALUE (repeat).")]


@mailbox_app.command("create")
def mailbox_create(address: str, profile: ProfileNameOpt = None, owner: OwnerOpt = None,
                   queue: QueueOpt = None, incoming: MethodOpt = None,
                   outgoing: MethodOpt = None, act: MethodOpt = None,
                   allow_credentials: AllowOpt = None, username: LoginOpt = None,
                   secret_env: SecretEnvOpt = None, secret_stdin: SecretStdinOpt = False,
                   tracking_rule: RuleOpt = None, sets: MSetOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Create a mailbox."""
    data = {"address": address, **_mailbox_options(
        profile, owner, queue, incoming, outgoing, act, allow_credentials, username,
        secret_env, secret_stdin, tracking_rule, sets)}
    spec: MailboxSpec = _checked(lambda: validate(MailboxSpec, data))
    mailbox = run(lambda s: s.create_mailbox(spec))
    _mailbox_done("created", mailbox, as_json)


@mailbox_app.command("update")
def mailbox_update(address: str, profile: ProfileNameOpt = None, owner: OwnerOpt = None,
                   queue: QueueOpt = None, incoming: MethodOpt = None,
                   outgoing: MethodOpt = None, act: MethodOpt = None,
                   allow_credentials: AllowOpt = None, username: LoginOpt = None,
                   secret_env: SecretEnvOpt = None, secret_stdin: SecretStdinOpt = False,
                   tracking_rule: RuleOpt = None, sets: MSetOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Change some fields of a mailbox; the rest keep their values."""
    changes = _mailbox_options(profile, owner, queue, incoming, outgoing, act,
                               allow_credentials, username, secret_env, secret_stdin,
                               tracking_rule, sets)
    mailbox = run(lambda s: s.update_mailbox(address, changes))
    _mailbox_done("updated", mailbox, as_json)


def _mailbox_done(verb: str, mailbox: Mailbox, as_json: bool) -> None:
    if as_json:
        emit_json(mailbox)
    else:
        out.print(f"{verb} mailbox {mailbox.address} on profile {mailbox.profile} "
                  f"(approval: {mailbox.approval.value})")


@mailbox_app.command("delete")
def mailbox_delete(address: str) -> None:
    """Delete a mailbox (its alerts go with it)."""
    run(lambda s: s.delete_mailbox(address))
    out.print(f"deleted mailbox {address}")


@mailbox_app.command("approve")
def mailbox_approve(address: str) -> None:
    """Approve a mailbox's email address so that it may be processed."""
    mailbox = run(lambda s: s.set_approval(address, ApprovalStatus.APPROVED))
    out.print(f"approved {mailbox.address}")


@mailbox_app.command("reject")
def mailbox_reject(address: str) -> None:
    """Reject a mailbox's email address; every channel is disabled."""
    mailbox = run(lambda s: s.set_approval(address, ApprovalStatus.REJECTED))
    out.print(f"rejected {mailbox.address}; its channels are disabled")


@mailbox_app.command("test-enable")
def mailbox_test_enable(address: str, as_json: JsonOpt = False) -> None:
    """Connect for real on each server-side channel; enable what works, alert on what fails."""
    report = run(lambda s: s.test_enable(address))
    if as_json:
        emit_json({"mailbox": report.mailbox, "ok": report.ok, "results": plain(report.results)})
    else:
        print_report(report)
    if not report.ok:
        raise typer.Exit(1)


@mailbox_app.command("sign-in")
def mailbox_sign_in(address: str) -> None:
    """Let the mailbox's user sign in to Exchange Online (their own consent, no password).

    Shows a code; the user opens Microsoft's page on any device, enters it and signs in.
    The refresh token that results is stored encrypted as the mailbox's secret.
    """
    def show(code: SignIn) -> None:
        out.print(code.message or f"To sign in, open {code.verification_uri} and enter the "
                  f"code {code.user_code}", highlight=False, soft_wrap=True)
        out.print("[dim]waiting for the sign-in…[/]")
    who = run(lambda s: s.sign_in(address, show, by=_actor()))
    out.print(f"signed in as {who}; run: serversync mailbox test-enable {address}",
              highlight=False)


# ---------------------------------------------------------------- directory

@directory_app.command("list")
def directory_list(kind: Annotated[PartyKind | None, typer.Option(help="Only this kind.")] = None,
                   as_json: JsonOpt = False) -> None:
    """Directory records and their addresses."""
    found: list[Party] = run(lambda s: s.list_parties(kind))
    if as_json:
        emit_json(found)
        return
    table("Directory", ["kind", "key", "name", "emails", "tracking rule"],
          [(p.kind, p.key, p.name, ", ".join(p.emails),
            p.tracking_rule if p.kind in (PartyKind.USER, PartyKind.QUEUE) else "")
           for p in found])


@directory_app.command("add")
def directory_add(kind: PartyKind, key: str,
                  name: Annotated[str, typer.Option(help="Display name.")] = "",
                  email: Annotated[list[str] | None, typer.Option(help="Address (repeat).")
                                   ] = None,
                  tracking_rule: RuleOpt = None) -> None:
    """Add or update a user, queue, contact, account, lead or other record."""
    data: dict[str, Any] = {"kind": kind, "key": key, "name": name, "emails": email or []}
    if tracking_rule is not None:
        data["tracking_rule"] = tracking_rule
    spec: PartySpec = _checked(lambda: validate(PartySpec, data))
    party = run(lambda s: s.save_party(spec.to_core()))
    out.print(f"saved {party.kind.value} {party.key} ({', '.join(party.emails)})")


from serversync import service_commands  # noqa: E402  (serve, worker, sync)

service_commands.register(app, run, fail, out)


# ---------------------------------------------------------------- API tokens

token_app = typer.Typer(help="API tokens for the REST API and the admin UI (roles: admin, "
                        "reader).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(name: str,
                 role: Annotated[str, typer.Option(help="admin (everything) or reader "
                                                        "(GET only).")] = "reader") -> None:
    """Create a token and print it ONCE (only its hash is stored)."""
    from serversync.core.access import Role
    from serversync.services.tokens import Tokens
    if role not in ("admin", "reader"):
        fail(ConfigError("--role", "must be admin or reader"))
    created = run(lambda s: Tokens(s.db).create(name, Role(role)))
    err.print(f"created {role} token {name!r}; copy it now, it is not shown again:",
              highlight=False)
    sys.stdout.write(created.value + "\n")


@token_app.command("list")
def token_list(include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked.")
                                          ] = False, as_json: JsonOpt = False) -> None:
    """Tokens with their role and when they were last used (never the tokens themselves)."""
    from serversync.services.tokens import Tokens
    found = run(lambda s: Tokens(s.db).all(include_revoked=include_revoked))
    if as_json:
        emit_json([{k: v for k, v in dataclasses.asdict(t).items() if k != "id"} for t in found])
        return
    table("API tokens", ["name", "role", "prefix", "created", "last used", "revoked"],
          [(t.name, t.role, t.prefix + "…", t.created_at.strftime("%Y-%m-%d %H:%M"),
            t.last_used_at.strftime("%Y-%m-%d %H:%M") if t.last_used_at else "never",
            t.revoked_at.strftime("%Y-%m-%d %H:%M") if t.revoked_at else "") for t in found])


@token_app.command("revoke")
def token_revoke(name: str) -> None:
    """Revoke a token at once (its admin UI sessions end too)."""
    from serversync.services.tokens import Tokens
    run(lambda s: Tokens(s.db).revoke(name))
    out.print(f"revoked token {name!r}")


# ---------------------------------------------------------------- quarantine

quarantine_app = typer.Typer(help="Incoming messages that could not be tracked, kept with their "
                             "raw bytes: list, show, export, retry once fixed, or discard.",
                             no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")
QIdArg = Annotated[str, typer.Argument(metavar="ID", help="The quarantine id (see `list`).")]


def _actor() -> str:
    """Who did it, for the row's ``released_by``: the operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in the environment or the passwd file
        return "cli"


def _quarantine_id(value: str) -> int:
    if not (value.isascii() and value.isdigit() and int(value) > 0):
        fail(ConfigError("ID", f"must be a quarantine id (a positive whole number), got "
                               f"{value!r}", fix="see the ids: serversync quarantine list"))
    return int(value)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _released(q: QuarantinedMessage) -> str:
    if q.released_at is None:
        return f"quarantined{f' (retried {q.retries}x)' if q.retries else ''}"
    return f"{q.outcome} by {q.released_by} {_when(q.released_at)}"


@quarantine_app.command("list")
def quarantine_list(mailbox: Annotated[str | None, typer.Option(help="Only this mailbox.")
                                       ] = None,
                    include_released: Annotated[bool, typer.Option(
                        "--all", help="Include messages retried or discarded already.")
                                                ] = False,
                    limit: Annotated[int, typer.Option(min=1, max=10000,
                                                       help="At most this many, newest first.")
                                     ] = 200,
                    as_json: JsonOpt = False) -> None:
    """Quarantined incoming messages, newest first."""
    found = run(lambda s: quarantine_of(s).messages(
        mailbox=mailbox, include_released=include_released, limit=limit))
    if as_json:
        emit_json(found)
        return
    columns = ["id", "mailbox", "folder", "size", "code", "reason", "when"]
    table("Quarantine" + (" (all)" if include_released else ""),
          [*columns, "status"] if include_released else columns,
          [(q.id, q.mailbox, q.folder, _size(q.size), q.code, q.reason, _when(q.created_at),
            *([_released(q)] if include_released else [])) for q in found])
    if not found:
        out.print("nothing in quarantine" if not include_released else "no quarantined mail")


@quarantine_app.command("show")
def quarantine_show(quarantine_id: QIdArg,
                    raw: Annotated[Path | None, typer.Option(
                        "--raw", metavar="FILE",
                        help="Also write the message as it came from the server to FILE "
                             "(an .eml; '-' for standard output).")] = None,
                    as_json: JsonOpt = False) -> None:
    """One quarantined message: where it came from, why, what became of it, its headers."""
    number = _quarantine_id(quarantine_id)
    if raw is not None and str(raw) != "-" and raw.exists():
        fail(ConfigError("--raw", f"{raw} already exists; refusing to overwrite it",
                         fix="choose another file name"))

    async def work(s: Services) -> tuple[QuarantinedMessage, bytes | None]:
        quarantine = quarantine_of(s)
        return await quarantine.get(number), (await quarantine.raw(number)
                                              if raw is not None else None)
    q, content = run(work)
    if content is not None and raw is not None:
        if str(raw) == "-":
            sys.stdout.buffer.write(content)
            sys.stdout.flush()
            return
        try:
            with raw.open("xb") as f:
                f.write(content)
        except OSError as exc:
            fail(ConfigError("--raw", f"cannot write {raw} ({exc.strerror or type(exc).__name__})"))
    if as_json:
        emit_json(q)
        return
    head = q.headline
    details(f"Quarantined message {q.id}", {k: v for k, v in {
        "mailbox": q.mailbox, "folder": q.folder + (" (sent)" if q.sent else ""),
        "remote id": q.remote_id, "size": _size(q.size), "code": q.code, "reason": q.reason,
        "quarantined": _when(q.created_at), "retries": q.retries or None,
        "last retry": _when(q.retried_at) or None, "status": _released(q),
        "email activity": q.email_id,
        "subject": head.subject if head else None, "from": head.sender if head else None,
        "to": head.to if head else None, "date": head.date if head else None,
        "message-id": head.message_id if head else None}.items() if v not in (None, "")})
    if content is not None:
        out.print(f"wrote {len(content)} bytes to {raw}")


def _print_retry(result: RetryResult) -> None:
    if result.released:
        what = f" as email activity {result.email_id}" if result.email_id else ""
        out.print(f"[green]✔[/] {result.id} {result.mailbox}: {result.outcome}{what}",
                  highlight=False, soft_wrap=True)
    else:
        out.print(f"[red]✘[/] {result.id} {result.mailbox}: still quarantined "
                  f"({result.code}: {result.reason})", highlight=False, soft_wrap=True)


@quarantine_app.command("retry")
def quarantine_retry(quarantine_id: Annotated[str | None, typer.Argument(
                         metavar="ID", help="The quarantine id (or use --mailbox).")] = None,
                     mailbox: Annotated[str | None, typer.Option(
                         help="Retry every message of this mailbox still in quarantine.")
                                        ] = None,
                     as_json: JsonOpt = False) -> None:
    """Process quarantined messages again, after fixing the cause.

    Each goes through the same checks as a sync run: a message tracked meanwhile (e.g. via
    another mailbox) is linked to that activity, never tracked twice. Exit code 1 if any
    stays in quarantine (its new reason is shown).
    """
    if (quarantine_id is None) == (mailbox is None):
        fail(ConfigError("", "give either a quarantine ID or --mailbox ADDRESS",
                         fix="see the ids: serversync quarantine list"))
    by = _actor()
    if quarantine_id is not None:
        number = _quarantine_id(quarantine_id)
        results = [run(lambda s: quarantine_of(s).retry(number, by=by))]
    else:
        address = mailbox or ""
        results = run(lambda s: quarantine_of(s).retry_mailbox(address, by=by))
    if as_json:
        emit_json([{**dataclasses.asdict(r), "released": r.released} for r in results])
    else:
        for result in results:
            _print_retry(result)
        if not results:
            out.print(f"nothing of {mailbox} is in quarantine")
    if not all(r.released for r in results):
        raise typer.Exit(1)


@quarantine_app.command("discard")
def quarantine_discard(quarantine_id: QIdArg, as_json: JsonOpt = False) -> None:
    """Release a message without tracking it (recorded: by whom, when)."""
    number = _quarantine_id(quarantine_id)
    by = _actor()
    q = run(lambda s: quarantine_of(s).discard(number, by=by))
    if as_json:
        emit_json(q)
        return
    out.print(f"discarded {q.id} ({q.mailbox}, {q.folder}); recorded as {by}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
