"""Every command the README shows is run here (or, for `make`, by CI), against a test database.

The README's ```sh blocks are parsed line by line: `.venv/bin/convstore ...` runs as
`python -m handlers.cli ...`, long-running commands (`serve`, `project` without `--once`) are
started, checked, and stopped with SIGTERM, and `export DATABASE_URL=...` is replaced by the
test's own database. `make demo` and `make test` are what CI runs (.ci/run).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """The shell commands of the README's ```sh blocks, continuation lines joined."""
    text = README.read_text()
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _argv(words: list[str]) -> list[str]:
    exe = words[0]
    if exe == ".venv/bin/convstore":
        return [sys.executable, "-m", "handlers.cli", *words[1:]]
    if exe == ".venv/bin/python":
        return [sys.executable, *words[1:]]
    raise AssertionError(f"README command not understood by this test: {words}")


def _run_long(argv: list[str], env: dict[str, str], cwd: Path, health: str | None) -> None:
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        if health is not None:
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    with urllib.request.urlopen(health, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        else:
            time.sleep(3)
            assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)


def test_every_readme_command_runs(database_url: str, tmp_path: Path) -> None:
    commands = [shlex.split(line, comments=True) for line in readme_commands()]
    assert ["make", "demo"] in commands and ["make", "test"] in commands
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/convstore demo" in makefile and "$(BIN)/python -m pytest" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make demo" in ci and "make bench-quick" in ci
    assert "$(BIN)/python -m tests.soak" in makefile  # tests/test_soak.py runs that module

    (tmp_path / "docs").symlink_to(ROOT / "docs")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
        "CONVSTORE_API_TOKEN": "readme-token",
    }
    ran = 0
    for words in commands:
        command = " ".join(words)
        if words[0] == "make":
            continue  # run by CI
        if words[0] == "export":
            continue  # the test's database stands in for the example URL
        while "=" in words[0] and not words[0].startswith("."):
            name, _, value = words.pop(0).partition("=")
            env = {**env, name: value}
        argv = _argv(words)
        if "serve" in words:
            port = _free_port()
            argv = [("127.0.0.1" if a == "0.0.0.0" else a) for a in argv]
            argv[argv.index("--port") + 1] = str(port)
            _run_long(argv, env, tmp_path, f"http://127.0.0.1:{port}/healthz")
        elif words[1:] in (["project"], ["deliver"]):
            _run_long(argv, env, tmp_path, None)
        else:
            done = subprocess.run(
                argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        ran += 1
    assert ran >= 15
