"""Projector daemons and the read models they build from the global log."""

__all__: list[str] = []
