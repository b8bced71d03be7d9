"""The admin UI: server-rendered pages (Jinja2) made lively with htmx, no JS build.

Sign in with an API token (`services.tokens.Tokens.sign_in`): the token is traded for a
random session cookie (HttpOnly, SameSite=Strict, Secure over HTTPS), so it never stays in
the browser. A reader token gets a read-only UI. Every form POST carries the session's CSRF
token (a hidden field, or the ``X-CSRF-Token`` header htmx sends from ``hx-headers``).
Buttons work without JavaScript (plain form posts and redirects); with htmx they swap only
the mailbox they act on. Pages call services only: `Services`, `RunLog`, `Controls`,
`Quarantine`.

An Exchange Online mailbox whose profile takes credentials from each mailbox gets a
"Microsoft sign-in" card (`services.consent.SignIns`): *Sign in* shows the code and the page
to open, and the card asks for itself again every two seconds (htmx polling) until the
sign-in is done, failed or expired.
"""

from __future__ import annotations

import datetime as dt
import hmac
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from serversync.core.access import SAFE_METHODS, Principal
from serversync.core.errors import NotFound, SyncError
from serversync.core.model import (
    ApprovalStatus,
    Channel,
    CredentialSource,
    ImpersonationMethod,
    Mailbox,
    Party,
    PartyKind,
    ServerKind,
    SyncMethod,
    TlsMode,
)
from serversync.core.rules import access_mode
from serversync.core.signin import SignIn
from serversync.manifest import MailboxSpec, ProfileSpec, validate
from serversync.services import TestReport
from serversync.services.consent import supports_sign_in
from serversync.web import charts
from serversync.web.api import reach_warning
from serversync.web.deps import WebContext, context

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "serversync_session"
templates = Jinja2Templates(directory=str(TEMPLATES))
router = APIRouter(prefix="/ui", include_in_schema=False)
Ctx = Annotated[WebContext, Depends(context)]


def _redirect(to: str) -> StarletteHTTPException:
    return StarletteHTTPException(303, "sign in first",
                                  headers={"Location": to, "HX-Redirect": to})


async def signed_in(request: Request, web: Ctx) -> Principal:
    return await _session(request, web, writes=True)


async def signed_in_any_role(request: Request, web: Ctx) -> Principal:
    """For signing out, which a reader must be able to do too (CSRF is still checked)."""
    return await _session(request, web, writes=False)


async def _session(request: Request, web: WebContext, *, writes: bool) -> Principal:
    principal = await web.tokens.session(request.cookies.get(COOKIE, ""))
    if principal is None:
        raise _redirect("/ui/login")
    if request.method not in SAFE_METHODS:
        if writes and not principal.may(request.method):
            raise SyncError(f"{principal.name!r} signed in with a reader token: read only",
                            fix="sign in with an admin token to change things", code="read-only")
        sent = request.headers.get("X-CSRF-Token") or str((await request.form()).get("csrf", ""))
        if not principal.csrf or not hmac.compare_digest(sent.encode(), principal.csrf.encode()):
            raise SyncError("the form's security token is missing or stale",
                            fix="reload the page and try again", code="csrf")
    return principal


User = Annotated[Principal, Depends(signed_in)]


def page(request: Request, name: str, user: Principal | None, status: int = 200,
         **values: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {
        "user": user, "path": request.url.path, "Channel": Channel, **values},
        status_code=status)


async def error_page(request: Request, status: int, message: str, fix: str) -> HTMLResponse:
    return page(request, "error.html", None, status, message=message, fix=fix)


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def back(to: str) -> RedirectResponse:
    return RedirectResponse(to, 303)


# ---------------------------------------------------------------- sign-in

@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> HTMLResponse:
    return page(request, "login.html", None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, web: Ctx) -> Response:
    form = await request.form()
    signed = await web.tokens.sign_in(str(form.get("token", "")))
    if signed is None:
        return page(request, "login.html", None, 401,
                    error="That token is unknown or revoked.")
    response = back("/ui/")
    secure = request.app.state.secure_cookies
    response.set_cookie(COOKIE, signed.session, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https" if secure is None else secure,
                        max_age=12 * 3600)
    return response


