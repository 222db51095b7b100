"""The registered paths: importing this package registers every path, in run order.

A later issue adds a module here (``ingest.py``, ``projector.py``, ``inbox.py``,
``webhook.py``, ``replay.py``...) that calls :func:`bench.registry.register`, and imports it
below. The paths that load large data sets (the synthetic traffic of ``projector``, the
1M-conversation read model of ``inbox``) are imported after the others, so that the log the
earlier paths scan keeps its size.
"""

# isort: off
from . import append, delivery, ingest, read_all
from . import projector, inbox, replay, webhook

# isort: on

__all__ = ["append", "delivery", "read_all", "ingest", "projector", "inbox", "replay", "webhook"]
