"""The commands that run the service: ``serve``, ``worker`` and ``sync``.

Registered on the main CLI (`serversync.cli`) by `register`; kept apart because they own
long-running event loops, signal handling and the web app, not one use case each.

* ``serversync serve`` — the whole service in one process (SQLite by default): scheduler,
  IMAP IDLE push, webhooks, REST API and admin UI (`runtime.local`).
* ``serversync worker`` — one of any number of workers sharing a PostgreSQL database
  (`runtime.worker`); the API and UI run with ``serve --no-sync`` or any ASGI server.
* ``serversync sync ADDRESS [--channel C]`` — run a mailbox's channels once, now, recorded
  like any scheduled run.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from typing import Annotated, Any

import typer

from serversync import wiring
from serversync.config import Settings
from serversync.core.errors import SyncError
from serversync.core.model import Channel, SyncMethod
from serversync.runtime import local
from serversync.runtime.worker import Worker, WorkerOptions
from serversync.services import Services
from serversync.services.runs import ChannelRunner, Run, RunLog

WEB_APP = "serversync.web.app:create_app"


def web_app_factory(target: str = WEB_APP) -> Any:
    """The web app factory named by ``target`` (``module:function``), or None if absent.

    Looked up by name, the way uvicorn loads apps: the CLI and the web layer are siblings
    that must not import each other (import-linter layers), and ``serve`` still runs
    headless when the web part is not installed.
    """
    module_name, _, attribute = target.partition(":")
    try:
        create_app = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None

    def factory(services: Services, runlog: RunLog) -> Any:
        return create_app(services, runlog=runlog)
    return factory


async def serve_async(settings: Settings, options: local.ServeOptions, *, web: bool,
                      sync: bool = True) -> None:
    services = await wiring.services(settings, keep_sessions=sync)
    try:
        factory = web_app_factory() if web else None
        runtime = local.build(services, options=options, pushers=wiring.PUSHERS,
                              alert_mailer=wiring.mail_alert, app_factory=factory)
        if not sync:
            runtime.scheduler.max_concurrency = 0
            runtime.push = None
            runtime.options.graph_notification_url = None  # the workers keep subscriptions
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runtime.stop)
        where = (f"http://{options.host}:{options.port}/" if runtime.app is not None
                 else "no web UI (install serversync's web part, or drop --no-web)")
        typer.echo(f"serversync serving: {where}; Ctrl-C stops (running batches finish)")
        await runtime.run()
        typer.echo("serversync stopped")
    finally:
        await services.db.close()


def register(app: typer.Typer, run: Any, fail: Any, out: Any) -> None:
    """Add the commands to the main CLI (``run``/``fail``/``out`` are the CLI's helpers)."""

    @app.command()
    def serve(host: Annotated[str, typer.Option(help="Address of the web UI and API.")] = "127.0.0.1",
              port: Annotated[int, typer.Option(help="Port of the web UI and API.")] = 8080,
              no_web: Annotated[bool, typer.Option("--no-web", help="No API and UI.")] = False,
              no_push: Annotated[bool, typer.Option("--no-push", help="Poll only, no IMAP IDLE."
                                                    )] = False,
              no_sync: Annotated[bool, typer.Option("--no-sync", help="API and UI only (the "
                                                    "syncing is done by workers).")] = False,
              max_concurrency: Annotated[int, typer.Option(help="Sync runs at once.")] = 50,
              grace: Annotated[float, typer.Option(help="Seconds running batches get to finish "
                                                   "on shutdown.")] = 30.0) -> None:
        """Run the whole service in one process: sync scheduler, push, API and admin UI."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        settings = Settings.from_env()
        options = local.ServeOptions(host=host, port=port, max_concurrency=max_concurrency,
                                     push=not no_push, grace_s=grace,
                                     graph_notification_url=settings.graph_notification_url)
        try:
            asyncio.run(serve_async(settings, options, web=not no_web,
                                    sync=not no_sync))
        except SyncError as exc:
            fail(exc)

    @app.command()
    def worker(concurrency: Annotated[int, typer.Option(help="Jobs at once.")] = 20,
               no_push: Annotated[bool, typer.Option("--no-push", help="Poll only.")] = False,
               grace: Annotated[float, typer.Option(help="Seconds running jobs get to finish "
                                                    "on shutdown.")] = 30.0) -> None:
        """Run a worker: take sync jobs from the shared PostgreSQL (start any number)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        settings = Settings.from_env()

        async def main() -> None:
            # every running job may hold a connection (plus the push rescans): a pool
            # smaller than the concurrency made jobs queue for connections (bench-scale)
            services = await wiring.services(settings, keep_sessions=True,
                                             pool_size=concurrency + 5, max_overflow=10)
            try:
                await Worker(services, settings.database_url,
                             options=WorkerOptions(
                                 concurrency=concurrency, push=not no_push, grace_s=grace,
                                 graph_notification_url=settings.graph_notification_url),
                             pushers=wiring.PUSHERS, alert_mailer=wiring.mail_alert).run()
            finally:
                await services.db.close()
        try:
            asyncio.run(main())
        except SyncError as exc:
            fail(exc)

    @app.command()
    def sync(address: str,
             channel: Annotated[Channel | None, typer.Option(help="Only this channel.")] = None
             ) -> None:
        """Sync a mailbox now (every enabled channel, or one) and show the runs."""
        async def work(services: Services) -> list[tuple[Channel, Run | None]]:
            mailbox = await services.get_mailbox(address)
            channels = [channel] if channel else [
                c for c in Channel if mailbox.channel(c).method is SyncMethod.SERVER_SIDE]
            runner = ChannelRunner(services, alert_mailer=wiring.mail_alert)
            return [(c, await runner.run(mailbox.address, c)) for c in channels]
        results: list[tuple[Channel, Run | None]] = run(work)
        failed = False
        for ch, result in results:
            if result is None:
                out.print(f"{ch.value}: skipped (disabled, not approved, or method none)")
                continue
            line = f"{ch.value}: {result.outcome.value if result.outcome else 'running'}, " \
                   f"{result.items} items, {result.failures} failures"
            if result.error:
                failed = True
                line += f" — {result.error_code}: {result.error}"
            out.print(line, highlight=False)
        if failed:
            raise typer.Exit(1)