@router.post("/logout")
async def logout(request: Request, web: Ctx,
                 user: Annotated[Principal, Depends(signed_in_any_role)]) -> Response:
    await web.tokens.sign_out(request.cookies.get(COOKIE, ""))
    response = back("/ui/login")
    response.delete_cookie(COOKIE, path="/ui")
    return response


# ---------------------------------------------------------------- dashboard

@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request, web: Ctx, user: User) -> HTMLResponse:
    overview = await web.controls.overview()
    stats = await web.runlog.stats(web.clock() - dt.timedelta(hours=24))
    states = ("success", "failure", "not-run", "disabled")
    status_chart = charts.stacked_bars("Mailbox channels by status", [
        (c.value, [(s, overview.count(c, s)) for s in states]) for c in Channel])
    hourly = stats.get("hourly", [])
    hours = [h["hour"] for h in hourly]
    items_chart = charts.hourly_bars(
        "Items processed and failures per hour (last 24 h)", hours,
        [("items", [h["items"] for h in hourly]), ("failures", [h["failures"] for h in hourly])])
    runs_chart = charts.hourly_bars(
        "Sync runs and failed runs per hour (last 24 h)", hours,
        [("runs", [h["runs"] for h in hourly]), ("failed_runs", [h["failed_runs"] for h in hourly])])
    latency = stats.get("latency_s", {})
    latency_chart = charts.value_bars(
        "Sync run duration (last 24 h)",
        [("p50", latency.get("p50")), ("p90", latency.get("p90")), ("p99", latency.get("p99")),
         ("max", latency.get("max"))], "s")
    alerts = await web.services.alerts()
    return page(request, "dashboard.html", user, overview=overview, stats=stats,
                status_chart=status_chart, items_chart=items_chart, runs_chart=runs_chart,
                latency_chart=latency_chart, alerts=alerts[:8],
                health=stats.get("mailboxes_by_status", {}), totals=stats.get("totals", {}),
                latency=latency)


# ---------------------------------------------------------------- profiles

PROFILE_FIELDS = ("name", "kind", "description", "credential_source", "service_user",
                  "impersonation_method", "ca_file", "dav_url")


def profile_data(form: Any) -> dict[str, Any]:
    """The create form as `ProfileSpec` fields: empty inputs are left out."""
    data: dict[str, Any] = {k: str(form.get(k, "")).strip() for k in PROFILE_FIELDS}
    data = {k: v for k, v in data.items() if v}
    for prefix in ("incoming", "outgoing"):
        host = str(form.get(f"{prefix}_host", "")).strip()
        if host:
            data[prefix] = {"host": host, "port": str(form.get(f"{prefix}_port", "")).strip(),
                            "tls": str(form.get(f"{prefix}_tls", "implicit"))}
    for flag in ("use_impersonation", "allow_plaintext"):
        data[flag] = form.get(flag) == "on"
    secret = str(form.get("service_secret", ""))
    if secret:
        data["service_secret"] = secret
    scope = [s.strip() for s in str(form.get("impersonation_scope", "")).split(",") if s.strip()]
    if scope:
        data["impersonation_scope"] = scope
    for number in ("min_polling_interval_s", "max_concurrent_connections"):
        value = str(form.get(number, "")).strip()
        if value:
            data[number] = value
    return data


async def _profiles_page(request: Request, web: WebContext, user: Principal,
                         error: str = "", form: dict[str, Any] | None = None,
                         status: int = 200) -> HTMLResponse:
    rows = []
    for profile in await web.services.list_profiles():
        reach = await web.services.reach(profile.name)
        rows.append((profile, reach, access_mode(profile).value))
    return page(request, "profiles.html", user, status, rows=rows, error=error,
                form=form or {}, kinds=list(ServerKind), tls_modes=list(TlsMode),
                sources=list(CredentialSource), methods=list(ImpersonationMethod),
                CredentialSource=CredentialSource)


@router.get("/profiles", response_class=HTMLResponse)
async def profiles(request: Request, web: Ctx, user: User) -> HTMLResponse:
    return await _profiles_page(request, web, user)


