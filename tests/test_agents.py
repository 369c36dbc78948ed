"""Both agents without a broker: a stream with Faust's take/ack surface and outputs whose
sends complete only when the test says Kafka acknowledged them. What is checked is the
product's ordering: nothing is acked before what it produced is durable, the dedupe changelog
only after the clean records, rejects go to the DLQ with the reason and the original bytes,
a replayed record is dropped, and the seal agent acks a batch only after its manifest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from streams.agents import NormalizeAgent, SealAgent
from streams.dedupe import DedupeWindows
from streams.lake.layout import BATCHES_DIR
from streams.ledger import unproduced
from streams.seal_process import SealProcess
from vitalproof.manifest import BatchManifest
from vitalproof.raw import H_DLQ_ORIGIN, H_DLQ_REASON, H_DLQ_STAGE, RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch, Transport
from vitalproof.settings import BatchSettings
from vitalproof.wire import clean

NOW = 1_800_000_000_000_000
DEVICES = {"dev-1": Device("dev-1", "pat-1", DeviceStatus.ACTIVE, 0)}


@dataclass
class Message:
    topic: str
    partition: int
    offset: int


@dataclass
class Event:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    message: Message


class Stream:
    """Hands out the given takes, then stops; records every ack."""

    def __init__(self, takes: list[list[Event]]) -> None:
        self.takes = takes
        self.acked: list[Event] = []

    async def noack_take(self, max_: int, within: float) -> AsyncIterator[list[Event]]:
        for take in self.takes:
            assert len(take) <= max_
            yield take

    async def ack(self, event: Event) -> bool:
        self.acked.append(event)
        return True


@dataclass
class Outputs:
    """Every send, in order; each returns a future the test resolves ("Kafka acked")."""

    sent: list[tuple[str, bytes | None, bytes | None, dict[str, bytes] | None]] = field(
        default_factory=list
    )
    pending: list[asyncio.Future[None]] = field(default_factory=list)
    auto_ack: bool = True

    def _send(
        self, kind: str, key: bytes | None, value: bytes | None, headers: Any = None
    ) -> Awaitable[None]:
        self.sent.append((kind, key, value, headers))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.auto_ack:
            fut.set_result(None)
        else:
            self.pending.append(fut)
        return fut

    async def clean(self, key: bytes, value: bytes) -> Awaitable[None]:
        return self._send("clean", key, value)

    async def dedupe(self, key: bytes, value: bytes | None) -> Awaitable[None]:
        return self._send("dedupe", key, value)

    async def dlq(self, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> Any:
        return self._send("dlq", key, value, headers)

    async def event(self, key: bytes, value: bytes) -> Awaitable[None]:
        return self._send("event", key, value)

    async def manifest(self, batch_id: str, manifest_json: bytes) -> Awaitable[None]:
        return self._send("manifest", batch_id.encode(), manifest_json)

    def kinds(self) -> list[str]:
        return [kind for kind, *_ in self.sent]


def raw_event(offset: int, payload: bytes, device: str = "dev-1") -> Event:
    raw = RawRecord(device, payload, CONTENT_TYPE_JSON, Transport.MQTT, "gw-1", NOW, "t")
    return Event(device.encode(), payload, dict(raw.headers()), Message("vitals.raw", 0, offset))


def heart_rates(seq0: int, n: int) -> bytes:
    series = {
        "metric": "heart_rate",
        "unit": "/min",
        "t": [NOW - 10_000_000 + (seq0 + i) * 1000 for i in range(n)],
        "seq": [seq0 + i for i in range(n)],
        "v": [60 + i % 5 for i in range(n)],
    }
    return json.dumps({"schema": 1, "series": [series]}).encode()


def normalize_agent(outputs: Outputs) -> NormalizeAgent:
    return NormalizeAgent(
        lookup=DEVICES.get,
        dedupe=DedupeWindows(retain=4, max_ids=1_000_000),
        outputs=outputs,
        max_messages=5000,
    )


def decoded(outputs: Outputs) -> list[SampleBatch]:
    return [b for kind, _k, v, _h in outputs.sent if kind == "clean" for b in clean.decode_any(v)]


def test_normalize_bundles_per_patient_rejects_to_the_dlq_and_acks_everything() -> None:
    outputs = Outputs()
    take = [
        raw_event(0, heart_rates(0, 3)),
        raw_event(1, b"{not json"),
        raw_event(2, heart_rates(3, 2)),
    ]
    stream = Stream([take])
    asyncio.run(normalize_agent(outputs).run(stream))

    assert stream.acked == take
    bundles = [s for s in outputs.sent if s[0] == "clean"]
    assert len(bundles) == 1 and bundles[0][1] == b"pat-1"  # one bundle per patient per take
    assert sum(len(b) for b in decoded(outputs)) == 5
    [(_, key, value, headers)] = [s for s in outputs.sent if s[0] == "dlq"]
    assert key == b"dev-1" and value == b"{not json"  # the original bytes
    assert headers is not None and headers[H_DLQ_STAGE] == b"normalize"
    assert headers[H_DLQ_ORIGIN] == b"vitals.raw/0/1" and headers[H_DLQ_REASON]
    # The changelog comes last: after the clean record it remembers.
    assert outputs.kinds().index("clean") < outputs.kinds().index("dedupe")


def test_a_replayed_raw_record_is_not_sent_twice() -> None:
    outputs = Outputs()
    payload = heart_rates(0, 4)
    agent = normalize_agent(outputs)
    asyncio.run(agent.run(Stream([[raw_event(0, payload)], [raw_event(7, payload)]])))
    assert sum(len(b) for b in decoded(outputs)) == 4


def test_normalize_acks_only_once_kafka_acknowledged_what_it_sent() -> None:
    outputs = Outputs(auto_ack=False)
    take = [raw_event(0, heart_rates(0, 3))]
    stream = Stream([take])

    async def go() -> None:
        run = asyncio.create_task(normalize_agent(outputs).run(stream))
        await until(lambda: outputs.pending)
        await asyncio.sleep(0.05)
        assert stream.acked == [] and "dedupe" not in outputs.kinds()
        while not run.done():
            for fut in outputs.pending:
                if not fut.done():
                    fut.set_result(None)
            await asyncio.sleep(0.01)
        await run

    asyncio.run(go())
    assert stream.acked == take and outputs.kinds()[-1] == "dedupe"


async def until(cond: Callable[[], object], within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def clean_event(offset: int, batch: SampleBatch) -> Event:
    value = clean.encode_bundle([batch])
    return Event(b"pat-1", value, {}, Message("vitals.clean", 0, offset))


def sample_batch(seq0: int, n: int) -> SampleBatch:
    b = SampleBatch(device_id="dev-1")
    for i in range(n):
        b.add("heart_rate", "/min", NOW + (seq0 + i) * 1_000_000, seq0 + i, 60.0 + i % 7)
    b.patient_id = "pat-1"
    b.receive_time_us = NOW
    b.transport = Transport.MQTT
    b.fill_reading_ids()
    return b


class EndingStream(Stream):
    """After its takes, waits until ``done`` is set: the agent's tasks finish the batch."""

    def __init__(self, takes: list[list[Event]], done: asyncio.Event) -> None:
        super().__init__(takes)
        self.done = done

    async def noack_take(self, max_: int, within: float) -> AsyncIterator[list[Event]]:
        async for take in super().noack_take(max_, within):
            yield take
        await self.done.wait()


