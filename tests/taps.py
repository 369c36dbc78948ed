"""A background reader of ``vitals.raw`` from its start, for tests that check what the
collectors forwarded against what the fleet sent (crash, scale, TLS and sharing tests)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from device_sims.record import reading_ids_of
from vitalproof.settings import Settings


class RawTap:
    """Reads every partition of ``vitals.raw`` from the beginning, in the background, for the
    whole test: ``records`` holds what :meth:`take` keeps of each record, ``ids`` every
    reading id seen. Subclasses keep more of a record by overriding :meth:`take`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[Any] = []
        self.ids: set[str] = set()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap, group_id=None, enable_auto_commit=False
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        tps = [
            TopicPartition(self.settings.kafka.topic_raw, p)
            for p in range(self.settings.kafka.partitions)
        ]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers}
                    self.records.append(self.take(headers, r.value or b""))

    def take(self, headers: dict[str, str], payload: bytes) -> Any:
        """What to keep of one record: (device id header, payload)."""
        device = headers.get("device-id", "")
        self.ids.update(reading_ids_of(device, payload))
        return device, payload

    def count(self, device_prefix: str) -> int:
        return sum(d.startswith(device_prefix) for d, _ in self.records)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()
