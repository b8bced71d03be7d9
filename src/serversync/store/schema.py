"""Imports every table module so that `Base.metadata` knows the whole schema.

Each part of the system keeps its tables in its own module; add new ones here.
"""

from serversync.store import (  # noqa: F401
    act,
    emails,
    exchange,
    incoming,
    outgoing,
    runs,
    sign_ins,
    tables,
    web,
)
