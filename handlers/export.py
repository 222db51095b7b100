"""``convstore replay``: a slice of the log as JSON Lines or CSV, streamed in constant memory."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import sys
import time
from typing import IO, Any

import msgspec

from eventstore.database import open_pool
from eventstore.records import Checkpoint, RecordedEvent
from eventstore.replay import RawCodec, ReplayFilter, replay
from eventstore.store import EventStore

__all__ = ["CSV_COLUMNS", "ReplayLine", "export", "parse_time"]

CSV_COLUMNS = (
    "position",
    "checkpoint",
    "event_id",
    "stream",
    "version",
    "type",
    "recorded_at",
    "data",
    "metadata",
)


class ReplayLine(msgspec.Struct, frozen=True):
    """One exported event (the JSON Lines shape)."""

    position: int
    checkpoint: str
    event_id: Any
    stream: str
    version: int
    type: str
    data: msgspec.Raw
    metadata: msgspec.Raw
    recorded_at: dt.datetime


def parse_time(text: str) -> dt.datetime:
    """ISO 8601; a time without an offset is taken as UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _line(event: RecordedEvent) -> ReplayLine:
    return ReplayLine(
        position=event.position,
        checkpoint=str(event.checkpoint),
        event_id=event.event_id,
        stream=event.stream_id,
        version=event.stream_version,
        type=event.type,
        data=event.data,
        metadata=msgspec.Raw(event.metadata_json),
        recorded_at=event.recorded_at,
    )


async def export(
    database_url: str,
    where: ReplayFilter,
    out: IO[bytes],
    *,
    fmt: str = "jsonl",
    progress: IO[str] | None = None,
) -> int:
    """Write every event of the slice to ``out``; return how many were written."""
    encoder = msgspec.json.Encoder()
    pool = await open_pool(database_url, min_size=1, max_size=1)
    count = 0
    started = last = time.monotonic()
    buffer = bytearray()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(CSV_COLUMNS)
    try:
        store = EventStore(pool, RawCodec())
        async for event in replay(store, where):
            line = _line(event)
            if fmt == "jsonl":
                encoder.encode_into(line, buffer, -1)
                buffer.extend(b"\n")
            else:
                writer.writerow(
                    (
                        line.position,
                        line.checkpoint,
                        line.event_id,
                        line.stream,
                        line.version,
                        line.type,
                        line.recorded_at.isoformat(),
                        bytes(line.data).decode(),
                        bytes(line.metadata).decode(),
                    )
                )
            count += 1
            if count % 1000 == 0:
                _flush(out, buffer, text)
                now = time.monotonic()
                if progress is not None and now - last >= 0.5:
                    rate = count / max(now - started, 1e-9)
                    progress.write(f"\rreplayed {count:,} events ({rate:,.0f}/s)")
                    progress.flush()
                    last = now
        _flush(out, buffer, text)
        out.flush()
    finally:
        await pool.close()
    if progress is not None:
        progress.write(f"\rreplayed {count:,} events{' ' * 20}\n")
    return count


def _flush(out: IO[bytes], buffer: bytearray, text: io.StringIO) -> None:
    if buffer:
        out.write(buffer)
        buffer.clear()
    if text.tell():
        out.write(text.getvalue().encode())
        text.seek(0)
        text.truncate()


def run_export(args: Any, database_url: str) -> int:
    """The ``replay`` command: quiet and successful when the reader closes the pipe."""
    import asyncio

    where = ReplayFilter(
        after=Checkpoint.parse(args.after) if args.after else None,
        after_position=args.after_position,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        streams=tuple(args.stream) if args.stream else None,
        categories=tuple(args.category) if args.category else None,
        types=tuple(args.type) if args.type else None,
    )
    progress = sys.stderr if sys.stderr.isatty() else None
    if args.out:
        try:
            out_file = open(args.out, "wb")  # closed by the with below
        except OSError as exc:
            raise ValueError(f"cannot write {args.out}: {exc.strerror}") from None
        with out_file as out:
            count = asyncio.run(
                export(database_url, where, out, fmt=args.format, progress=progress)
            )
        print(f"wrote {count} events to {args.out}", file=sys.stderr)
        return 0
    try:
        asyncio.run(
            export(database_url, where, sys.stdout.buffer, fmt=args.format, progress=progress)
        )
    except BrokenPipeError:
        # `convstore replay | head`: the reader is done; end quietly (and keep Python's
        # exit-time flush of stdout from raising again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
