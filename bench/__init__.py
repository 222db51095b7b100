"""convstore's benchmarks: each path measured as a ratio against plain PostgreSQL, same run.

``python -m bench`` (``make bench``; ``make bench-quick`` for ``--quick``) creates a scratch
database next to the configured one, migrates it, runs every registered path against its
reference in alternating rounds, runs the EXPLAIN checks of the hot queries, prints one line per
path (``name value unit reference ratio`` and its target) and writes ``bench/RESULTS.md`` and
``bench/results.json``. Paths are registered in :mod:`bench.registry`; see its docstring to add
one.
"""
