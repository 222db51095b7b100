"""A Hypothesis state machine drives the store against a model of streams and versions.

Random appends (every expected-version mode, matching or not), retries of stored batches (with
their own or another expected version), conflicting duplicates, and reads of streams and of the
global log; after every step each stream's version must match the model.

The store is async and the database is per test, so one test function owns an ``asyncio.Runner``
and a pool on its database; every Hypothesis example works in stream categories of its own, so
it starts from an empty store as far as it can see.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from eventstore import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    Checkpoint,
    DuplicateEvent,
    EventStore,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersion,
    category_of,
    uuid7,
)
from eventstore.database import open_pool

T = TypeVar("T")
Expected = ExpectedVersion | int
#: A drawn expected-version mode: symbolic, an exact version relative to the model's current
#: one (so that matches are frequent), or an absolute exact version.
Mode = ExpectedVersion | tuple[str, int]

WAIT = 20.0
STREAM_SUFFIXES = ("-a", "-b", "o-c")  # two categories per example: "<prefix>" and "<prefix>o"

MODES: st.SearchStrategy[Mode] = st.one_of(
    st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS]),
    st.tuples(st.just("relative"), st.integers(-2, 1)),
    st.tuples(st.just("absolute"), st.integers(0, 6)),
)

SETTINGS = settings(
    max_examples=50,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Harness:
    """Runs the store's coroutines on one event loop from synchronous Hypothesis rules."""

    def __init__(self, runner: asyncio.Runner, store: EventStore) -> None:
        self.runner = runner
        self.store = store
        self.examples = itertools.count()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def settle(self) -> None:
        """Wait until the cluster-wide snapshot fence has passed every stored event."""
        self.run(self._settle())

    async def _settle(self) -> None:
        async with asyncio.timeout(WAIT):
            while True:
                async with self.store.pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT pg_snapshot_xmin(pg_current_snapshot())"
                        " > coalesce(max(transaction_id), '0'::xid8) FROM events"
                    )
                    row = await cur.fetchone()
                if row is not None and row[0]:
                    return
                await asyncio.sleep(0.01)


