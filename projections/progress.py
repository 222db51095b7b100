"""Progress of long runs (rebuilds): a bar with rate and ETA on a terminal, else plain lines."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

__all__ = ["LineProgress", "Progress", "TerminalProgress", "progress_for"]


class Progress(Protocol):
    """Receives the progress of a run over a known (estimated) number of events."""

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` events so far (``total`` grows if events keep arriving)."""

    def finish(self, done: int) -> None:
        """The run is over after ``done`` events."""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Rate:
    """Events per second over the whole run, and the time left at that rate."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def figures(self, done: int, total: int) -> tuple[float, str]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        eta = _duration((total - done) / rate) if rate > 0 and total > done else "0:00"
        return rate, eta


class TerminalProgress:
    """A one-line bar redrawn in place, at most ten times a second."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self._rate = _Rate()
        self._drawn = 0.0

    def update(self, done: int, total: int) -> None:
        """Redraw the bar (throttled)."""
        now = time.monotonic()
        if now - self._drawn < 0.1:
            return
        self._drawn = now
        self._draw(done, total)

    def _draw(self, done: int, total: int) -> None:
        total = max(total, done, 1)
        filled = int(self.width * done / total)
        rate, eta = self._rate.figures(done, total)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {100 * done / total:5.1f}% {done:,}/{total:,} events"
            f"  {rate:,.0f} events/s  ETA {eta} "
        )
        self.stream.flush()

    def finish(self, done: int) -> None:
        """Draw the full bar and end the line."""
        self._draw(done, done)
        self.stream.write("\n")
        self.stream.flush()


class LineProgress:
    """A plain line every ``interval`` seconds (for logs and pipes), and one at the end."""

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self._rate = _Rate()
        self._printed = time.monotonic()

    def update(self, done: int, total: int) -> None:
        """Print a line if ``interval`` seconds passed since the last one."""
        now = time.monotonic()
        if now - self._printed < self.interval:
            return
        self._printed = now
        total = max(total, done)
        rate, eta = self._rate.figures(done, total)
        pct = 100 * done / total if total else 100.0
        print(
            f"{self.label}: {done}/{total} events ({pct:.1f}%), {rate:.0f} events/s, ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def finish(self, done: int) -> None:
        """Print the final count and rate."""
        rate, _ = self._rate.figures(done, done)
        print(f"{self.label}: {done} events, {rate:.0f} events/s", file=self.stream, flush=True)


def progress_for(label: str, stream: TextIO | None = None) -> Progress:
    """A bar when ``stream`` (default stderr) is a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if stream.isatty():
        return TerminalProgress(label, stream)
    return LineProgress(label, stream)
