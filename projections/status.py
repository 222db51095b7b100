"""``convstore projections status``: where each projection is, who runs it, what stopped it."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from .base import CHECKPOINT_TABLE, Projection, live_schema, next_schema
from .rebuild import events_after
from .runner import LEADER_LOCK, REBUILD_LOCK, advisory_key, lock_holder

__all__ = ["ProjectionStatus", "RebuildProgress", "format_status", "projection_status"]


class RebuildProgress(msgspec.Struct, frozen=True):
    """A rebuild under way (or interrupted, to be resumed): its checkpoint and events so far."""

    checkpoint: str
    events: int
    running: bool


class ProjectionStatus(msgspec.Struct, frozen=True):
    """One projection's state, as ``convstore projections status`` shows it.

    ``state`` is ``running`` (an instance leads), ``retrying`` (one leads and retries the event
    that had stopped it), ``failed`` (stopped on an event, see ``failed_*``), ``halted`` (its
    last instance stopped on an error that was not an event's, see ``last_error``), ``stopped``
    (shut down cleanly) or ``not built`` (no projector ever ran here).
    """

    name: str
    code_version: int
    version: int | None
    state: str
    checkpoint: str | None
    events_applied: int
    events_behind: int
    applied_at: dt.datetime | None
    leader: str | None
    leader_pid: int | None
    standbys: int
    last_error: str | None
    last_error_at: dt.datetime | None
    failed_event_id: uuid.UUID | None
    failed_event_type: str | None
    failed_stream_id: str | None
    failed_checkpoint: str | None
    failed_attempts: int | None
    rebuilt_at: dt.datetime | None
    rebuild: RebuildProgress | None


async def _checkpoint_row(
    conn: psycopg.AsyncConnection[Any], schema: str, name: str
) -> tuple[Any, ...] | None:
    table = sql.Identifier(schema, CHECKPOINT_TABLE)
    exists = await (
        await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table.as_string(conn),))
    ).fetchone()
    if not exists or not exists[0]:
        return None
    return await (
        await conn.execute(
            sql.SQL(
                "SELECT version, transaction_id, position, events, updated_at FROM {t}"
                " WHERE projection = %s"
            ).format(t=table),
            (name,),
        )
    ).fetchone()


async def _one(conn: psycopg.AsyncConnection[Any], projection: Projection) -> ProjectionStatus:
    name = projection.name
    live = await _checkpoint_row(conn, live_schema(name), name)
    building = await _checkpoint_row(conn, next_schema(name), name)
    recorded = await (
        await conn.execute(
            "SELECT state, leader, last_error, last_error_at, failed_event_id, failed_event_type,"
            " failed_stream_id, failed_checkpoint, failed_attempts, rebuilt_at"
            " FROM projection_status WHERE name = %s",
            (name,),
        )
    ).fetchone()
    (
        recorded_state,
        leader,
        last_error,
        last_error_at,
        failed_event_id,
        failed_event_type,
        failed_stream_id,
        failed_checkpoint,
        failed_attempts,
        rebuilt_at,
    ) = recorded or (None,) * 10
    leader_pid = await lock_holder(conn, advisory_key(LEADER_LOCK, name))
    standby_row = await (
        await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s",
            (f"convstore projector {name} standby",),
        )
    ).fetchone()
    standbys = int(standby_row[0]) if standby_row else 0
    checkpoint = None
    behind = 0
    if live is not None:
        from eventstore import Checkpoint

        cp = Checkpoint(int(live[1]), int(live[2]))
        checkpoint = str(cp)
        behind = await events_after(conn, cp)
    else:
        row = await (await conn.execute("SELECT count(*) FROM events")).fetchone()
        behind = int(row[0]) if row else 0
    if failed_checkpoint is not None:
        state = "retrying" if leader_pid is not None else "failed"
    elif leader_pid is not None:
        state = "running"
    elif recorded_state == "halted":
        state = "halted"
    elif live is None:
        state = "not built"
    else:
        state = "stopped"
    rebuild = None
    if building is not None:
        running = await lock_holder(conn, advisory_key(REBUILD_LOCK, name)) is not None
        rebuild = RebuildProgress(f"{building[1]}:{building[2]}", int(building[3]), running)
    return ProjectionStatus(
        name=name,
        code_version=projection.version,
        version=int(live[0]) if live is not None else None,
        state=state,
        checkpoint=checkpoint,
        events_applied=int(live[3]) if live is not None else 0,
        events_behind=behind,
        applied_at=live[4] if live is not None else None,
        leader=leader if leader_pid is not None else None,
        leader_pid=leader_pid,
        standbys=standbys,
        last_error=last_error,
        last_error_at=last_error_at,
        failed_event_id=failed_event_id,
        failed_event_type=failed_event_type,
        failed_stream_id=failed_stream_id,
        failed_checkpoint=failed_checkpoint,
        failed_attempts=failed_attempts,
        rebuilt_at=rebuilt_at,
        rebuild=rebuild,
    )


async def projection_status(
    pool: AsyncConnectionPool[Any], projections: Sequence[Projection]
) -> list[ProjectionStatus]:
    """The status of each projection, in the order given."""
    async with pool.connection() as conn:
        return [await _one(conn, projection) for projection in projections]


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "never"


def format_status(status: ProjectionStatus) -> list[str]:
    """Human-readable lines for one projection."""
    version = (
        f"version {status.version}"
        if status.version == status.code_version
        else f"version {status.version}, code version {status.code_version}: rebuild needed"
        if status.version is not None
        else f"code version {status.code_version}"
    )
    lines = [f"{status.name} ({version})"]
    state = status.state
    if status.leader_pid is not None:
        state += f", led by {status.leader or '?'} (backend pid {status.leader_pid})"
    if status.standbys:
        state += f", {status.standbys} standby"
    lines.append(f"  state:       {state}")
    if status.checkpoint is not None:
        lines.append(
            f"  checkpoint:  {status.checkpoint} ({status.events_applied} events applied,"
            f" last at {_when(status.applied_at)})"
        )
    lines.append(f"  behind:      {status.events_behind} events")
    if status.failed_checkpoint is not None:
        lines.append(
            f"  stopped on:  event {status.failed_event_id} ({status.failed_event_type} in"
            f" {status.failed_stream_id}) at {status.failed_checkpoint},"
            f" after {status.failed_attempts} attempts"
        )
    if status.last_error is not None:
        lines.append(f"  last error:  {status.last_error} ({_when(status.last_error_at)})")
    else:
        lines.append("  last error:  none")
    if status.rebuild is not None:
        doing = "running" if status.rebuild.running else "interrupted (run rebuild to resume)"
        lines.append(
            f"  rebuild:     {doing}, at {status.rebuild.checkpoint}"
            f" ({status.rebuild.events} events)"
        )
    if status.rebuilt_at is not None:
        lines.append(f"  rebuilt:     {_when(status.rebuilt_at)}")
    return lines
