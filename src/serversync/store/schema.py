"""Imports every table module so that `Base.metadata` knows the whole schema.

Each part of the system keeps its tables in its own module; add new ones here.
"""

from serversync.store import emails, tables  # noqa: F401
from serversync.store import incoming  # noqa: F401
from serversync.store import outgoing  # noqa: F401
from serversync.store import runs  # noqa: F401
from serversync.store import web  # noqa: F401
from serversync.store import act  # noqa: F401
from serversync.store import exchange  # noqa: F401
