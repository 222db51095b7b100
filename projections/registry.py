"""The projections convstore runs, by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .base import Projection, ProjectionError
from .inbox import InboxProjection

__all__ = ["PROJECTIONS", "UnknownProjection", "get_projection"]

#: Every built-in projection by name, in the order they are run and reported.
PROJECTIONS: Mapping[str, Projection] = MappingProxyType({"inbox": InboxProjection()})


class UnknownProjection(ProjectionError, LookupError):
    """No projection has that name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no projection named {name!r} (known: {', '.join(PROJECTIONS) or 'none'})"
        )
        self.name = name


def get_projection(name: str) -> Projection:
    """The projection named ``name``; raise :class:`UnknownProjection` otherwise."""
    try:
        return PROJECTIONS[name]
    except KeyError:
        raise UnknownProjection(name) from None
