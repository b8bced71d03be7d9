"""The channel contract's fixture: ``backend``, parametrized over the server kinds.

Every contract test takes ``backend`` (and, through it, ``db``), so it runs once per
backend — ``imap`` (the real Dovecot, Postfix and Radicale), ``ews`` and ``graph`` (the
loopback fakes) — on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serversync.services import Services
from tests.contract.backends import BACKENDS, Backend


@pytest.fixture(params=[pytest.param("imap", marks=pytest.mark.servers), "ews", "graph"])
def backend(request: pytest.FixtureRequest, services: Services) -> Iterator[Backend]:
    if request.param == "imap":
        request.getfixturevalue("test_servers")
    adapter = BACKENDS[request.param](services)
    try:
        yield adapter
    finally:
        adapter.close()
