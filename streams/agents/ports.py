"""What the agents consume from and produce to, as protocols.

Why protocols and not Faust types: an agent's logic (what is acked when, what goes to the DLQ)
is the product and is tested without a broker; only :mod:`streams.app` knows Faust. Every send
returns an awaitable that completes once Kafka acknowledged the record (acks=all): the agents
send a whole take without waiting, then wait for all of it, then ack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from vitalproof.raw import H_DLQ_ORIGIN, H_DLQ_REASON, H_DLQ_STAGE

#: A consumed record as Faust hands it over (``.key``, ``.value``, ``.headers``, and
#: ``.message`` with ``.topic``, ``.partition``, ``.offset``).
Event = Any
Sent = Awaitable[Any]


class TakeStream(Protocol):
    """The part of a Faust stream the agents use: takes without auto-ack, and acks."""

    def noack_take(self, max_: int, within: float) -> AsyncIterator[list[Event]]: ...

    async def ack(self, event: Event) -> bool: ...


class NormalizeOutputs(Protocol):
    """Where normalize sends: clean bundles, dedupe changelog, DLQ, sequence/clock events."""

    async def clean(self, key: bytes, value: bytes) -> Sent: ...

    async def dedupe(self, key: bytes, value: bytes | None) -> Sent: ...

    async def dlq(self, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> Sent: ...

    async def event(self, key: bytes, value: bytes) -> Sent: ...


class SealOutputs(Protocol):
    """Where the seal agent sends: rejected records to the DLQ, manifests to vitals.batches."""

    async def dlq(self, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> Sent: ...

    async def manifest(self, batch_id: str, manifest_json: bytes) -> Sent: ...


def dlq_headers(
    reason: str, stage: str, origin: str, original: dict[str, bytes]
) -> dict[str, bytes]:
    """The original headers plus why, in which stage, and from which topic/partition/offset."""
    headers = dict(original)
    headers[H_DLQ_REASON] = reason.encode()
    headers[H_DLQ_STAGE] = stage.encode()
    headers[H_DLQ_ORIGIN] = origin.encode()
    return headers


def event_headers(event: Event) -> dict[str, bytes]:
    h = event.headers or {}
    return {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in dict(h).items()}


def event_origin(event: Event) -> str:
    msg = event.message
    return f"{msg.topic}/{msg.partition}/{msg.offset}"
