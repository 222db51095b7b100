"""Projector daemons and the read models they build from the global log.

- :class:`Projection`: a read model's name, version, tables and batch handler; the same code
  builds any schema (live ``rm_<name>``, a rebuild's ``rm_<name>_next``, ``pg_temp``).
- :class:`ProjectionRunner` / :func:`run_projections`: leadership, catch-up, follow, retries.
- :func:`rebuild`, :func:`build_into`, :func:`compare_read_models`: history into new tables.
- :class:`InboxQueries`: the query API the HTTP handlers and the command line share.
"""

from .base import (
    EventFailed,
    Projection,
    ProjectionError,
    ReadModelMissing,
    UndecodableEvent,
    live_schema,
    next_schema,
)
from .inbox import InboxProjection
from .queries import (
    Conversation,
    InboxQueries,
    InvalidQuery,
    Message,
    Page,
    StatusCounts,
)
from .rebuild import (
    RebuildBusy,
    RebuildFailed,
    RebuildResult,
    build_into,
    compare_read_models,
    rebuild,
)
from .registry import PROJECTIONS, UnknownProjection, get_projection
from .runner import (
    Applier,
    BatchResult,
    Outcome,
    ProjectionRunner,
    VersionMismatch,
    catch_up,
    run_projections,
)
from .status import ProjectionStatus, projection_status

__all__ = [
    "PROJECTIONS",
    "Applier",
    "BatchResult",
    "Conversation",
    "EventFailed",
    "InboxProjection",
    "InboxQueries",
    "InvalidQuery",
    "Message",
    "Outcome",
    "Page",
    "Projection",
    "ProjectionError",
    "ProjectionRunner",
    "ProjectionStatus",
    "ReadModelMissing",
    "RebuildBusy",
    "RebuildFailed",
    "RebuildResult",
    "StatusCounts",
    "UndecodableEvent",
    "UnknownProjection",
    "VersionMismatch",
    "build_into",
    "catch_up",
    "compare_read_models",
    "get_projection",
    "live_schema",
    "next_schema",
    "projection_status",
    "rebuild",
    "run_projections",
]
