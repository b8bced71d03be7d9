"""The Microsoft Graph change-notification receiver: ``POST /graph/notify``.

Follows Microsoft Graph v1.0 "Set up notifications for changes in resource data"
(notification endpoint validation, and receiving notifications). Microsoft calls this
route, so it carries no bearer token; what authenticates a notification is its
``clientState``, which `services.graph_subscriptions.GraphSubscriptions.accept` checks
against the hash kept for its ``subscriptionId``.

* Validation: when a subscription is created, Graph POSTs ``?validationToken=…`` and needs
  the decoded token back within 10 seconds, ``200`` and ``text/plain`` — answered at once,
  without touching the database.
* Notifications: ``{"value": [{"subscriptionId", "clientState", "resource", …}]}``.
  Graph wants an answer within 3 seconds, so the route does only the check and one short
  "sync now" transaction per mailbox (`RunLog.request_sync`) and answers ``202``; the
  incoming run itself happens in the scheduler. When no notification in the POST is genuine
  the answer is ``403`` and nothing is triggered.

Point ``SERVERSYNC_GRAPH_NOTIFICATION_URL`` at this route through the public HTTPS address
(Graph only calls https URLs).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse

from serversync.core.errors import NotFound, RuleViolation
from serversync.core.model import Channel
from serversync.services.graph_subscriptions import MAX_BODY, GraphSubscriptions
from serversync.web.deps import WebContext, context

log = logging.getLogger("serversync.graph.notify")

PATH = "/graph/notify"
router = APIRouter(tags=["graph"])


@router.post(PATH, include_in_schema=False, response_model=None)
async def notify(request: Request, web: Annotated[WebContext, Depends(context)],
                 validation_token: Annotated[str | None, Query(alias="validationToken")] = None,
                 ) -> Response:
    if validation_token is not None:
        # The query value arrives URL-decoded, as Graph wants it echoed.
        return PlainTextResponse(validation_token, 200)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return Response(status_code=413)
    body = await request.body()
    if len(body) > MAX_BODY:
        return Response(status_code=413)
    addresses = await GraphSubscriptions(web.services.db, web.clock).accept(body)
    if not addresses:
        log.warning("Graph notification refused: no known subscription with a matching "
                    "clientState")
        return Response(status_code=403)
    for address in addresses:
        try:
            await web.runlog.request_sync(address, Channel.INCOMING)
        except (RuleViolation, NotFound):
            # The channel was switched off or the mailbox removed since subscribing; the
            # next `ensure` deletes the subscription.
            continue
    return Response(status_code=202)
