"""``python -m projections project|projections ...``: the projector commands on their own."""

from .cli import main

raise SystemExit(main())
