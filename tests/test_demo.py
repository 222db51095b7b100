"""The README's first command: the demo runs end to end (smaller traffic) and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_its_checks_pass_twice(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    for _ in range(2):  # a second run adds to the data and must still pass
        done = subprocess.run(
            [sys.executable, "-m", "handlers.cli", "demo", "--customers", "40", "--messages", "4"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        out = done.stdout
        assert "demo: all checks passed" in out
        assert out.count("  PASS  ") == 4 and "FAIL" not in out
        assert "delivery daemon sent" in out
        assert "Inbox of demo-messenger" in out and "History of customer" in out
