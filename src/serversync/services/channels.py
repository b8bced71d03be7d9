"""The contract between the runtime and the three sync channels.

A channel job syncs one channel of one mailbox once and returns a `RunSummary`. It raises
a typed `core.errors.SyncError` when the whole run fails: `TransientError` (the runtime backs
off and retries), `PermanentError` (the runtime disables the channel with an alert that says
what to fix). Item-level problems never raise: they are quarantined and counted in
``failures``. Jobs are registered per channel in `serversync.wiring`.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from serversync.core.model import Mailbox, OrgSettings, Profile


@dataclass(frozen=True, slots=True)
class RunSummary:
    items: int = 0  # items tracked, sent or synced in this run
    failures: int = 0  # items quarantined or failed (the run itself succeeded)
    more: bool = False  # work is left (a batch limit was hit): run again soon
    detail: str = ""  # one line for the runs table and the UI


class ChannelJob(Protocol):
    """A job may also have ``async def prefetch(repo, mailbox) -> Any``: the runner then
    calls it in the transaction that opens the run and hands the result over in
    `RunContext.prefetched` (the incoming job's folder cursors: one transaction less on a
    no-change poll). It must only read, and be what the job would read first."""

    async def __call__(self, address: str) -> RunSummary: ...


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the runner read in the transaction that opened the run (`services.runs`)."""

    mailbox: Mailbox
    profile: Profile
    settings: OrgSettings
    prefetched: Any = None  # what the job's ``prefetch`` returned


# Set by `services.runs.ChannelRunner` around one job call, so that a job may skip reading the
# same three rows again (a no-change poll is a handful of statements; these were three of
# them). A job must check that ``mailbox.address`` is the one it was called for.
current_run: ContextVar[RunContext | None] = ContextVar("serversync_current_run", default=None)
