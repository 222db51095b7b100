"""The soak's short version: a few thousand deliveries through the real processes, with every
fault (projector SIGKILLs, a server SIGKILL, a PostgreSQL crash-restart), then its checks.

It starts a PostgreSQL cluster of its own (the soak never touches ``DATABASE_URL``'s server).
``make soak`` runs the long version (N = 20,000); docs/RELIABILITY.md has its figures.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: Deliveries in CI: enough for every fault to land mid-traffic, well under three minutes.
DELIVERIES = 3000


@pytest.mark.slow
def test_soak_short_version_loses_and_duplicates_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--deliveries", str(DELIVERIES), "--seed", "7"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    out = done.stdout
    assert done.returncode == 0, out[-6000:] + done.stderr[-3000:]
    assert "soak: all checks passed" in out and "FAIL" not in out
    assert out.count("  PASS  ") == 10
    assert f"{DELIVERIES} = {DELIVERIES} = {DELIVERIES}" in out
