"""The use cases. `Services` (in `services.admin`) is the façade the CLI, API and runtime use;
each channel's sync lives in its own module (`incoming`, `outgoing`, `act`)."""

from serversync.services.admin import (
    ApplyReport,
    ChannelResult,
    ProberRegistry,
    ProfileReach,
    Services,
    TestReport,
    connect_options,
    utcnow,
)
from serversync.services.channels import ChannelJob, RunSummary

__all__ = ["ApplyReport", "ChannelJob", "ChannelResult", "ProberRegistry", "ProfileReach",
           "RunSummary", "Services", "TestReport", "connect_options", "utcnow"]
