"""The EventStore contract: expected versions, idempotency, reads, filters, codecs, subscribe.

Every test runs against a real PostgreSQL database of its own (see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import msgspec
import pytest
from psycopg_pool import AsyncConnectionPool

from eventstore import (
    ANY,
    NO_STREAM,
    START,
    STREAM_EXISTS,
    AppendResult,
    Checkpoint,
    DuplicateEvent,
    EventCodec,
    EventStore,
    ExpectedVersion,
    InvalidAppend,
    NewEvent,
    RecordedEvent,
    StreamDeleted,
    StreamState,
    UnknownEventType,
    WrongExpectedVersion,
    uuid7,
)
from tests.conftest import wait_for_fence

Pool = AsyncConnectionPool[Any]
Expected = ExpectedVersion | int

WAIT = 20.0  # seconds: the most any test here waits for anything


class Boom(Exception):
    """Raised inside a caller's transaction to make psycopg roll it back."""


def ev(type_: str = "Noted", event_id: uuid.UUID | None = None, **data: Any) -> NewEvent:
    """A new event with JSON object data."""
    return NewEvent(
        event_id=event_id or uuid7(),
        type=type_,
        data=msgspec.json.encode(data or {"n": 0}),
        metadata={"correlation_id": "c-1"},
    )


def evs(n: int, type_: str = "Noted") -> list[NewEvent]:
    return [ev(type_, n=i) for i in range(n)]


def ids(events: Sequence[NewEvent | RecordedEvent]) -> list[uuid.UUID]:
    return [e.event_id for e in events]


