"""The service's own reader of ``vitals.clean`` and ``vitals.events``: every clean reading,
and every device event (sequence gap, reset, clock jump) the worker found, handed to the hub.

Its own consumer group (``vitalproof-clinic-<namespace>``), so it never slows the sealer nor
moves the sealer's offsets; it starts at the end of the topic (a live view: history comes
from the lake) and commits as it goes. A record that does not decode is logged and skipped:
the sealer, not this reader, sends such records to the DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError

from clinic import device_events
from clinic.live import Hub
from vitalproof.errors import WireFormatError
from vitalproof.registry import Registry
from vitalproof.settings import Settings
from vitalproof.wire import clean

log = logging.getLogger(__name__)


def group_id(settings: Settings) -> str:
    return f"vitalproof-clinic-{settings.namespace}"


async def run_fanout(settings: Settings, hub: Hub, stop: asyncio.Event) -> None:
    """Read and fan out until ``stop``; an unreachable broker is retried, not fatal (the
    service's history and consent routes work without Kafka)."""
    while not stop.is_set():
        try:
            await _consume(settings, hub, stop)
        except (KafkaError, OSError) as e:
            hub.fanout_ready = False
            log.warning("fan-out: Kafka at %s: %s; retrying in 2 s", settings.kafka.bootstrap, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def _consume(settings: Settings, hub: Hub, stop: asyncio.Event) -> None:
    registry = Registry(settings.paths.registry_path)

    def patient_of(device_id: str) -> str | None:
        device = registry.lookup(device_id)
        return device.patient_id if device else None

    events_topic = settings.kafka.topic_events
    consumer = AIOKafkaConsumer(
        settings.kafka.topic_clean,
        events_topic,
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=group_id(settings),
        auto_offset_reset="latest",
        enable_auto_commit=True,
        max_partition_fetch_bytes=256 * 1024,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=200, max_records=500)
            hub.fanout_ready = bool(consumer.assignment())
            for tp, records in got.items():
                if tp.topic == events_topic:
                    hub.deliver_device_events(_device_events(records, patient_of))
                    continue
                batches = []
                for record in records:
                    try:
                        batches.extend(clean.decode_record(record.value or b""))
                    except WireFormatError as e:
                        log.warning("vitals.clean %s/%s: %s", record.partition, record.offset, e)
                hub.deliver(batches)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


def _device_events(
    records: list[ConsumerRecord[bytes, bytes]], patient_of: Callable[[str], str | None]
) -> list[device_events.DeviceEvent]:
    out = []
    for record in records:
        try:
            out.append(device_events.decode(record.value or b"", patient_of))
        except WireFormatError as e:
            log.warning("vitals.events %s/%s: %s", record.partition, record.offset, e)
    return out
