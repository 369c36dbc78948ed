"""The one Kafka producer configuration every collector uses: durable before acknowledged."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from vitalproof.settings import Settings


def durable_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    """acks=all and idempotence: a produce is acknowledged only once the broker has it,
    and retries cannot duplicate it (invariant 1)."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 1 << 20,
        "request_timeout_ms": 30_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)