async def table_counts(pool: Pool) -> tuple[int, int]:
    """(number of events, number of streams) stored."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM streams)"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def max_position(pool: Pool) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT coalesce(max(position), 0) FROM events")).fetchone()
    assert row is not None
    return int(row[0])


async def settled(store: EventStore) -> None:
    """Wait until the global-log fence has passed every stored event (see wait_for_fence).

    Tests that assert what ``read_all`` returns wait for it first; tests about the fence itself
    do not use this.
    """
    await wait_for_fence(store.pool, WAIT)


async def collect(
    subscription: AsyncGenerator[RecordedEvent, None],
    count: int,
    on_event: Any = None,
) -> list[RecordedEvent]:
    """Take ``count`` events from a subscription (closing it), calling ``on_event`` on each."""
    received: list[RecordedEvent] = []
    async with contextlib.aclosing(subscription) as sub:
        async for event in sub:
            received.append(event)
            if on_event is not None:
                await on_event(received)
            if len(received) == count:
                break
    return received


def subscription(store: EventStore, **kwargs: Any) -> AsyncGenerator[RecordedEvent, None]:
    return cast(AsyncGenerator[RecordedEvent, None], store.subscribe(**kwargs))


# ---------------------------------------------------------------------------- expected versions


async def test_any_creates_then_extends_a_stream(store: EventStore) -> None:
    first = await store.append("chat-1", evs(2), ANY)
    assert first.stream_id == "chat-1"
    assert first.version == 2
    second = await store.append("chat-1", evs(1))  # ANY is the default
    assert second.version == 3
    assert second.positions[0] > first.positions[-1]
    assert second.checkpoints[0] > first.checkpoints[-1]
    assert [e.stream_version for e in await store.read_stream("chat-1")] == [1, 2, 3]
    assert await store.stream_version("chat-1") == 3


@pytest.mark.parametrize("expected", [NO_STREAM, 0], ids=["no_stream", "exact-0"])
async def test_empty_stream_expectation_succeeds_on_a_new_stream(
    store: EventStore, expected: Expected
) -> None:
    result = await store.append("chat-1", evs(3), expected)
    assert result.version == 3
    assert len(result.positions) == len(result.checkpoints) == 3
    assert list(result.positions) == sorted(result.positions)
    assert [c.position for c in result.checkpoints] == list(result.positions)


@pytest.mark.parametrize("expected", [NO_STREAM, 0], ids=["no_stream", "exact-0"])
async def test_empty_stream_expectation_fails_on_an_existing_stream(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    await store.append("chat-1", evs(2))
    before = await table_counts(pool)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("chat-1", evs(1), expected)
    assert info.value.stream_id == "chat-1"
    assert info.value.expected == expected
    assert info.value.actual == 2
    assert await table_counts(pool) == before


async def test_stream_exists_succeeds_on_an_existing_stream(store: EventStore) -> None:
    await store.append("chat-1", evs(1))
    result = await store.append("chat-1", evs(2), STREAM_EXISTS)
    assert result.version == 3


async def test_stream_exists_fails_on_a_missing_stream(store: EventStore, pool: Pool) -> None:
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("chat-1", evs(1), STREAM_EXISTS)
    assert info.value.stream_id == "chat-1"
    assert info.value.expected is STREAM_EXISTS
    assert info.value.actual == 0
    assert await table_counts(pool) == (0, 0)


async def test_exact_version_succeeds_when_it_matches(store: EventStore) -> None:
    await store.append("chat-1", evs(2), 0)
    result = await store.append("chat-1", evs(2), 2)
    assert result.version == 4
    result = await store.append("chat-1", evs(1), 4)
    assert result.version == 5


@pytest.mark.parametrize("expected", [1, 2, 4, 5, 1000])
async def test_exact_version_fails_when_it_does_not_match(
    store: EventStore, pool: Pool, expected: int
) -> None:
    await store.append("chat-1", evs(3))
    before = await table_counts(pool)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("chat-1", evs(1), expected)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == (
        "chat-1",
        expected,
        3,
    )
    assert await table_counts(pool) == before


@pytest.mark.parametrize("expected", [1, 7])
async def test_exact_version_on_a_missing_stream_reports_actual_zero(
    store: EventStore, pool: Pool, expected: int
) -> None:
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("chat-1", evs(1), expected)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == (
        "chat-1",
        expected,
        0,
    )
    assert await table_counts(pool) == (0, 0)


@pytest.mark.parametrize(
    "expected", [NO_STREAM, 0, 1, 3, STREAM_EXISTS], ids=lambda e: f"expected-{e!r}"
)
async def test_a_version_conflict_takes_no_position(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    """The expected version is checked before a sequence number is taken: no gap is left."""
    stream = "chat-1" if expected is not STREAM_EXISTS else "chat-missing"
    await store.append("chat-1", evs(2))
    last = await max_position(pool)
    with pytest.raises(WrongExpectedVersion):
        await store.append(stream, evs(3), expected)
    result = await store.append("chat-2", evs(1))
    assert result.positions == (last + 1,)


# ---------------------------------------------------------------------------- idempotency


@pytest.mark.parametrize(
    "expected", [NO_STREAM, 0, ANY, STREAM_EXISTS], ids=lambda e: f"expected-{e!r}"
)
async def test_retrying_the_first_batch_returns_the_original_result(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    batch = evs(3)
    if expected is STREAM_EXISTS:
        await store.append("chat-1", evs(1))
    original = await store.append("chat-1", batch, expected)
    counts = await table_counts(pool)
    version = await store.stream_version("chat-1")
    again = await store.append("chat-1", batch, expected)
    assert again == original
    assert await table_counts(pool) == counts
    assert await store.stream_version("chat-1") == version


@pytest.mark.parametrize("expected", [ANY, 2], ids=["any", "exact"])
async def test_retrying_after_the_stream_moved_on_returns_the_original_result(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    await store.append("chat-1", evs(2))
    batch = evs(2)
    original = await store.append("chat-1", batch, expected)
    assert original.version == 4
    await store.append("chat-1", evs(5))
    counts = await table_counts(pool)
    assert await store.append("chat-1", batch, expected) == original
    assert await table_counts(pool) == counts
    assert await store.stream_version("chat-1") == 9


async def test_an_idempotent_retry_accepts_payload_key_order(store: EventStore) -> None:
    """Content is compared as JSON, not as bytes (jsonb does not keep the original text)."""
    event_id = uuid7()
    first = NewEvent(event_id, "Noted", b'{"a": 1, "b": [1, 2]}')
    retry = NewEvent(event_id, "Noted", b'{"b":[1,2],"a":1}')
    original = await store.append("chat-1", [first], NO_STREAM)
    assert await store.append("chat-1", [retry], NO_STREAM) == original


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"3", b"null", b"true"])
async def test_data_need_not_be_an_object(store: EventStore, data: bytes) -> None:
    """Any JSON value is stored, read back, and recognised on an idempotent retry."""
    event = NewEvent(uuid7(), "Noted", data)
    original = await store.append("chat-1", [event], NO_STREAM)
    assert await store.append("chat-1", [event], NO_STREAM) == original
    assert await store.append("chat-1", [event], ANY) == original
    [stored] = await store.read_stream("chat-1")
    assert stored.data == msgspec.json.decode(data)
    with pytest.raises(DuplicateEvent):
        await store.append("chat-1", [NewEvent(event.event_id, "Noted", b"[2, 1]")], ANY)


@pytest.mark.parametrize("expected", [5, NO_STREAM], ids=["exact", "no_stream"])
async def test_retrying_with_another_expected_version_is_a_conflict(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    await store.append("chat-1", evs(2))
    batch = evs(2)
    await store.append("chat-1", batch, 2)  # stored at versions 3 and 4
    await store.append("chat-1", evs(3))  # the stream is now at 7
    counts = await table_counts(pool)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("chat-1", batch, expected)
    assert info.value.stream_id == "chat-1"
    assert info.value.expected == expected
    assert info.value.actual == 7
    assert await table_counts(pool) == counts


@pytest.mark.parametrize("expected", [NO_STREAM, ANY, 0, 1], ids=lambda e: f"expected-{e!r}")
@pytest.mark.parametrize("change", ["data", "type"])
async def test_the_same_id_with_other_content_is_a_duplicate(
    store: EventStore, pool: Pool, expected: Expected, change: str
) -> None:
    original = ev("Noted", text="hello")
    await store.append("chat-1", [original], NO_STREAM)
    changed = (
        ev("Noted", original.event_id, text="HELLO")
        if change == "data"
        else ev("Renamed", original.event_id, text="hello")
    )
    counts = await table_counts(pool)
    with pytest.raises(DuplicateEvent) as info:
        await store.append("chat-1", [changed], expected)
    assert info.value.stream_id == "chat-1"
    assert info.value.event_ids == (original.event_id,)
    assert await table_counts(pool) == counts
    [stored] = await store.read_stream("chat-1")
    assert (stored.type, stored.data) == ("Noted", {"text": "hello"})


@pytest.mark.parametrize(
    ("stored", "retried"),
    [
        (b'{"flag": true}', b'{"flag": 1}'),
        (b'{"n": 0}', b'{"n": false}'),
        (b'{"n": null}', b'{"n": 0}'),
        (b'{"amount": 0.3}', b'{"amount": 0.30000000000000001}'),
        (b"[1, 2]", b"[true, 2.0]"),
        (b'{"a": [1]}', b'{"a": {"0": 1}}'),
        (b'{"a": "1"}', b'{"a": 1}'),
    ],
)
async def test_the_same_id_with_data_of_other_json_types_is_a_duplicate(
    store: EventStore, pool: Pool, stored: bytes, retried: bytes
) -> None:
    """Python's == takes true for 1; the stored jsonb does not, and neither does the store."""
    event_id = uuid7()
    await store.append("chat-1", [NewEvent(event_id, "Noted", stored)], NO_STREAM)
    counts = await table_counts(pool)
    with pytest.raises(DuplicateEvent):
        await store.append("chat-1", [NewEvent(event_id, "Noted", retried)], NO_STREAM)
    assert await table_counts(pool) == counts