@router.post("/profiles", response_class=HTMLResponse)
async def create_profile(request: Request, web: Ctx, user: User) -> Response:
    form = await request.form()
    data = profile_data(form)
    try:
        spec: ProfileSpec = validate(ProfileSpec, data)
        profile = await web.services.create_profile(spec)
    except SyncError as exc:
        kept = {k: v for k, v in form.items() if k not in ("service_secret", "csrf")}
        return await _profiles_page(request, web, user, f"{exc.message} {exc.fix}".strip(),
                                    kept, 422)
    return back(f"/ui/profiles/{profile.name}")


@router.get("/profiles/{name}", response_class=HTMLResponse)
async def profile_detail(request: Request, web: Ctx, user: User, name: str) -> HTMLResponse:
    profile = await web.services.get_profile(name)
    reach = await web.services.reach(name)
    mailboxes = await web.services.list_mailboxes(name)
    return page(request, "profile.html", user, profile=profile, reach=reach,
                access=access_mode(profile).value, mailboxes=mailboxes,
                warning=reach_warning(reach.uses_service_account, reach.mailboxes, reach.scope),
                alerts=await web.services.alerts(profile=name))


# ---------------------------------------------------------------- mailboxes

async def _mailboxes_page(request: Request, web: WebContext, user: Principal,
                          error: str = "", form: dict[str, Any] | None = None,
                          status: int = 200) -> HTMLResponse:
    mailboxes = await web.services.list_mailboxes()
    alerts = await web.services.alerts()
    by_mailbox: dict[str, list[Any]] = {}
    for alert in alerts:
        if alert.mailbox:
            by_mailbox.setdefault(alert.mailbox, []).append(alert)
    profiles = await web.services.list_profiles()
    return page(request, "mailboxes.html", user, status, mailboxes=mailboxes,
                alerts=by_mailbox, profiles=profiles, error=error, form=form or {},
                sync_methods=list(SyncMethod), reports={})


@router.get("/mailboxes", response_class=HTMLResponse)
async def mailboxes(request: Request, web: Ctx, user: User) -> HTMLResponse:
    return await _mailboxes_page(request, web, user)


@router.post("/mailboxes", response_class=HTMLResponse)
async def create_mailbox(request: Request, web: Ctx, user: User) -> Response:
    form = await request.form()
    address = str(form.get("address", "")).strip().lower()
    owner = str(form.get("owner", "")).strip() or address.partition("@")[0]
    data: dict[str, Any] = {
        "address": address, "profile": str(form.get("profile", "")), "owner": owner,
        "owner_kind": str(form.get("owner_kind", "user")),
        "name": str(form.get("name", "")).strip(),
        "allow_credentials": form.get("allow_credentials") == "on"}
    for channel in Channel:
        data[channel.value] = str(form.get(channel.value, "none"))
    username = str(form.get("username", "")).strip()
    if username:
        data["username"] = username
    secret = str(form.get("secret", ""))
    if secret:
        data["secret"] = secret
    try:
        spec: MailboxSpec = validate(MailboxSpec, data)
        if form.get("add_owner") == "on":
            kind = PartyKind(spec.owner_kind)
            known = {p.key for p in await web.services.list_parties(kind)}
            if spec.owner not in known:
                await web.services.save_party(Party(kind, spec.owner, spec.name or spec.owner,
                                                    (spec.address,)))
        await web.services.create_mailbox(spec)
    except SyncError as exc:
        kept = {k: v for k, v in form.items() if k not in ("secret", "csrf")}
        return await _mailboxes_page(request, web, user, f"{exc.message} {exc.fix}".strip(),
                                     kept, 422)
    return back("/ui/mailboxes")


async def _mailbox_rows(request: Request, web: WebContext, user: Principal, address: str,
                        report: TestReport | None = None, note: str = "") -> Response:
    """One mailbox's ``<tbody>`` (its row, results and alerts), for htmx to swap in."""
    if not is_htmx(request):
        return back("/ui/mailboxes")
    mailbox = await web.services.get_mailbox(address)
    alerts = await web.services.alerts(mailbox=address)
    return page(request, "_mailbox_rows.html", user, m=mailbox, mailbox_alerts=alerts,
                report=report, note=note)


