"""What every web route needs: the app's services (`WebContext`) and who is calling.

`WebContext` is built once by `web.app.create_app` and kept on ``app.state``; routes reach
it through `context`. `caller` authenticates the REST API: ``Authorization: Bearer <token>``
(401 without a valid token), and a reader may only read (403 for anything but GET/HEAD).
Failures are answered as JSON ``{"error": {"code", "message", "fix"}}`` like every other
error of the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serversync.core.access import Principal
from serversync.services import Services
from serversync.services.activities import Activities
from serversync.services.admin import Clock
from serversync.services.controls import Controls
from serversync.services.quarantine import Quarantine
from serversync.services.runs import RunLog
from serversync.services.tokens import Tokens
from serversync.services.webhooks import Webhooks


@dataclass
class WebContext:
    services: Services
    runlog: RunLog
    tokens: Tokens
    webhooks: Webhooks
    activities: Activities
    controls: Controls
    quarantine: Quarantine
    clock: Clock
    extras: dict[str, object]  # optional services (outgoing, act) when installed


class ApiError(HTTPException):
    """An HTTP error with the API's error body."""

    def __init__(self, status: int, code: str, message: str, fix: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail={"code": code, "message": message, "fix": fix},
                         headers=headers)


def context(request: Request) -> WebContext:
    found: WebContext = request.app.state.web
    return found


bearer = HTTPBearer(auto_error=False, description="An API token: serversync token create NAME")


async def caller(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                 ) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthenticated", "this API needs a bearer token",
                       "send Authorization: Bearer <token>; create one with "
                       "`serversync token create NAME --role reader`",
                       headers={"WWW-Authenticate": "Bearer"})
    principal = await context(request).tokens.authenticate(credentials.credentials)
    if principal is None:
        raise ApiError(401, "bad-token", "the token is unknown or revoked",
                       "create a new one with `serversync token create NAME`",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if not principal.may(request.method):
        raise ApiError(403, "read-only", f"token {principal.name!r} has the reader role and "
                       f"may not {request.method}", "use a token with the admin role")
    return principal