@pytest.mark.timeout(60)
def test_the_seal_agent_seals_produces_the_manifest_then_acks(tmp_path: Path) -> None:
    lake_dir = tmp_path / "lake"
    outputs = Outputs()
    take = [
        clean_event(0, sample_batch(0, 20)),
        Event(b"pat-1", b"junk", {}, Message("vitals.clean", 0, 1)),
        clean_event(2, sample_batch(20, 5)),
    ]

    async def go() -> Stream:
        done = asyncio.Event()
        stream = EndingStream([take], done)
        agent = SealAgent(
            sealer=SealProcess(lake_dir, tmp_path / "keys"),
            batches_dir=lake_dir / BATCHES_DIR,
            outputs=outputs,
            batching=BatchSettings(max_rows=1000, max_messages=3, max_age_s=60.0),
        )
        run = asyncio.create_task(agent.run(stream))
        await until(lambda: len(stream.acked) == len(take), within_s=45)
        done.set()
        await run
        return stream

    stream = asyncio.run(go())
    assert stream.acked == take
    assert outputs.kinds() == ["dlq", "manifest"]  # rejects first, then the manifest
    _, _key, value, headers = outputs.sent[0]
    assert value == b"junk" and headers is not None and headers[H_DLQ_STAGE] == b"seal"
    manifest = BatchManifest.model_validate_json(outputs.sent[1][2] or b"")
    assert manifest.rows == 25 and outputs.sent[1][1] == manifest.batch_id.encode()
    assert unproduced(lake_dir / BATCHES_DIR) == []  # marked produced after the ack
