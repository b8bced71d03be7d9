"""The Microsoft Graph webhook receivers: ``POST /graph/notify`` and ``POST /graph/lifecycle``.

Follows Microsoft Graph v1.0 "Receive change notifications through webhooks" (notification
URL validation, processing a change notification) and "Reduce missing subscriptions and
change notifications" (lifecycle notifications). Microsoft calls these routes, so they carry
no bearer token; what authenticates a notification is its ``clientState``, which
`services.graph_subscriptions.GraphSubscriptions.receive` checks against the hash kept for
its ``subscriptionId``.

* Validation: when a subscription is created, Graph POSTs ``?validationToken=…`` to the
  notification URL and to the lifecycle URL, and needs the decoded token back within 10
  seconds, ``200`` and ``text/plain`` — answered at once, without touching the database.
* Notifications: ``{"value": [{"subscriptionId", "clientState", …}]}``; an item with a
  ``lifecycleEvent`` is a lifecycle notification. Both routes take both kinds (Graph allows
  one URL for both). Graph wants an answer within 3 seconds, so the route does the check
  (which also persists what the lifecycle events need), one short "sync now" transaction
  per mailbox (`RunLog.request_sync`, for change notifications and for ``missed`` and
  ``subscriptionRemoved``) and answers ``202``; reauthorizing or recreating a subscription
  (a Graph round trip) runs after the answer, as a background task. When no notification in
  the POST is genuine the answer is ``403`` and nothing is triggered; malformed input is
  refused the same way, never an error.

Point ``SERVERSYNC_GRAPH_NOTIFICATION_URL`` at ``/graph/notify`` through the public HTTPS
address (Graph only calls https URLs); the lifecycle URL is derived from it
(`graph_subscriptions.lifecycle_url_for`).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse

from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import Channel
from serversync.services.graph_subscriptions import (
    LIFECYCLE_PATH,
    MAX_BODY,
    NOTIFY_PATH,
    GraphSubscriptions,
)
from serversync.web.deps import WebContext, context

log = logging.getLogger("serversync.graph.notify")

PATH = NOTIFY_PATH
router = APIRouter(tags=["graph"])

Token = Annotated[str | None, Query(alias="validationToken")]
Web = Annotated[WebContext, Depends(context)]


@router.post(NOTIFY_PATH, include_in_schema=False, response_model=None)
async def notify(request: Request, web: Web, background: BackgroundTasks,
                 validation_token: Token = None) -> Response:
    return await _receive(request, web, background, validation_token)


@router.post(LIFECYCLE_PATH, include_in_schema=False, response_model=None)
async def lifecycle(request: Request, web: Web, background: BackgroundTasks,
                    validation_token: Token = None) -> Response:
    return await _receive(request, web, background, validation_token)


async def _receive(request: Request, web: WebContext, background: BackgroundTasks,
                   validation_token: str | None) -> Response:
    if validation_token is not None:
        # The query value arrives URL-decoded, as Graph wants it echoed.
        return PlainTextResponse(validation_token, 200)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return Response(status_code=413)
    body = await request.body()
    if len(body) > MAX_BODY:
        return Response(status_code=413)
    keeper = GraphSubscriptions(web.services.db, web.clock)
    received = await keeper.receive(body)
    if not received.genuine:
        log.warning("Graph notification refused: no known subscription with a matching "
                    "clientState")
        return Response(status_code=403)

    async def sync_now(address: str) -> bool:
        try:
            await web.runlog.request_sync(address, Channel.INCOMING)
        except (RuleViolation, NotFound):
            # The channel was switched off or the mailbox removed since subscribing; the
            # next `ensure` deletes the subscription.
            return False
        return True

    for address in received.sync_now:
        await sync_now(address)
    if received.actions:
        background.add_task(keeper.act, received.actions, sync_now)
    return Response(status_code=202)
