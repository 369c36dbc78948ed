"""Topic creation honours the replication settings (VITALPROOF_KAFKA_REPLICATION_FACTOR and
VITALPROOF_KAFKA_MIN_INSYNC_REPLICAS), on the session's real (one-broker) Kafka."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from vitalproof.devstack import ensure_topics
from vitalproof.devstack.kafka import run_sync
from vitalproof.errors import StackError
from vitalproof.settings import Settings

#: DescribeConfigs' config source of a value set on the topic itself (not a broker default).
TOPIC_CONFIG = 1


async def _describe(bootstrap: str, topic: str) -> tuple[int, dict[str, tuple[str, int]]]:
    """(replicas of partition 0, the topic's configs as name -> (value, source))."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        replicas = len(described["partitions"][0]["replicas"])
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        ((_, _, _, _, entries),) = response.resources
        return replicas, {e[0]: (e[1], e[3]) for e in entries}
    finally:
        await admin.close()


def test_topics_get_the_replication_and_min_isr_of_the_settings(settings: Settings) -> None:
    ensure_topics(settings, [settings.kafka.topic_raw])
    replicas, configs = run_sync(_describe(settings.kafka.bootstrap, settings.kafka.topic_raw))
    assert replicas == settings.kafka.replication_factor == 1
    # set on the topic, not inherited from the broker: what a cluster's topics rely on
    assert configs["min.insync.replicas"] == (str(settings.kafka.min_insync_replicas), TOPIC_CONFIG)


def test_more_replicas_than_brokers_is_one_clear_error(settings: Settings) -> None:
    cluster = settings.evolve(kafka={"replication_factor": 3, "min_insync_replicas": 2})
    with pytest.raises(StackError) as err:
        ensure_topics(cluster, [cluster.kafka.topic_raw])
    assert str(err.value) == (
        f"creating topic {cluster.kafka.topic_raw!r}: replication factor 3 needs at least 3 "
        f"brokers at {cluster.kafka.bootstrap} (VITALPROOF_KAFKA_REPLICATION_FACTOR)"
    )


def test_topics_create_makes_every_topic_and_a_compacted_dedupe_topic(
    settings: Settings, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vitalproof", "topics", "create"],
        env=os.environ | settings.child_env(tmp_path / "secrets"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    k = settings.kafka
    for name in [*k.pipeline_topics, k.topic_dedupe]:
        assert f"{name}: {k.partitions} partitions, replication factor 1" in out.stdout
    _, configs = run_sync(_describe(k.bootstrap, k.topic_dedupe))
    assert configs["cleanup.policy"] == ("compact", TOPIC_CONFIG)
    _, configs = run_sync(_describe(k.bootstrap, k.topic_raw))
    assert configs["cleanup.policy"][0] == "delete"


def test_an_existing_topic_with_too_few_replicas_is_refused(settings: Settings) -> None:
    """On a real cluster (3 brokers) the same check names topics made before the setting."""
    ensure_topics(settings, [settings.kafka.topic_raw])
    more = settings.evolve(kafka={"replication_factor": 2})
    with pytest.raises(StackError, match=r"exist with fewer than 2 replicas"):
        ensure_topics(more, [more.kafka.topic_raw])
