"""Record batches are compressed with the configured codec, end to end on the real Kafka.

The worker and the collectors compress what they produce (zstd by default): on one machine,
every byte a producer sends is also received by the broker in the sender's own syscall, and
the codec (cramjam) costs less CPU than the bytes it saves. A codec aiokafka cannot load
would only fail at the first send, so the round trip is tested, not just the setting.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from ingest.kafka_sink import BurstSender, durable_producer
from streams.app import create_app
from vitalproof.devstack.kafka import kafka_dir
from vitalproof.errors import ConfigError
from vitalproof.settings import KafkaSettings, Settings


def test_setting_reaches_the_worker_and_the_collectors(settings: Settings) -> None:
    assert settings.kafka.compression == "zstd"
    assert create_app(settings).conf.producer_compression_type == "zstd"
    plain = settings.evolve(kafka={"compression": "none"})
    assert plain.kafka.compression_type is None
    assert create_app(plain).conf.producer_compression_type is None


def test_unknown_codec_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITALPROOF_KAFKA_COMPRESSION", "brotli")
    with pytest.raises(ConfigError, match=r"^setting VITALPROOF_KAFKA_COMPRESSION: .*'brotli'"):
        Settings()
    with pytest.raises(ValidationError, match="compression"):
        KafkaSettings(compression="brotli")  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compressed_bursts_round_trip_through_kafka(kafka_topics: Settings, codec: str) -> None:
    settings = kafka_topics.evolve(kafka={"compression": codec})
    topic = settings.kafka.topic_raw
    values = [uuid.uuid4().bytes * 40 for _ in range(200)]  # repetitive: it must shrink

    async def run() -> list[bytes]:
        producer = durable_producer(settings)
        await producer.start()
        try:
            futures = await BurstSender(producer, topic).send(
                (b"dev-%d" % (i % 7), v, [("h", b"1")]) for i, v in enumerate(values)
            )
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
            consumer.assign(parts)
            await consumer.seek_to_beginning()
            got: list[bytes] = []
            while len(got) < len(values):
                batch = await consumer.getmany(timeout_ms=5000)
                if not batch:
                    break
                for records in batch.values():
                    got += [r.value or b"" for r in records]
            return got
        finally:
            await consumer.stop()

    got = asyncio.run(run())
    assert sorted(got) == sorted(values)
    log_bytes = _log_size(settings, topic)
    assert 0 < log_bytes < sum(map(len, values)) / 4, f"{codec}: {log_bytes} bytes on disk"


def _log_size(settings: Settings, topic: str) -> int:
    """Bytes of the topic's segment files in the broker's log folder."""
    logs = kafka_dir(settings) / "data"
    return sum(
        f.stat().st_size for d in logs.glob(f"{topic}-*") for f in d.glob("*.log") if f.is_file()
    )
