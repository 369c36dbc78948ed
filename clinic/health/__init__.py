"""Pipeline health for operators: what goes in, what is sealed, who lags, what was rejected
and why, the last anchor, and who watches live.

The package's rooms: :mod:`~clinic.health.figures` (the rules, pure), :mod:`~clinic.health.
sources` (reading Kafka, the lake's manifests and the anchor log), :mod:`~clinic.health.
monitor` (the background refresh the routes read) and :mod:`~clinic.health.metrics` (the same
figures for Prometheus). Each figure is read where it lives, never kept a second time:

* records in: the topics' end offsets; rates from their change, sampled by the service;
* sealed: the lake's manifests (readings, batches); sealed records: the worker's commits on
  vitals.clean;
* consumer lag: each group's committed offsets against the end offsets;
* DLQ counts: the DLQ's records, read from the first retained one, by their ``dlq-stage`` and
  ``dlq-reason`` headers;
* last anchor: the anchor log's receipts (``anchors.jsonl``);
* live: the hub (subscriptions, connections, deliveries).
"""

from __future__ import annotations

from clinic.health.metrics import registry
from clinic.health.monitor import Health

__all__ = ["Health", "registry"]
