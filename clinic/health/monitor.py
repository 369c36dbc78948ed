"""The service's view of pipeline health: refreshed in the background, read by requests.

A request never waits on Kafka: :meth:`Health.run` (a task of the app's lifespan) refreshes
the figures every :data:`REFRESH_S`, and ``/api/health`` and ``/metrics`` read the last
refresh. The live figures (subscriptions, deliveries) and the ages are taken when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaError

from clinic.health.figures import (
    DlqTally,
    KafkaFigures,
    LastAnchor,
    Sealed,
    Throughput,
    rounded,
)
from clinic.health.sources import AnchorWatch, KafkaProbe, LakeTally
from clinic.live import Hub
from streams.lake.storage import open_lake
from vitalproof.errors import VitalproofError
from vitalproof.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between refreshes.
REFRESH_S = 1.0
#: Seconds a refresh may wait on Kafka before it counts Kafka as unreachable.
KAFKA_TIMEOUT_S = 5.0


@dataclass
class Refresh:
    """What the last refresh found (``kafka`` is None when Kafka could not be read)."""

    at: float = 0.0
    kafka: KafkaFigures | None = None
    kafka_error: str | None = "not checked yet"
    sealed: Sealed = field(default_factory=Sealed)
    anchor: LastAnchor | None = None
    anchor_error: str | None = None
    rates: dict[str, float | None] = field(default_factory=dict)


class Health:
    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = REFRESH_S,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.clock = clock
        self.interval_s = interval_s
        self.probe = KafkaProbe(settings)
        self.lake = LakeTally(open_lake(settings) if settings.lake.remote else settings.lake_dir)
        self.anchors = AnchorWatch(settings.anchor_dir / "log")
        self.dlq = DlqTally()
        self.throughput = Throughput()
        self.last = Refresh()

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until ``stop``; a failing source is reported in the figures, never fatal."""
        try:
            while not stop.is_set():
                await self.refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
        finally:
            await self.probe.close()

    async def refresh(self) -> Refresh:
        now = self.clock()
        figures, error = await self._read_kafka()
        sealed, anchor, anchor_error = await asyncio.to_thread(self._read_files)
        counters: dict[str, int | None] = {
            "raw_in": _written(figures, self.settings.kafka.topic_raw),
            "clean_in": _written(figures, self.settings.kafka.topic_clean),
            "dlq_in": _written(figures, self.settings.kafka.topic_dlq),
            "sealed_records": figures.consumed("seal") if figures else None,
            "sealed_readings": sealed.readings,
        }
        rates = self.throughput.add(now, counters)
        self.last = Refresh(now, figures, error, sealed, anchor, anchor_error, rates)
        return self.last

    async def _read_kafka(self) -> tuple[KafkaFigures | None, str | None]:
        bootstrap = self.settings.kafka.bootstrap
        try:
            figures = await asyncio.wait_for(self.probe.read(self.dlq), KAFKA_TIMEOUT_S)
        except TimeoutError:
            error = f"no answer within {KAFKA_TIMEOUT_S:g} s"
        except (KafkaError, OSError) as e:
            error = str(e) or type(e).__name__
        else:
            if self.last.kafka is None and self.last.at:
                log.info("health: Kafka at %s answers again", bootstrap)
            return figures, None
        if self.last.kafka_error is None or not self.last.at:
            log.warning("health: cannot read Kafka at %s: %s", bootstrap, error)
        await self.probe.close()
        return None, error

    def _read_files(self) -> tuple[Sealed, LastAnchor | None, str | None]:
        sealed = self.lake.read()
        try:
            return sealed, self.anchors.read(), None
        except (VitalproofError, OSError) as e:
            return sealed, None, str(e)

    # -- what the routes show -------------------------------------------------------------

    def live(self) -> dict[str, Any]:
        """The hub's figures now (the same as ``/status``)."""
        return self.hub.status()

    def view(self) -> dict[str, Any]:
        """Every figure, for the operator page (``GET /api/health``)."""
        now = self.clock()
        r = self.last
        k = self.settings.kafka
        topics = {}
        for role, name in (("raw", k.topic_raw), ("clean", k.topic_clean), ("dlq", k.topic_dlq)):
            topics[role] = {
                "topic": name,
                "records": _written(r.kafka, name),
                "per_s": rounded(r.rates.get(f"{role}_in")),
            }
        anchor = None
        if r.anchor is not None:
            anchor = {
                "tx_hash": r.anchor.tx_hash,
                "block_number": r.anchor.block_number,
                "block_time": r.anchor.block_time,
                "age_s": round(r.anchor.age_s(now), 1),
                "tree_size": r.anchor.tree_size,
                "chain_id": r.anchor.chain_id,
                "anchors": r.anchor.anchors,
            }
        return {
            "at": now,
            "refreshed_at": r.at or None,
            "kafka": {"bootstrap": k.bootstrap, "up": r.kafka is not None, "error": r.kafka_error},
            "topics": topics,
            "sealed": {
                "readings": r.sealed.readings,
                "batches": r.sealed.batches,
                "last_sealed_us": r.sealed.last_sealed_us,
                "readings_per_s": rounded(r.rates.get("sealed_readings")),
                "records_per_s": rounded(r.rates.get("sealed_records")),
            },
            "lag": [
                {
                    "consumer": lag.consumer.name,
                    "group": lag.consumer.group,
                    "topic": lag.consumer.topic,
                    "records": lag.records,
                }
                for lag in (r.kafka.lag if r.kafka else [])
            ],
            "dlq": {
                "records": self.dlq.total,
                "not_counted_yet": self.probe.dlq_pending if r.kafka else None,
                "reasons": [
                    {"stage": s, "reason": reason, "records": n} for s, reason, n in self.dlq.rows()
                ],
            },
            "anchor": anchor,
            "anchor_error": r.anchor_error,
            "live": self.live(),
            "history": self.throughput.columns(),
        }


def _written(figures: KafkaFigures | None, topic: str) -> int | None:
    if figures is None:
        return None
    return figures.records.get(topic)
