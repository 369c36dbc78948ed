"""The health figures as Prometheus metrics (``GET /metrics``), through prometheus-client's
collector interface: each scrape reads the last refresh, as ``/api/health`` does.

No health data and no identifier of a patient or a device is in any metric or label: counts,
rates, lags, offsets, a transaction hash, a block number, times and ages. Labels are topic
names, consumer names and groups (the namespace's), DLQ stages and reason kinds
(:func:`~clinic.health.figures.reason_kind` takes names and values out of the reasons).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from clinic.health.figures import KafkaFigures, LastAnchor, Sealed
from clinic.health.monitor import Health

NS = "vitalproof"


class HealthCollector(Collector):
    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        r = self.health.last
        yield from _gauges(
            ("kafka_up", "1 if the last refresh read Kafka, else 0", int(r.kafka is not None)),
            ("health_refresh_timestamp_seconds", "when the figures were refreshed", r.at),
        )
        if r.kafka is not None:
            yield from self._kafka(r.kafka, r.rates)
        yield from self._sealed(r.sealed, r.rates)
        yield from self._dlq()
        if r.anchor is not None:
            yield from self._anchor(r.anchor)
        yield from self._live()

    def _kafka(self, kafka: KafkaFigures, rates: Mapping[str, float | None]) -> Iterator[Metric]:
        k = self.health.settings.kafka
        written = CounterMetricFamily(
            f"{NS}_topic_records",
            "records written to the topic (the sum of its partitions' end offsets)",
            labels=["topic"],
        )
        rate = GaugeMetricFamily(
            f"{NS}_topic_records_per_second",
            "records written per second, measured by the service over the last 5 s",
            labels=["topic"],
        )
        for series, topic in (
            ("raw_in", k.topic_raw),
            ("clean_in", k.topic_clean),
            ("dlq_in", k.topic_dlq),
        ):
            if topic in kafka.records:
                written.add_metric([topic], kafka.records[topic])
                per_s = rates.get(series)
                if per_s is not None:
                    rate.add_metric([topic], per_s)
        lag = GaugeMetricFamily(
            f"{NS}_consumer_lag_records",
            "records of the topic the consumer group has still to read",
            labels=["consumer", "group", "topic"],
        )
        for x in kafka.lag:
            lag.add_metric([x.consumer.name, x.consumer.group, x.consumer.topic], x.records)
        yield from (written, rate, lag)
        yield from _gauges(
            ("dlq_records_uncounted", "DLQ records not counted yet", self.health.probe.dlq_pending)
        )

    def _sealed(self, sealed: Sealed, rates: Mapping[str, float | None]) -> Iterator[Metric]:
        yield from _counters(
            (
                "sealed_readings",
                "readings in sealed batches (the manifests' rows)",
                sealed.readings,
            ),
            ("sealed_batches", "sealed batches (manifests)", sealed.batches),
        )
        last = sealed.last_sealed_us
        yield from _gauges(
            (
                "sealed_records_per_second",
                "vitals.clean records the sealer acknowledged per second (last 5 s)",
                rates.get("sealed_records"),
            ),
            (
                "sealed_readings_per_second",
                "readings sealed per second (last 5 s)",
                rates.get("sealed_readings"),
            ),
            (
                "last_seal_timestamp_seconds",
                "when the last batch was sealed",
                None if last is None else last / 1e6,
            ),
        )

    def _dlq(self) -> Iterator[Metric]:
        dlq = CounterMetricFamily(
            f"{NS}_dlq_records",
            "DLQ records counted by stage and kind of reason (names and values taken out)",
            labels=["stage", "reason"],
        )
        for stage, reason, n in self.health.dlq.rows():
            dlq.add_metric([stage, reason], n)
        yield dlq

    def _anchor(self, a: LastAnchor) -> Iterator[Metric]:
        info = InfoMetricFamily(f"{NS}_last_anchor", "the last anchor's transaction")
        info.add_metric([], {"tx_hash": a.tx_hash, "chain_id": str(a.chain_id)})
        yield info
        yield from _gauges(
            ("last_anchor_block", "block number of the last anchor", a.block_number),
            ("last_anchor_tree_size", "log entries the last anchor covers", a.tree_size),
            ("last_anchor_timestamp_seconds", "the last anchor's block time", a.block_time),
            ("last_anchor_age_seconds", "seconds since that block", a.age_s(self.health.clock())),
        )
        yield from _counters(("anchors", "log heads anchored on-chain", a.anchors))

    def _live(self) -> Iterator[Metric]:
        live = self.health.live()
        yield from _gauges(
            ("fanout_ready", "1 if the fan-out has its partitions", int(live["fanout"] == "ready")),
            ("live_subscriptions", "live subscriptions held", live["subscriptions"]),
            ("live_connections", "SSE and WebSocket connections", live["connections"]),
        )
        yield from _counters(
            ("readings_delivered", "readings sent to subscribers", live["readings_delivered"]),
            (
                "deliveries_refused",
                "readings withheld from subscribers by consent",
                live["deliveries_refused"],
            ),
        )


Figure = tuple[str, str, float | None]


def _gauges(*figures: Figure) -> Iterator[GaugeMetricFamily]:
    """One unlabelled gauge per ``(name, help, value)``; none for an unknown value."""
    for name, doc, value in figures:
        if value is not None:
            yield GaugeMetricFamily(f"{NS}_{name}", doc, value=value)


def _counters(*figures: Figure) -> Iterator[CounterMetricFamily]:
    for name, doc, value in figures:
        if value is not None:
            yield CounterMetricFamily(f"{NS}_{name}", doc, value=value)


def registry(health: Health) -> CollectorRegistry:
    """The service's own registry: the health figures and the process's (CPU, memory, open
    files), nothing from other libraries' global registry."""
    reg = CollectorRegistry()
    reg.register(HealthCollector(health))
    ProcessCollector(registry=reg)
    return reg
