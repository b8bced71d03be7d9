"""The web application: REST API, Prometheus metrics and the admin UI in one FastAPI app.

`create_app` is the factory `serversync serve` mounts (the runtime builds the services and
passes them in; nothing here opens a database or a socket). Routes:

* ``/api/v1/...`` — the REST API (`web.api`), OpenAPI at ``/docs`` and ``/openapi.json``;
* ``/metrics`` — Prometheus text format (`web.metrics`), bearer token like the API unless
  ``public_metrics=True``;
* ``/ui/...`` — the admin UI (`web.admin`), signed in with an API token;
* ``/static/...`` — the UI's CSS and the vendored htmx (no network at run time);
* ``/graph/notify`` and ``/graph/lifecycle`` — Microsoft Graph change and lifecycle
  notifications (`web.graph_notify`; no bearer token: Microsoft calls them, the clientState
  authenticates).

Every response carries a strict Content-Security-Policy (no inline script, no third
party), ``X-Frame-Options: DENY`` and ``nosniff``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from serversync.core.access import Principal
from serversync.core.errors import (
    ConfigError,
    NotFound,
    PermanentError,
    RuleViolation,
    SyncError,
    TransientError,
)
from serversync.services import Services
from serversync.services.activities import Activities
from serversync.services.admin import Clock
from serversync.services.controls import Controls
from serversync.services.quarantine import quarantine_of
from serversync.services.runs import RunLog
from serversync.services.tokens import Tokens
from serversync.services.webhooks import Webhooks
from serversync.web import admin, api, metrics
from serversync.web.deps import WebContext, caller, context

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
# Swagger UI at /docs loads its script and CSS from a CDN: a relaxed policy for that page only.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "img-src 'self' data: https://fastapi.tiangolo.com; frame-ancestors 'none'")


def status_of(exc: SyncError) -> int:
    if exc.code in ("csrf", "read-only"):
        return 403
    if isinstance(exc, ConfigError):
        return 422
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, RuleViolation):
        return 409
    if isinstance(exc, TransientError):
        return 503
    if isinstance(exc, PermanentError):
        return 502
    return 400


def error_body(code: str, message: str, fix: str = "") -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message, "fix": fix}}


def _field(loc: tuple[object, ...]) -> str:
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "EnvRef", "FileRef") or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def create_app(services: Services, *, runlog: RunLog | None = None,
               tokens: Tokens | None = None, webhooks: Webhooks | None = None,
               clock: Clock | None = None, extras: Mapping[str, object] | None = None,
               public_metrics: bool = False, secure_cookies: bool | None = None) -> FastAPI:
    """The whole web side over ``services``.

    ``runlog``, ``tokens`` and ``webhooks`` default to instances over ``services.db``;
    ``extras`` carries optional services (``"outgoing"``, ``"act"``) that enable their routes.
    ``secure_cookies`` forces the UI cookie's Secure flag (default: when the request is HTTPS).
    """
    now = clock or services.clock
    ctx = WebContext(
        services=services, runlog=runlog or RunLog(services.db, now),
        tokens=tokens or Tokens(services.db, now),
        webhooks=webhooks or Webhooks(services.db, now),
        activities=Activities(services.db), controls=Controls(services.db, now),
        quarantine=quarantine_of(services), clock=now, extras=dict(extras or {}))
    app = FastAPI(title="serversync", version="1",
                  description="Server-side synchronization: profiles, mailboxes, activities, "
                              "alerts and runs. Authenticate with `Authorization: Bearer "
                              "<token>` (`serversync token create NAME --role admin|reader`).")
    app.state.web = ctx
    app.state.secure_cookies = secure_cookies

    @app.exception_handler(SyncError)
    async def sync_error(request: Request, exc: SyncError) -> Response:
        if request.url.path.startswith("/ui"):
            return await admin.error_page(request, status_of(exc), exc.message, exc.fix)
        return JSONResponse(error_body(exc.code, exc.message, exc.fix), status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = _field(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unknown field"
        elif first.get("type") == "missing":
            message = "is required"
        return JSONResponse(error_body("config", f"{field}: {message}" if field else message),
                            422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.detail, dict):
            body = {"error": exc.detail}
        else:
            body = error_body(f"http-{exc.status_code}", str(exc.detail))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def security_headers(request: Request,
                               call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        docs = request.url.path in ("/docs", "/redoc")
        response.headers.setdefault("Content-Security-Policy", DOCS_CSP if docs else CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.url.path.startswith(("/api/", "/ui")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.include_router(api.router)
    for router in extra_routers(ctx):
        app.include_router(router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def metrics_response(web: WebContext) -> Response:
        stats = await web.runlog.stats(web.clock() - metrics.WINDOW)
        body = metrics.render(await web.controls.overview(), stats)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    if public_metrics:
        @app.get("/metrics", tags=["metrics"], response_class=Response)
        async def public_metrics_route(web: Annotated[WebContext, Depends(context)]) -> Response:
            return await metrics_response(web)
    else:
        @app.get("/metrics", tags=["metrics"], response_class=Response)
        async def metrics_route(web: Annotated[WebContext, Depends(context)],
                                _who: Annotated[Principal, Depends(caller)]) -> Response:
            """Prometheus text format; send the token as a bearer credential."""
            return await metrics_response(web)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui/", 307)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "time": dt.datetime.now(dt.UTC).isoformat()}

    return app


def extra_routers(ctx: WebContext) -> list[APIRouter]:
    """Routers of the activity-writing services (outgoing email; appointments, contacts
    and tasks)."""
    from serversync.web import act_api, graph_notify, outgoing_api
    return [outgoing_api.router, act_api.router, graph_notify.router]
