"""The registered paths: importing this package registers every path, in run order.

A later issue adds a module here (``ingest.py``, ``projector.py``, ``inbox.py``,
``webhook.py``, ``replay.py``...) that calls :func:`bench.registry.register`, and imports it
below.
"""

from . import append, delivery, ingest, read_all

__all__ = ["append", "delivery", "read_all", "ingest"]
