"""The projections convstore runs, by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from .base import Projection, ProjectionError
from .delivery import DeliveryProjection
from .inbox import InboxProjection

__all__ = ["PROJECTIONS", "REPORTED", "UnknownProjection", "get_projection"]

#: Every built-in projection by name, in the order they are run and reported.
PROJECTIONS: Mapping[str, Projection] = MappingProxyType({"inbox": InboxProjection()})

#: Every projection ``projections status`` reports: the built-in ones, and the reply delivery
#: daemon's (``convstore deliver`` runs it, on the same runner, with its own checkpoint).
REPORTED: Mapping[str, Projection] = MappingProxyType(
    {**PROJECTIONS, "delivery": DeliveryProjection()}
)


class UnknownProjection(ProjectionError, LookupError):
    """No projection has that name."""

    def __init__(self, name: str, known: Iterable[str] = PROJECTIONS) -> None:
        super().__init__(f"no projection named {name!r} (known: {', '.join(known) or 'none'})")
        self.name = name


def get_projection(name: str, among: Mapping[str, Projection] = PROJECTIONS) -> Projection:
    """The projection named ``name`` (one of ``among``); raise :class:`UnknownProjection`
    otherwise."""
    try:
        return among[name]
    except KeyError:
        raise UnknownProjection(name, among) from None