@router.post("/mailboxes/{address}/test-enable", response_class=HTMLResponse)
async def test_enable(request: Request, web: Ctx, user: User, address: str) -> Response:
    try:
        report = await web.services.test_enable(address)
    except SyncError as exc:
        return await _mailbox_rows(request, web, user, address, note=exc.message)
    return await _mailbox_rows(request, web, user, address, report)


@router.post("/mailboxes/{address}/approve", response_class=HTMLResponse)
async def approve(request: Request, web: Ctx, user: User, address: str) -> Response:
    await web.services.set_approval(address, ApprovalStatus.APPROVED)
    return await _mailbox_rows(request, web, user, address, note="approved")


@router.post("/mailboxes/{address}/reject", response_class=HTMLResponse)
async def reject(request: Request, web: Ctx, user: User, address: str) -> Response:
    await web.services.set_approval(address, ApprovalStatus.REJECTED)
    return await _mailbox_rows(request, web, user, address,
                               note="rejected: every channel is disabled")


@router.post("/mailboxes/{address}/channels/{channel}/{action}", response_class=HTMLResponse)
async def channel_action(request: Request, web: Ctx, user: User, address: str,
                         channel: Channel, action: str) -> Response:
    try:
        if action == "sync":
            await web.runlog.request_sync(address, channel)
            note = f"{channel.value}: sync requested"
        elif action in ("enable", "disable"):
            await web.controls.set_channel_enabled(address, channel, action == "enable")
            note = f"{channel.value} {action}d"
        else:
            raise SyncError(f"unknown action {action!r}", code="not-found")
    except SyncError as exc:
        note = f"{exc.message} — {exc.fix}" if exc.fix else exc.message
    if not is_htmx(request):
        return back(f"/ui/mailboxes/{address}")
    return await _mailbox_rows(request, web, user, address, note=note)


@router.get("/mailboxes/{address}", response_class=HTMLResponse)
async def mailbox_detail(request: Request, web: Ctx, user: User, address: str) -> HTMLResponse:
    mailbox: Mailbox = await web.services.get_mailbox(address)
    profile = await web.services.get_profile(mailbox.profile)
    sign_in = supports_sign_in(profile)
    return page(request, "mailbox.html", user, m=mailbox, sign_in=sign_in,
                si=await _latest_sign_in(web, mailbox.address) if sign_in else None,
                schedules=await web.runlog.schedules(address),
                runs=await web.runlog.recent(mailbox=address, limit=30),
                mailbox_alerts=await web.services.alerts(mailbox=address,
                                                         include_resolved=True))


async def _latest_sign_in(web: WebContext, address: str) -> SignIn | None:
    try:
        return await web.services.sign_ins.get(address)
    except NotFound:
        return None


async def _sign_in_card(request: Request, web: WebContext, user: Principal, address: str,
                        state: SignIn | None, note: str = "") -> Response:
    if not is_htmx(request):
        return back(f"/ui/mailboxes/{quote(address)}")
    mailbox = await web.services.get_mailbox(address)
    return page(request, "_sign_in.html", user, m=mailbox, si=state, note=note)


@router.post("/mailboxes/{address}/sign-in", response_class=HTMLResponse)
async def start_sign_in(request: Request, web: Ctx, user: User, address: str) -> Response:
    """Start the user's own sign-in; the card shows the code and polls for the outcome."""
    try:
        state: SignIn | None = await web.services.sign_ins.start(address, by=f"ui:{user.name}")
    except SyncError as exc:
        if not is_htmx(request):
            raise
        state = await _latest_sign_in(web, address)
        return await _sign_in_card(request, web, user, address, state,
                                   f"{exc.message} — {exc.fix}" if exc.fix else exc.message)
    return await _sign_in_card(request, web, user, address, state)


@router.get("/mailboxes/{address}/sign-in", response_class=HTMLResponse)
async def sign_in_state(request: Request, web: Ctx, user: User, address: str) -> Response:
    """The sign-in card again (what htmx polls while the sign-in is pending)."""
    return await _sign_in_card(request, web, user, address,
                               await _latest_sign_in(web, address))


# ---------------------------------------------------------------- alerts

