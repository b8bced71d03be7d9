"""``make demo`` end to end: seeds frank and grace, serves, and exits after the first sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.servers


def test_demo_syncs_and_exits(test_servers: object, tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_EXIT_AFTER_SYNC": "1", "DEMO_STATE": str(tmp_path / "state"),
           "DEMO_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "serversync.demo"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=150, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "admin UI and API at http://127.0.0.1:" in output and ":0/" not in output
    assert "sign in with the admin token sst_" in output
    assert "first sync complete:" in output
    incoming = [line for line in output.splitlines() if " incoming " in line and "success" in line]
    assert len(incoming) == 2, output  # frank and the sales queue (grace)
    assert "2 tracked" in output and "1 tracked" in output
    assert (tmp_path / "state" / "serversync.db").exists()
    assert (tmp_path / "state" / "serversync.key").stat().st_mode & 0o077 == 0
