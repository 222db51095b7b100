"""The conversation domain: events, and the decisions taken over the event store."""

from .events import *  # noqa: F403
from .events import __all__ as _events_all

__all__ = [*_events_all]
