"""The events the bench writes: realistic inbound-message payloads, metadata and stream names.

Payloads are pre-generated from a fixed seed (so every run stores the same sizes) and cycled;
the store and its reference write exactly the same JSON bytes. A payload encodes to about
300-500 bytes and its metadata to about 150, like an inbound Messenger message with its
correlation ids.
"""

from __future__ import annotations

import random
import uuid
from typing import Any, Final

import msgspec

from eventstore.ids import uuid7

__all__ = [
    "CATEGORY",
    "EVENT_TYPE",
    "MessageReceived",
    "Workload",
]

CATEGORY: Final = "conversation"


class MessageReceived(msgspec.Struct, frozen=True, tag="BenchMessageReceived"):
    """An inbound customer message, shaped like the conversation domain's.

    Its type name is the bench's own, so it never collides with the domain's events, which
    other paths (ingest) write into the same log.
    """

    conversation_id: str
    connection: str
    psid: str
    provider_message_id: str
    text: str
    sent_at_ms: int
    attachments: list[str] = []
    is_echo: bool = False


EVENT_TYPE: Final = "BenchMessageReceived"

_WORDS = (
    "hello order delivery thanks when will my parcel arrive please help refund size colour "
    "tomorrow address change invoice payment card failed again yes no maybe great photo"
).split()


class Workload:
    """A fixed, seeded set of payloads and metadata, and unique stream names."""

    def __init__(self, size: int = 1024, seed: int = 4) -> None:
        rng = random.Random(seed)
        self.payloads: list[MessageReceived] = []
        self.metadata: list[dict[str, Any]] = []
        for i in range(size):
            conversation = str(uuid.UUID(int=rng.getrandbits(128)))
            words = rng.randint(8, 60)
            self.payloads.append(
                MessageReceived(
                    conversation_id=conversation,
                    connection=f"page-{rng.randint(1, 20)}",
                    psid=str(rng.randint(10**15, 10**16)),
                    provider_message_id="m_" + "".join(rng.choices("abcdefABCDEF0123456789", k=40)),
                    text=" ".join(rng.choices(_WORDS, k=words)),
                    sent_at_ms=1_700_000_000_000 + i * 1000,
                    attachments=(
                        [f"https://cdn.example.com/{rng.getrandbits(64):x}.jpg"]
                        if rng.random() < 0.1
                        else []
                    ),
                )
            )
            self.metadata.append(
                {
                    "correlation_id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "causation_id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "provider_ids": {"mid": self.payloads[-1].provider_message_id},
                    "received_at": "2024-11-14T22:13:20.123456+00:00",
                }
            )

    def stream_name(self) -> str:
        """A new stream's name, shaped as the store names its conversations.

        ``conversation-<uuid7>``, 49 characters, as ``conversations`` names a conversation's
        stream. The shorter names used before (``conversation-<run>-<n>``, about 30
        characters) flattered the store: its ``(stream_id, stream_version)`` index, which the
        reference's table lacks, carried smaller keys than in use. With these names the append
        at 8 connections ran at 0.90 of its rate with the short ones (one paired run).
        """
        return f"{CATEGORY}-{uuid7()}"

    def item(self, i: int) -> tuple[MessageReceived, dict[str, Any]]:
        """The ``i``-th payload and its metadata (cycling through the set)."""
        k = i % len(self.payloads)
        return self.payloads[k], self.metadata[k]

    def mean_sizes(self) -> tuple[float, float]:
        """Mean encoded size in bytes of the payloads and of the metadata."""
        enc = msgspec.json.Encoder()
        data = sum(len(enc.encode(p)) for p in self.payloads) / len(self.payloads)
        meta = sum(len(enc.encode(m)) for m in self.metadata) / len(self.metadata)
        return data, meta