@router.get("/alerts", response_class=HTMLResponse)
async def alerts_wall(request: Request, web: Ctx, user: User,
                      resolved: bool = False) -> HTMLResponse:
    return page(request, "alerts.html", user,
                alerts=await web.services.alerts(include_resolved=resolved), resolved=resolved)


@router.post("/alerts/{alert_id}/resolve", response_class=HTMLResponse)
async def resolve(request: Request, web: Ctx, user: User, alert_id: int) -> Response:
    await web.controls.resolve_alert(alert_id)
    if is_htmx(request):
        return HTMLResponse("")
    return back("/ui/alerts")


# ---------------------------------------------------------------- quarantine

QUARANTINE_PAGE = 200


def size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


templates.env.filters["size"] = size_text


@router.get("/quarantine", response_class=HTMLResponse)
async def quarantine_list(request: Request, web: Ctx, user: User, mailbox: str = "",
                          everything: Annotated[bool, Query(alias="all")] = False,
                          before_id: int | None = None,
                          retried: int | None = None, released: int | None = None
                          ) -> HTMLResponse:
    """Quarantined incoming mail, newest first, of every mailbox or one (``?mailbox=``)."""
    chosen = mailbox.strip().lower() or None
    messages = await web.quarantine.messages(mailbox=chosen, include_released=everything,
                                             limit=QUARANTINE_PAGE, before_id=before_id)
    note = ""
    if retried is not None and released is not None:  # after "Retry all" (numbers only)
        note = (f"{retried} message(s) retried: {released} released, "
                f"{retried - released} still in quarantine")
    return page(request, "quarantine.html", user, messages=messages, mailbox=chosen or "",
                include_released=everything, note=note,
                mailboxes=[m.address for m in await web.services.list_mailboxes()],
                older=messages[-1].id if len(messages) == QUARANTINE_PAGE else None)


@router.get("/quarantine/{quarantine_id}", response_class=HTMLResponse)
async def quarantine_detail(request: Request, web: Ctx, user: User,
                            quarantine_id: int) -> HTMLResponse:
    return page(request, "quarantine_item.html", user,
                q=await web.quarantine.get(quarantine_id))


@router.get("/quarantine/{quarantine_id}/raw")
async def quarantine_raw(web: Ctx, user: User, quarantine_id: int) -> Response:
    """The .eml as a download (never rendered: it is untrusted mail on our origin)."""
    raw = await web.quarantine.raw(quarantine_id)
    return Response(raw, media_type="message/rfc822", headers={
        "Content-Disposition": f'attachment; filename="quarantine-{quarantine_id}.eml"',
        "X-Content-Type-Options": "nosniff"})


@router.post("/quarantine/retry", response_class=HTMLResponse)
async def quarantine_retry_mailbox(request: Request, web: Ctx, user: User) -> Response:
    address = str((await request.form()).get("mailbox", "")).strip().lower()
    results = await web.quarantine.retry_mailbox(address, by=f"ui:{user.name}")
    released = sum(r.released for r in results)
    return back(f"/ui/quarantine?mailbox={quote(address)}&retried={len(results)}"
                f"&released={released}")


@router.post("/quarantine/{quarantine_id}/{action}", response_class=HTMLResponse)
async def quarantine_action(request: Request, web: Ctx, user: User, quarantine_id: int,
                            action: str) -> Response:
    """Retry or discard one message; with htmx, its table row comes back with a note."""
    by = f"ui:{user.name}"
    try:
        if action == "retry":
            result = await web.quarantine.retry(quarantine_id, by=by)
            note = (f"{result.outcome}" + (f" as email activity {result.email_id}"
                                           if result.email_id else "")
                    if result.released else f"still quarantined: {result.code}")
        elif action == "discard":
            await web.quarantine.discard(quarantine_id, by=by)
            note = "discarded"
        else:
            raise NotFound(f"unknown action {action!r}", fix="retry or discard")
    except SyncError as exc:
        if not is_htmx(request):
            raise
        note = f"{exc.message} — {exc.fix}" if exc.fix else exc.message
    if not is_htmx(request):
        return back(f"/ui/quarantine/{quarantine_id}")
    return page(request, "_quarantine_row.html", user,
                q=await web.quarantine.get(quarantine_id), note=note)