class Batch(msgspec.Struct, frozen=True):
    """A batch the model knows is stored: where, how it was appended and what came back."""

    stream: str
    events: tuple[NewEvent, ...]
    expected: Expected
    base: int  # the stream's version before the batch
    result: AppendResult


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.h = harness
        self.prefix = f"ex{next(harness.examples)}"
        self.streams = [self.prefix + s for s in STREAM_SUFFIXES]
        self.model: dict[str, list[NewEvent]] = {s: [] for s in self.streams}
        self.log: list[NewEvent] = []  # this example's events in global-log order
        self.stream_of: dict[uuid.UUID, str] = {}
        self.batches: list[Batch] = []
        self.counter = itertools.count()
        harness.settle()
        self.start: Checkpoint = harness.run(harness.store.head())
        self.last: Checkpoint = self.start

    # -------------------------------------------------------------- helpers

    def new_event(self, stream: str) -> NewEvent:
        n = next(self.counter)
        return NewEvent(uuid7(), f"Type{n % 3}", msgspec.json.encode({"s": stream, "n": n}))

    def version(self, stream: str) -> int:
        return len(self.model[stream])

    @staticmethod
    def expected_for(mode: Mode, current: int) -> Expected:
        if isinstance(mode, ExpectedVersion):
            return mode
        kind, value = mode
        return max(0, current + value) if kind == "relative" else value

    @staticmethod
    def holds(expected: Expected, current: int) -> bool:
        if expected is ANY:
            return True
        if expected is STREAM_EXISTS:
            return current > 0
        if expected is NO_STREAM:
            return current == 0
        return expected == current

    def append(self, stream: str, events: list[NewEvent], expected: Expected) -> AppendResult:
        return self.h.run(self.h.store.append(stream, events, expected))

    def conflict(
        self, stream: str, events: list[NewEvent], expected: Expected, actual: int
    ) -> None:
        try:
            self.append(stream, events, expected)
        except WrongExpectedVersion as error:
            assert (error.stream_id, error.expected, error.actual) == (stream, expected, actual)
        else:
            raise AssertionError(f"append to {stream} at {expected!r} should have conflicted")

    def duplicate(self, stream: str, events: list[NewEvent], expected: Expected) -> None:
        try:
            self.append(stream, events, expected)
        except DuplicateEvent as error:
            assert error.stream_id == stream
            stored = {e.event_id for e in self.log}
            assert set(error.event_ids) <= stored and error.event_ids
        else:
            raise AssertionError(f"append to {stream} should have been a duplicate")

    # -------------------------------------------------------------- rules

    @rule(index=st.integers(0, len(STREAM_SUFFIXES) - 1), size=st.integers(1, 3), mode=MODES)
    def append_new_events(self, index: int, size: int, mode: Mode) -> None:
        stream = self.streams[index]
        current = self.version(stream)
        expected = self.expected_for(mode, current)
        events = [self.new_event(stream) for _ in range(size)]
        if not self.holds(expected, current):
            self.conflict(stream, events, expected, current)
            return
        result = self.append(stream, events, expected)
        assert result.stream_id == stream
        assert result.version == current + size
        assert len(result.positions) == len(result.checkpoints) == size
        checkpoints = [self.last, *result.checkpoints]
        assert checkpoints == sorted(checkpoints) and len(set(checkpoints)) == size + 1
        assert [c.position for c in result.checkpoints] == list(result.positions)
        self.last = result.checkpoints[-1]
        self.model[stream].extend(events)
        self.log.extend(events)
        self.stream_of.update((e.event_id, stream) for e in events)
        self.batches.append(Batch(stream, tuple(events), expected, current, result))

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def retry_a_stored_batch(self, data: st.DataObject) -> None:
        batch = data.draw(st.sampled_from(self.batches), label="batch")
        current = self.version(batch.stream)
        same = data.draw(st.booleans(), label="same expected version")
        expected = batch.expected if same else self.expected_for(data.draw(MODES), current)
        if expected is ANY or expected is STREAM_EXISTS or same:
            idempotent = True
        elif expected is NO_STREAM:
            idempotent = batch.base == 0
        else:
            idempotent = expected == batch.base
        if idempotent:
            assert self.append(batch.stream, list(batch.events), expected) == batch.result
        else:
            self.conflict(batch.stream, list(batch.events), expected, current)

    @precondition(lambda self: self.log)
    @rule(data=st.data(), mode=MODES)
    def append_a_stored_id_with_other_content(self, data: st.DataObject, mode: Mode) -> None:
        event = data.draw(st.sampled_from(self.log), label="stored event")
        stream = self.stream_of[event.event_id]
        changed = NewEvent(event.event_id, event.type, msgspec.json.encode({"changed": True}))
        self.duplicate(stream, [changed], self.expected_for(mode, self.version(stream)))

    @precondition(lambda self: self.log)
    @rule(data=st.data(), index=st.integers(0, len(STREAM_SUFFIXES) - 1), mode=MODES)
    def append_a_stored_id_to_another_stream(
        self, data: st.DataObject, index: int, mode: Mode
    ) -> None:
        event = data.draw(st.sampled_from(self.log), label="stored event")
        stream = self.streams[index]
        if self.stream_of[event.event_id] == stream:
            stream = self.prefix + "-elsewhere"  # a stream that never gets an event
            self.model.setdefault(stream, [])
        self.duplicate(stream, [event], self.expected_for(mode, self.version(stream)))

    @precondition(lambda self: self.batches)
    @rule(data=st.data(), mode=MODES, at=st.integers(0, 3))
    def append_a_batch_mixing_new_and_stored_ids(
        self, data: st.DataObject, mode: Mode, at: int
    ) -> None:
        batch = data.draw(st.sampled_from(self.batches), label="batch")
        events = list(batch.events)
        events.insert(min(at, len(events)), self.new_event(batch.stream))
        expected = self.expected_for(mode, self.version(batch.stream))
        self.duplicate(batch.stream, events, expected)

    @rule(
        index=st.integers(0, len(STREAM_SUFFIXES) - 1),
        backwards=st.booleans(),
        from_version=st.none() | st.integers(0, 12),
        limit=st.integers(1, 12),
    )
    def read_a_stream(
        self, index: int, backwards: bool, from_version: int | None, limit: int
    ) -> None:
        stream = self.streams[index]
        events = self.model[stream]
        if backwards:
            top = len(events) if from_version is None else min(from_version, len(events))
            want = events[:top][::-1][:limit]
        else:
            start = 1 if from_version is None else max(from_version, 1)
            want = events[start - 1 :][:limit]
        got = self.h.run(
            self.h.store.read_stream(
                stream, from_version, "backwards" if backwards else "forwards", limit
            )
        )
        assert [e.event_id for e in got] == [e.event_id for e in want]
        assert all(self.same(r, e, stream) for r, e in zip(got, want, strict=True))
        versions = [e.stream_version for e in got]
        assert versions == sorted(versions, reverse=backwards)

    @rule(page=st.integers(1, 25), own_category_only=st.booleans())
    def read_the_global_log(self, page: int, own_category_only: bool) -> None:
        self.h.settle()
        categories = [self.prefix] if own_category_only else None
        got: list[RecordedEvent] = []
        checkpoint = self.start
        while batch := self.h.run(self.h.store.read_all(checkpoint, page, categories=categories)):
            got.extend(batch)
            checkpoint = batch[-1].checkpoint
        want = [
            e
            for e in self.log
            if not own_category_only or category_of(self.stream_of[e.event_id]) == self.prefix
        ]
        assert [e.event_id for e in got] == [e.event_id for e in want]
        checkpoints = [e.checkpoint for e in got]
        assert checkpoints == sorted(checkpoints) and len(set(checkpoints)) == len(got)
        if not own_category_only:
            assert not got or got[-1].checkpoint == self.last

    @staticmethod
    def same(recorded: RecordedEvent, event: NewEvent, stream: str) -> bool:
        return (
            recorded.stream_id == stream
            and recorded.type == event.type
            and recorded.data == msgspec.json.decode(event.data)
        )

    # -------------------------------------------------------------- invariants

    @invariant()
    def every_stream_is_at_its_model_version(self) -> None:
        for stream in self.model:
            assert self.h.run(self.h.store.stream_version(stream)) == self.version(stream)


def test_the_store_matches_a_model_of_streams_and_versions(database_url: str) -> None:
    with asyncio.Runner() as runner:
        pool = runner.run(open_pool(database_url, min_size=1, max_size=4))
        store = EventStore(pool)
        try:
            harness = Harness(runner, store)

            class Machine(StoreMachine):
                def __init__(self) -> None:
                    super().__init__(harness)

            run_state_machine_as_test(Machine, settings=SETTINGS)
            assert next(harness.examples) > 1
        finally:
            runner.run(store.close())
            runner.run(pool.close())
