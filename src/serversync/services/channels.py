"""The contract between the runtime and the three sync channels.

A channel job syncs one channel of one mailbox once and returns a `RunSummary`. It raises
a typed `core.errors.SyncError` when the whole run fails: `TransientError` (the runtime backs
off and retries), `PermanentError` (the runtime disables the channel with an alert that says
what to fix). Item-level problems never raise: they are quarantined and counted in
``failures``. Jobs are registered per channel in `serversync.wiring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RunSummary:
    items: int = 0  # items tracked, sent or synced in this run
    failures: int = 0  # items quarantined or failed (the run itself succeeded)
    more: bool = False  # work is left (a batch limit was hit): run again soon
    detail: str = ""  # one line for the runs table and the UI


class ChannelJob(Protocol):
    async def __call__(self, address: str) -> RunSummary: ...
