"""What the figures were measured on: the machine, the PostgreSQL server and its settings.

Every figure of the bench is a ratio against a reference measured in the same run, but a reader
still needs to know the machine (a 2-core shared box and a 32-core server give different
absolute numbers) and that the server was durable: the bench never changes ``fsync``,
``synchronous_commit`` or ``full_page_writes`` and flags a server where any of them is off.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import psycopg

__all__ = [
    "DURABILITY_SETTINGS",
    "code_revision",
    "KEY_SETTINGS",
    "MachineInfo",
    "ServerInfo",
    "machine_info",
    "server_info",
]

#: Settings that must be on for figures to mean anything for a durable store.
DURABILITY_SETTINGS: tuple[str, ...] = ("fsync", "synchronous_commit", "full_page_writes")

#: Settings recorded with every run (those a server does not have are left out).
KEY_SETTINGS: tuple[str, ...] = (
    *DURABILITY_SETTINGS,
    "wal_sync_method",
    "wal_level",
    "wal_compression",
    "wal_buffers",
    "commit_delay",
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "max_connections",
    "max_wal_size",
    "checkpoint_timeout",
    "data_checksums",
    "huge_pages",
    "jit",
    "io_method",
    "random_page_cost",
    "autovacuum",
)


class MachineInfo(msgspec.Struct, frozen=True):
    """The client machine (the bench runs beside the server: both are local here)."""

    nproc: int
    cpu_model: str
    memory_mib: int
    load_average: tuple[float, float, float]
    platform: str
    python: str
    psycopg: str
    libpq: int
    msgspec: str


class ServerInfo(msgspec.Struct, frozen=True):
    """The PostgreSQL server: version, how we reach it, and its key settings."""

    version: str
    version_num: int
    transport: str
    settings: dict[str, str]
    durable: bool


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info() -> MachineInfo:
    """Describe this machine: cores available to us, CPU model, memory, library versions."""
    load = os.getloadavg()
    return MachineInfo(
        nproc=_nproc(),
        cpu_model=_cpu_model(),
        memory_mib=_memory_mib(),
        load_average=(round(load[0], 2), round(load[1], 2), round(load[2], 2)),
        platform=platform.platform(),
        python=sys.version.split()[0],
        psycopg=psycopg.__version__,
        libpq=psycopg.pq.version(),
        msgspec=metadata.version("msgspec"),
    )


async def server_info(conn: psycopg.AsyncConnection[Any]) -> ServerInfo:
    """Describe the server ``conn`` is connected to."""
    row = await (
        await conn.execute("SELECT version(), current_setting('server_version_num')::int")
    ).fetchone()
    assert row is not None
    rows = await (
        await conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(KEY_SETTINGS),),
        )
    ).fetchall()
    found = {str(name): str(value) for name, value in rows}
    settings = {name: found[name] for name in KEY_SETTINGS if name in found}
    durable = all(settings.get(name, "on") != "off" for name in DURABILITY_SETTINGS)
    host = conn.info.host
    transport = f"unix socket {host}" if host.startswith("/") else f"tcp {host}:{conn.info.port}"
    return ServerInfo(
        version=str(row[0]),
        version_num=int(row[1]),
        transport=transport,
        settings=settings,
        durable=durable,
    )


def code_revision() -> str:
    """The commit the measured code is at, with ``+dirty`` when eventstore/ or sql/ differ."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "eventstore", "sql"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
