"""services.bulkgc: thresholds raised while any bulk run is active, restored after the last."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from serversync.services.bulkgc import relaxed_gc


@pytest.fixture(autouse=True)
def default_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_overlapping_runs_restore_the_thresholds_once_all_end() -> None:
    first = relaxed_gc(5000)
    second = relaxed_gc(5000)
    first.__enter__()
    assert gc.get_threshold() == (5000, 10, 10)
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still runs
    assert gc.get_threshold() == (5000, 10, 10)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == (700, 10, 10)


def test_restored_when_the_run_fails() -> None:
    with pytest.raises(RuntimeError), relaxed_gc(9000):
        assert gc.isenabled() and gc.get_threshold()[0] == 9000
        raise RuntimeError("run failed")
    assert gc.get_threshold() == (700, 10, 10)
