"""``serversync serve``: the whole service in one process on the embedded default.

One asyncio loop runs the scheduler (`runtime.scheduler`), the IMAP IDLE watchers
(`runtime.push`), the webhook delivery loop and, when an ASGI app is given (the CLI passes
`serversync.web.app.create_app`), the REST API and admin UI under uvicorn. Push notifications
become "sync now" through `services.runs.RunLog.request_sync`, which wakes the scheduler at
once; the API's "sync now" button does the same.

Shutdown (`LocalRuntime.stop`, on SIGINT/SIGTERM from the CLI): the watchers close first so
no new work arrives, then running sync batches get ``grace`` seconds to finish — a batch
that does not is cancelled, its transaction rolls back, and its run is recorded as
interrupted — then the web server and the database close. This module is for one process;
`runtime.worker` shares work between many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from serversync.core.model import Channel, ServerKind
from serversync.runtime.push import Push, Watch
from serversync.runtime.scheduler import Scheduler
from serversync.services import Services, graph_subscriptions
from serversync.services.runs import AlertMailer, ChannelRunner, Run, RunLog
from serversync.services.webhooks import Webhooks

log = logging.getLogger("serversync.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    max_concurrency: int = 50  # sync runs at once in this process
    push: bool = True
    grace_s: float = 30.0  # how long running batches may take to finish on shutdown
    webhook_every_s: float = 5.0
    connect_concurrency: int = 20  # IMAP IDLE logins at once
    # SERVERSYNC_GRAPH_NOTIFICATION_URL: when set, Graph subscriptions are kept (push for
    # Exchange Online); when not, Exchange Online is polled only
    graph_notification_url: str | None = None
    graph_subscriptions_every_s: float = graph_subscriptions.EVERY_S


@dataclass
class LocalRuntime:
    """The pieces of a running ``serve``; built by `build`, run by `run`."""

    services: Services
    runlog: RunLog
    runner: ChannelRunner
    scheduler: Scheduler
    push: Push | None
    webhooks: Webhooks
    options: ServeOptions
    app: Any = None
    server: Any = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        """Ask `run` to shut down gracefully (safe from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        tasks: list[asyncio.Task[None]] = [
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(self._deliver_webhooks(), name="webhooks")]
        if self.push is not None:
            tasks.append(asyncio.create_task(self.push.run(), name="push"))
        if self.options.graph_notification_url:
            tasks.append(asyncio.create_task(self._graph_subscriptions(
                self.options.graph_notification_url), name="graph-subscriptions"))
        if self.app is not None:
            self.server = _server(self.app, self.options.host, self.options.port)
            tasks.append(asyncio.create_task(self.server.serve(), name="web"))
        self.started.set()
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:  # a component that dies takes the process down, loudly
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            await self._shutdown(tasks)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        if self.push is not None:
            await self.push.stop()
        await self.scheduler.stop(self.options.grace_s)
        await close_jobs(self.services)  # log out the IMAP sessions kept between runs
        if self.server is not None:
            self.server.should_exit = True
        for task in tasks:
            if task.get_name() != "web":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _graph_subscriptions(self, url: str) -> None:
        keeper = graph_subscriptions.GraphSubscriptions(self.services.db, self.services.clock)
        if self.server is not None:
            # Graph validates the notification URL while creating a subscription: let the
            # web server start listening first (uvicorn only offers a flag to watch).
            while not self.server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        while True:
            try:
                await keeper.ensure(url)
            except Exception:  # the next round retries; delta polling covers the gap
                log.exception("keeping Graph subscriptions failed")
            await asyncio.sleep(self.options.graph_subscriptions_every_s)

    async def _deliver_webhooks(self) -> None:
        while True:
            try:
                await self.webhooks.deliver_pending()
            except Exception:
                log.exception("webhook delivery failed")
            await asyncio.sleep(self.options.webhook_every_s)


async def close_jobs(services: Services) -> None:
    """Let channel jobs release what they keep between runs (`IncomingJob.aclose`)."""
    for job in services.jobs.values():
        close = getattr(job, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # shutting down: a failed logout must not stop the rest
                log.exception("closing the %s job failed", type(job).__name__)


def build(services: Services, *, options: ServeOptions | None = None,
          pushers: Mapping[ServerKind, Watch] | None = None,
          alert_mailer: AlertMailer | None = None,
          app_factory: Callable[[Services, RunLog], Any] | None = None,
          on_run: Callable[[Run], None] | None = None) -> LocalRuntime:
    """Wire one process: no I/O here; `LocalRuntime.run` starts everything."""
    options = options or ServeOptions()
    runlog = RunLog(services.db, clock=services.clock)
    push: Push | None = None

    async def notify(address: str, channel: Channel) -> None:
        await runlog.request_sync(address, channel)

    if options.push and pushers:
        push = Push(services, pushers, notify, connect_concurrency=options.connect_concurrency)
    runner = ChannelRunner(services, push=push.covers if push else None,
                           alert_mailer=alert_mailer)
    scheduler = Scheduler(runlog, runner, max_concurrency=options.max_concurrency, on_run=on_run)
    app = app_factory(services, runlog) if app_factory is not None else None
    return LocalRuntime(services, runlog, runner, scheduler, push,
                        Webhooks(services.db, services.clock), options, app)


def _server(app: Any, host: str, port: int) -> Any:
    import uvicorn  # only when there is a web app to serve

    class Server(uvicorn.Server):
        # The CLI owns SIGINT/SIGTERM and shuts everything down in order.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            access_log=False)
    return Server(config)