async def test_an_idempotent_retry_compares_numbers_by_value(store: EventStore) -> None:
    """1 and 1.0 are one JSON number (jsonb holds them equal); the retry is the same event."""
    event_id = uuid7()
    original = await store.append("chat-1", [NewEvent(event_id, "Noted", b'{"n": 1}')], NO_STREAM)
    retry = NewEvent(event_id, "Noted", b'{"n": 1.0}')
    assert await store.append("chat-1", [retry], NO_STREAM) == original


@pytest.mark.parametrize("number", [b"1e5000", b"9" * 5000, b"1e-400", b"-0.0"])
async def test_an_idempotent_retry_holds_for_numbers_of_any_size(
    store: EventStore, number: bytes
) -> None:
    """jsonb writes 1e5000 out in full: longer than Python converts to an int by default."""
    event = NewEvent(uuid7(), "Noted", b'{"n": ' + number + b"}")
    original = await store.append("chat-1", [event], NO_STREAM)
    assert await store.append("chat-1", [event], NO_STREAM) == original


@pytest.mark.parametrize(
    "expected", [ANY, NO_STREAM, 0, STREAM_EXISTS, 1], ids=lambda e: f"expected-{e!r}"
)
async def test_the_same_id_in_another_stream_is_a_duplicate(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    stored = ev()
    await store.append("chat-1", [stored])
    if expected is STREAM_EXISTS or expected == 1:
        await store.append("chat-2", evs(1))
    counts = await table_counts(pool)
    version = await store.stream_version("chat-2")
    with pytest.raises(DuplicateEvent) as info:
        await store.append("chat-2", [stored], expected)
    assert info.value.stream_id == "chat-2"
    assert info.value.event_ids == (stored.event_id,)
    assert await table_counts(pool) == counts
    assert await store.stream_version("chat-2") == version


@pytest.mark.parametrize(
    "expected", [ANY, NO_STREAM, 0, STREAM_EXISTS, 2], ids=lambda e: f"expected-{e!r}"
)
async def test_a_batch_mixing_new_and_stored_ids_is_rejected_whole(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    first = evs(2)
    stream = "chat-1"
    if expected is NO_STREAM or expected == 0:
        await store.append("chat-0", first)  # stored elsewhere; chat-1 does not exist yet
    else:
        await store.append(stream, first)
    counts = await table_counts(pool)
    fresh = evs(2)
    batch = [fresh[0], first[1], fresh[1]]
    with pytest.raises(DuplicateEvent) as info:
        await store.append(stream, batch, expected)
    assert first[1].event_id in info.value.event_ids
    assert fresh[0].event_id not in info.value.event_ids
    assert await table_counts(pool) == counts
    logged = set(ids(await store.read_all()))
    assert logged.isdisjoint(ids(fresh))


async def test_a_batch_of_stored_ids_out_of_their_order_is_a_duplicate(
    store: EventStore, pool: Pool
) -> None:
    batch = evs(2)
    await store.append("chat-1", batch, NO_STREAM)
    counts = await table_counts(pool)
    with pytest.raises(DuplicateEvent):
        await store.append("chat-1", batch[::-1], ANY)
    assert await table_counts(pool) == counts


# ---------------------------------------------------------------------------- invalid input


_ONE = ev()

INVALID: dict[str, tuple[Any, Any, Any]] = {
    "empty-batch": ("chat-1", [], ANY),
    "repeated-id": ("chat-1", [_ONE, ev("Other", _ONE.event_id)], ANY),
    "repeated-id-exact": ("chat-1", [_ONE, _ONE], 0),
    "negative-version": ("chat-1", [ev()], -1),
    "version-beyond-bigint": ("chat-1", [ev()], 2**63 - 1),
    "bool-version-true": ("chat-1", [ev()], True),
    "bool-version-false": ("chat-1", [ev()], False),
    "str-version": ("chat-1", [ev()], "any"),
    "float-version": ("chat-1", [ev()], 1.0),
    "none-version": ("chat-1", [ev()], None),
    "empty-stream-id": ("", [ev()], ANY),
    "nul-in-stream-id": ("chat-\x00", [ev()], ANY),
    "too-long-stream-id": ("chat-" + "x" * 600, [ev()], ANY),
    "non-str-stream-id": (42, [ev()], ANY),
    "empty-type": ("chat-1", [NewEvent(uuid7(), "", b"{}")], ANY),
    "data-not-json": ("chat-1", [NewEvent(uuid7(), "T", b"not json")], ANY),
    "data-empty": ("chat-1", [NewEvent(uuid7(), "T", b"")], NO_STREAM),
    "data-trailing-garbage": ("chat-1", [NewEvent(uuid7(), "T", b'{"a": 1} x')], 0),
    "data-nul-escape": ("chat-1", [NewEvent(uuid7(), "T", b'{"a": "\\u0000"}')], ANY),
    "metadata-nul": ("chat-1", [NewEvent(uuid7(), "T", b"{}", {"a": "x\x00"})], ANY),
    "second-event-bad": ("chat-1", [ev(), NewEvent(uuid7(), "T", b"{")], STREAM_EXISTS),
    # Strings with a lone surrogate are not UTF-8, and data bytes must be.
    "surrogate-in-stream-id": ("chat-\ud800", [ev()], ANY),
    "surrogate-in-type": ("chat-1", [NewEvent(uuid7(), "T\udc00", b"{}")], ANY),
    "data-not-utf8": ("chat-1", [NewEvent(uuid7(), "T", b'"\xff"')], NO_STREAM),
    "data-not-utf8-in-batch": ("chat-1", [ev(), NewEvent(uuid7(), "T", b'"\xff"')], ANY),
    "metadata-not-json": ("chat-1", [NewEvent(uuid7(), "T", b"{}", {"o": object()})], ANY),
    "metadata-tuple-key": ("chat-1", [NewEvent(uuid7(), "T", b"{}", {(1, 2): "a"})], 0),
    "metadata-surrogate": ("chat-1", [NewEvent(uuid7(), "T", b"{}", {"a": "\ud800"})], ANY),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_input_is_rejected_and_stores_nothing(
    store: EventStore, pool: Pool, case: str
) -> None:
    stream_id, events, expected = INVALID[case]
    with pytest.raises(InvalidAppend):
        await store.append(stream_id, events, expected)
    assert await table_counts(pool) == (0, 0)
    # The rejection took no sequence number and left the store usable.
    assert (await store.append("chat-1", [ev()], NO_STREAM)).positions == (1,)


async def test_invalid_data_inside_a_callers_transaction_is_invalid_append(
    store: EventStore, pool: Pool
) -> None:
    async with pool.connection() as conn:
        async with conn.transaction():
            with pytest.raises(InvalidAppend):
                await store.append("chat-1", [NewEvent(uuid7(), "T", b"{")], ANY, connection=conn)
            # ANY appends run under a savepoint, so the transaction stays usable.
            await store.append("chat-1", [ev()], ANY, connection=conn)
    assert await store.stream_version("chat-1") == 1


async def test_invalid_append_is_a_value_error(store: EventStore) -> None:
    with pytest.raises(ValueError):
        await store.append("chat-1", [], ANY)


# ---------------------------------------------------------------------------- caller transactions


async def test_append_joins_a_callers_transaction_that_commits(
    store: EventStore, pool: Pool
) -> None:
    async with pool.connection() as conn:
        async with conn.transaction():
            first = await store.append("chat-1", evs(2), NO_STREAM, connection=conn)
            second = await store.append("contact-1", evs(1), NO_STREAM, connection=conn)
            third = await store.append("chat-1", evs(1), 2, connection=conn)
            # Not visible to anyone else before the commit.
            assert await store.read_stream("chat-1") == []
            assert await store.read_all() == []
            assert await store.stream_version("chat-1") == 0
        assert first.version == 2 and second.version == 1 and third.version == 3
    await settled(store)
    logged = await store.read_all()
    assert [(e.stream_id, e.stream_version) for e in logged] == [
        ("chat-1", 1),
        ("chat-1", 2),
        ("contact-1", 1),
        ("chat-1", 3),
    ]
    # One transaction: every event carries the same transaction id.
    assert len({e.checkpoint.transaction_id for e in logged}) == 1
    assert [e.checkpoint for e in logged] == [
        *first.checkpoints,
        *second.checkpoints,
        *third.checkpoints,
    ]


async def test_append_in_a_callers_transaction_that_rolls_back_stores_nothing(
    store: EventStore, pool: Pool
) -> None:
    batch = evs(2)
    async with pool.connection() as conn:
        with pytest.raises(Boom):
            async with conn.transaction():
                await store.append("chat-1", batch, NO_STREAM, connection=conn)
                await store.append("chat-2", evs(1), ANY, connection=conn)
                raise Boom
    assert await table_counts(pool) == (0, 0)
    assert await store.stream_version("chat-1") == 0
    # The ids were never stored, so the same batch appends afresh.
    result = await store.append("chat-1", batch, NO_STREAM)
    assert result.version == 2


async def test_an_idempotent_any_retry_keeps_the_callers_transaction_usable(
    store: EventStore, pool: Pool
) -> None:
    batch = evs(2)
    original = await store.append("chat-1", batch, ANY)
    fresh = ev()
    async with pool.connection() as conn:
        async with conn.transaction():
            again = await store.append("chat-1", batch, ANY, connection=conn)
            assert again == original
            more = await store.append("chat-1", [fresh], ANY, connection=conn)
            await conn.execute("SELECT 1")
    assert more.version == 3  # the retry did not move the stream's version
    assert ids(await store.read_stream("chat-1")) == [*ids(batch), fresh.event_id]
    assert await store.stream_version("chat-1") == 3


@pytest.mark.parametrize("expected", [NO_STREAM, 0, STREAM_EXISTS], ids=lambda e: f"{e!r}")
async def test_idempotent_retries_inside_a_callers_transaction(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    batch = evs(2)
    if expected is STREAM_EXISTS:
        await store.append("chat-1", evs(1))
    original = await store.append("chat-1", batch, expected)
    async with pool.connection() as conn:
        async with conn.transaction():
            assert await store.append("chat-1", batch, expected, connection=conn) == original
            await store.append("chat-1", evs(1), ANY, connection=conn)
    assert await store.stream_version("chat-1") == original.version + 1


async def test_a_version_conflict_keeps_the_callers_transaction_usable(
    store: EventStore, pool: Pool
) -> None:
    await store.append("chat-1", evs(2))
    async with pool.connection() as conn:
        async with conn.transaction():
            with pytest.raises(WrongExpectedVersion) as info:
                await store.append("chat-1", evs(1), 1, connection=conn)
            assert info.value.actual == 2
            await store.append("chat-1", evs(1), 2, connection=conn)
    assert await store.stream_version("chat-1") == 3


@pytest.mark.parametrize("expected", [NO_STREAM, 0, 1, ANY], ids=lambda e: f"expected-{e!r}")
async def test_a_duplicate_inside_a_callers_transaction_is_a_typed_error(
    store: EventStore, pool: Pool, expected: Expected
) -> None:
    stored = ev()
    await store.append("chat-1", [stored])
    if expected == 1:
        await store.append("chat-2", evs(1))
    counts = await table_counts(pool)
    async with pool.connection() as conn:
        with pytest.raises(DuplicateEvent) as info:
            async with conn.transaction():
                await store.append("chat-2", [ev(), stored], expected, connection=conn)
        assert info.value.stream_id == "chat-2"
        assert stored.event_id in info.value.event_ids
    assert await table_counts(pool) == counts


# ---------------------------------------------------------------------------- read_stream


async def _five(store: EventStore) -> list[NewEvent]:
    batch = evs(5)
    await store.append("chat-1", batch[:2])
    await store.append("chat-2", evs(1))
    await store.append("chat-1", batch[2:])
    return batch


async def test_read_stream_forwards_and_backwards(store: EventStore) -> None:
    batch = await _five(store)
    forwards = await store.read_stream("chat-1")
    assert ids(forwards) == ids(batch)
    assert [e.stream_version for e in forwards] == [1, 2, 3, 4, 5]
    assert all(e.stream_id == "chat-1" and e.category == "chat" for e in forwards)
    backwards = await store.read_stream("chat-1", direction="backwards")
    assert backwards == forwards[::-1]


async def test_read_stream_from_version_and_limit(store: EventStore) -> None:
    batch = await _five(store)
    assert ids(await store.read_stream("chat-1", from_version=3)) == ids(batch[2:])
    assert ids(await store.read_stream("chat-1", from_version=2, limit=2)) == ids(batch[1:3])
    assert ids(await store.read_stream("chat-1", limit=1)) == ids(batch[:1])
    back = await store.read_stream("chat-1", from_version=4, direction="backwards", limit=2)
    assert [e.stream_version for e in back] == [4, 3]
    assert ids(await store.read_stream("chat-1", from_version=6)) == []
    assert await store.read_stream("chat-1", from_version=0, direction="backwards") == []


async def test_read_stream_of_a_missing_stream_is_empty(store: EventStore) -> None:
    assert await store.read_stream("chat-404") == []
    assert await store.read_stream("chat-404", direction="backwards") == []
    assert await store.stream_version("chat-404") == 0


async def test_read_stream_rejects_bad_arguments(store: EventStore) -> None:
    with pytest.raises(ValueError):
        await store.read_stream("chat-1", direction="sideways")
    with pytest.raises(ValueError):
        await store.read_stream("chat-1", limit=0)


async def test_a_limit_beyond_bigint_reads_everything(store: EventStore) -> None:
    """A limit PostgreSQL's bigint cannot hold means "all", not a server error."""
    await store.append("chat-1", evs(3))
    assert len(await store.read_stream("chat-1", limit=2**70)) == 3
    assert len(await store.read_stream("chat-1", direction="backwards", limit=2**63)) == 3
    assert len(await store.read_all(None, 2**64)) == 3


async def test_recorded_events_carry_what_was_appended(store: EventStore) -> None:
    event = NewEvent(
        uuid7(),
        "MessageReceived",
        msgspec.json.encode({"text": "hi", "n": [1, 2]}),
        {"correlation_id": "corr", "causation_id": "cause", "provider_ids": {"mid": "m.1"}},
    )
    result = await store.append("conversation-7", [event], NO_STREAM)
    [recorded] = await store.read_stream("conversation-7")
    assert recorded.event_id == event.event_id
    assert recorded.type == "MessageReceived"
    assert recorded.data == {"text": "hi", "n": [1, 2]}
    assert recorded.metadata == event.metadata
    assert recorded.stream_version == 1
    assert recorded.category == "conversation"
    assert recorded.position == result.positions[0]
    assert recorded.checkpoint == result.checkpoints[0]
    assert recorded.recorded_at.tzinfo is not None
    await settled(store)
    assert await store.read_all() == [recorded]


# ---------------------------------------------------------------------------- read_all


async def test_read_all_pages_after_checkpoints(store: EventStore) -> None:
    for i in range(7):
        await store.append(f"chat-{i % 3}", evs(1 + i % 2))
    await settled(store)
    everything = await store.read_all()
    assert len(everything) == 10
    assert [e.checkpoint for e in everything] == sorted(e.checkpoint for e in everything)
    assert len({e.checkpoint for e in everything}) == 10
    paged: list[RecordedEvent] = []
    checkpoint: Checkpoint = START
    while page := await store.read_all(checkpoint, limit=3):
        assert len(page) <= 3
        paged.extend(page)
        checkpoint = page[-1].checkpoint
    assert paged == everything
    assert await store.read_all(everything[-1].checkpoint) == []
    assert await store.head() == everything[-1].checkpoint


async def test_read_all_accepts_checkpoints_as_strings(store: EventStore) -> None:
    for i in range(4):
        await store.append(f"chat-{i}", evs(2))
    await settled(store)
    everything = await store.read_all()
    for index, event in enumerate(everything):
        text = str(event.checkpoint)
        assert Checkpoint.parse(text) == event.checkpoint
        assert text == f"{event.checkpoint.transaction_id}:{event.position}"
        assert await store.read_all(text) == everything[index + 1 :]
        assert await store.read_all(event.checkpoint) == everything[index + 1 :]
    assert await store.read_all(str(START)) == everything
    assert await store.read_all(None) == everything


@pytest.mark.parametrize("text", ["", "12", "1:", ":2", "a:b", "1:2:3", "-1:2", "1.0:2"])
def test_checkpoint_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        Checkpoint.parse(text)


async def test_read_all_rejects_a_bad_checkpoint_string(store: EventStore) -> None:
    with pytest.raises(ValueError):
        await store.read_all("not-a-checkpoint")


async def test_read_all_filters_by_category_and_type(store: EventStore) -> None:
    await store.append("conversation-1", [ev("Opened"), ev("MessageReceived")])
    await store.append("contact-1", [ev("ContactCreated")])
    await store.append("conversation-2", [ev("Opened"), ev("Closed")])
    await store.append("contact-2", [ev("ContactCreated"), ev("Opened")])
    await store.append("conversations-3", [ev("Opened")])  # another category: "conversations"

    def shape(events: list[RecordedEvent]) -> list[tuple[str, str]]:
        return [(e.stream_id, e.type) for e in events]

    await settled(store)
    assert shape(await store.read_all(categories=["conversation"])) == [
        ("conversation-1", "Opened"),
        ("conversation-1", "MessageReceived"),
        ("conversation-2", "Opened"),
        ("conversation-2", "Closed"),
    ]
    assert shape(await store.read_all(types=["Opened"])) == [
        ("conversation-1", "Opened"),
        ("conversation-2", "Opened"),
        ("contact-2", "Opened"),
        ("conversations-3", "Opened"),
    ]
    assert shape(await store.read_all(categories=["contact"], types=["Opened"])) == [
        ("contact-2", "Opened")
    ]
    assert shape(await store.read_all(categories=("contact", "conversations"))) == [
        ("contact-1", "ContactCreated"),
        ("contact-2", "ContactCreated"),
        ("contact-2", "Opened"),
        ("conversations-3", "Opened"),
    ]
    assert await store.read_all(categories=[]) == []
    assert await store.read_all(types=["Nothing"]) == []
    # A filtered reader pages with the checkpoints of the events it sees.
    opened = await store.read_all(types=["Opened"])
    assert await store.read_all(opened[1].checkpoint, types=["Opened"]) == opened[2:]


@pytest.mark.parametrize("state", [StreamState.DELETED, StreamState.ARCHIVED])
async def test_read_all_can_skip_inactive_streams(store: EventStore, state: StreamState) -> None:
    await store.append("chat-1", evs(2))
    await store.append("chat-2", evs(1))
    await store.append("chat-3", evs(1))
    await store.set_stream_state("chat-2", state)

    def streams(events: list[RecordedEvent]) -> list[str]:
        return [e.stream_id for e in events]

    await settled(store)
    assert streams(await store.read_all(skip_inactive_streams=True)) == [
        "chat-1",
        "chat-1",
        "chat-3",
    ]
    # The events stay in the log and in their stream.
    assert streams(await store.read_all()) == ["chat-1", "chat-1", "chat-2", "chat-3"]
    assert len(await store.read_stream("chat-2")) == 1
    await store.set_stream_state("chat-2", StreamState.ACTIVE)
    assert streams(await store.read_all(skip_inactive_streams=True)) == [
        "chat-1",
        "chat-1",
        "chat-2",
        "chat-3",
    ]
    await store.append("chat-2", evs(1), 1)


@pytest.mark.parametrize(
    "expected", [ANY, STREAM_EXISTS, 1, NO_STREAM, 0], ids=lambda e: f"expected-{e!r}"
)
@pytest.mark.parametrize("state", [StreamState.DELETED, StreamState.ARCHIVED])
async def test_appending_to_an_inactive_stream_is_refused(
    store: EventStore, pool: Pool, expected: Expected, state: StreamState
) -> None:
    await store.append("chat-1", evs(1))
    await store.set_stream_state("chat-1", state)
    counts = await table_counts(pool)
    with pytest.raises(StreamDeleted) as info:
        await store.append("chat-1", evs(1), expected)
    assert info.value.stream_id == "chat-1"
    assert info.value.state == state
    assert await table_counts(pool) == counts
    assert await store.stream_version("chat-1") == 1


async def test_set_stream_state_of_a_missing_stream_fails(store: EventStore) -> None:
    with pytest.raises(WrongExpectedVersion):
        await store.set_stream_state("chat-404", StreamState.DELETED)


async def test_read_all_does_not_see_an_open_transaction(store: EventStore, pool: Pool) -> None:
    before = await store.append("chat-1", evs(1))
    await settled(store)
    async with pool.connection() as conn:
        async with conn.transaction():
            await store.append("chat-2", evs(1), connection=conn)
            after = await store.append("chat-3", evs(1))  # commits while the other is open
            assert ids(await store.read_all()) == ids(await store.read_stream("chat-1"))
            assert await store.head() == before.checkpoints[-1]
    await settled(store)
    logged = await store.read_all()
    assert [e.stream_id for e in logged] == ["chat-1", "chat-2", "chat-3"]
    assert logged[-1].checkpoint == after.checkpoints[0]


# ---------------------------------------------------------------------------- codecs


class MessageReceived(msgspec.Struct, tag=True, frozen=True):
    conversation_id: str
    text: str
    attachments: tuple[str, ...] = ()


class ConversationClosed(msgspec.Struct, tag=True, frozen=True):
    conversation_id: str
    reason: str


Payload = MessageReceived | ConversationClosed


async def test_structs_round_trip_through_the_codec(pool: Pool) -> None:
    store = EventStore(pool, EventCodec([MessageReceived, ConversationClosed]))
    try:
        payloads: list[Payload] = [
            MessageReceived("c-1", "hello", ("a.png",)),
            MessageReceived("c-1", "again"),
            ConversationClosed("c-1", "resolved"),
        ]
        result = await store.append("conversation-c-1", payloads, NO_STREAM)
        assert result.version == 3
        recorded = await store.read_stream("conversation-c-1")
        assert [e.data for e in recorded] == payloads
        assert [e.type for e in recorded] == [
            "MessageReceived",
            "MessageReceived",
            "ConversationClosed",
        ]
        await settled(store)
        assert [e.data for e in await store.read_all()] == payloads
        # The stored data is plain JSON that analysts can query in SQL.
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT data->>'text' FROM events WHERE type = 'MessageReceived' ORDER BY position"
            )
            assert [r[0] for r in await cur.fetchall()] == ["hello", "again"]
    finally:
        await store.close()


async def test_a_struct_retry_is_idempotent_with_an_explicit_id(pool: Pool) -> None:
    codec = EventCodec([MessageReceived])
    store = EventStore(pool, codec)
    try:
        event = codec.new_event(MessageReceived("c-1", "hi"), event_id=uuid7())
        original = await store.append("conversation-c-1", [event], NO_STREAM)
        assert await store.append("conversation-c-1", [event], NO_STREAM) == original
        other = codec.new_event(MessageReceived("c-1", "changed"), event_id=event.event_id)
        with pytest.raises(DuplicateEvent):
            await store.append("conversation-c-1", [other], NO_STREAM)
    finally:
        await store.close()


async def test_an_unregistered_payload_is_refused(store: EventStore, pool: Pool) -> None:
    with pytest.raises(UnknownEventType):
        await store.append("conversation-1", [MessageReceived("c", "t")])
    assert await table_counts(pool) == (0, 0)


async def test_unregistered_types_decode_to_dicts_unless_strict(pool: Pool) -> None:
    writer = EventStore(pool)
    await writer.append("chat-1", [ev("Unknown", text="x")])
    await settled(writer)
    assert [e.data for e in await writer.read_all()] == [{"text": "x"}]
    strict = EventStore(pool, EventCodec([MessageReceived], strict=True))
    with pytest.raises(UnknownEventType):
        await strict.read_all()
    await writer.close()
    await strict.close()


def _message_v1(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """MessageReceivedV1 had ``conversation`` and ``body``; now MessageReceived."""
    return "MessageReceived", {"conversation_id": data["conversation"], "text": data["body"]}


def _closed_any_shape(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """ConversationClosed once stored its reason as ``why``; new events pass through."""
    if "why" in data:
        data = {"conversation_id": data["conversation_id"], "reason": data["why"]}
    return "ConversationClosed", data


async def test_upcasters_turn_old_shapes_into_current_payloads(pool: Pool) -> None:
    old = EventStore(pool)
    await old.append(
        "conversation-c-1",
        [
            ev("MessageReceivedV1", conversation="c-1", body="old hello"),
            NewEvent(
                uuid7(),
                "ConversationClosed",
                msgspec.json.encode(
                    {"type": "ConversationClosed", "conversation_id": "c-1", "why": "spam"}
                ),
            ),
        ],
    )
    codec = EventCodec(
        [MessageReceived, ConversationClosed],
        upcasters={"MessageReceivedV1": _message_v1, "ConversationClosed": _closed_any_shape},
        strict=True,
    )
    store = EventStore(pool, codec)
    try:
        await store.append("conversation-c-1", [ConversationClosed("c-1", "resolved")], 2)
        await store.append("conversation-c-1", [MessageReceived("c-1", "new")], 3)
        expected: list[Payload] = [
            MessageReceived("c-1", "old hello"),
            ConversationClosed("c-1", "spam"),
            ConversationClosed("c-1", "resolved"),
            MessageReceived("c-1", "new"),
        ]
        assert [e.data for e in await store.read_stream("conversation-c-1")] == expected
        await settled(store)
        assert [e.data for e in await store.read_all()] == expected
        # The stored type stays what was written; only the decoded payload is upcast.
        assert [e.type for e in await store.read_all()][0] == "MessageReceivedV1"
    finally:
        await old.close()
        await store.close()


async def test_an_upcaster_to_an_unknown_type_fails_clearly(store: EventStore, pool: Pool) -> None:
    await store.append("chat-1", [ev("Old", a=1)])
    codec = EventCodec([MessageReceived], upcasters={"Old": lambda d: ("Nowhere", d)})
    with pytest.raises(UnknownEventType) as info:
        await settled(store)
        await EventStore(pool, codec).read_all()
    assert info.value.type_name == "Nowhere"


# ---------------------------------------------------------------------------- subscribe


async def test_subscribe_catches_up_then_receives_a_new_append(store: EventStore) -> None:
    old = [await store.append("chat-1", evs(2)), await store.append("chat-2", evs(1))]
    appended: list[AppendResult] = []

    async def append_once_caught_up(received: list[RecordedEvent]) -> None:
        if len(received) == 3:
            appended.append(await store.append("chat-3", evs(1)))

    async with asyncio.timeout(WAIT):
        received = await collect(
            subscription(store, poll_interval=0.2), 4, on_event=append_once_caught_up
        )
    checkpoints = [c for r in [*old, *appended] for c in r.checkpoints]
    assert [e.checkpoint for e in received] == checkpoints
    assert [e.stream_id for e in received] == ["chat-1", "chat-1", "chat-2", "chat-3"]


async def test_subscribe_is_woken_by_appends_without_polling(store: EventStore) -> None:
    """With polling effectively off, only the store's NOTIFY after commit can wake the reader."""
    await store.append("chat-1", evs(1))
    sub = subscription(store, poll_interval=3600)
    stop = asyncio.Event()

    async def keep_appending() -> None:
        # Several appends, in case a wake-up lands while another session holds the fence back.
        while not stop.is_set():
            await store.append("chat-2", evs(1))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()

    async with asyncio.timeout(WAIT):
        async with contextlib.aclosing(sub):
            first = await anext(sub)
            assert first.stream_id == "chat-1"
            writer = asyncio.create_task(keep_appending())
            try:
                second = await anext(sub)
            finally:
                stop.set()
                await writer
    assert second.stream_id == "chat-2"


async def test_subscribe_resumes_after_a_checkpoint_with_filters(store: EventStore) -> None:
    await store.append("conversation-1", [ev("Opened")])
    mark = await store.append("conversation-1", [ev("MessageReceived")])
    await store.append("contact-1", [ev("ContactCreated")])
    later = await store.append("conversation-2", [ev("Opened"), ev("MessageReceived")])
    async with asyncio.timeout(WAIT):
        received = await collect(
            subscription(
                store,
                after=str(mark.checkpoints[0]),
                categories=["conversation"],
                types=["MessageReceived"],
                poll_interval=0.2,
            ),
            1,
        )
    assert [e.checkpoint for e in received] == [later.checkpoints[1]]


async def test_connection_is_released_after_a_failed_append(store: EventStore, pool: Pool) -> None:
    """Many conflicting appends in a row do not leak pool connections."""
    await store.append("chat-1", evs(1))
    for _ in range(3 * (pool.max_size or 1)):
        with pytest.raises(WrongExpectedVersion):
            await store.append("chat-1", evs(1), NO_STREAM)
    async with asyncio.timeout(WAIT):
        assert (await store.append("chat-1", evs(1), 1)).version == 2


def test_expected_version_reprs_are_readable() -> None:
    assert repr(ANY) == "ANY"
    assert "NO_STREAM" in str(WrongExpectedVersion("s", NO_STREAM, 3))
