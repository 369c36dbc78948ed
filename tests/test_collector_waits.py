"""The MQTT collector waits out Kafka: the session's Kafka stopped (cleanly) for ~20 s while
a device goes on publishing. The collector stays up, acknowledges nothing Kafka did not
take (the broker's persistent session holds it), says once that Kafka is away and once
that it is back, and afterwards every message is in ``vitals.raw`` (the drill's
``kafka-outage`` used to see it exit with LeaderNotAvailableError / "Unable to bootstrap";
docs/reliability.md).

The producer's request timeout is cut to 3 s here (``producer_factory``) so that a 20 s
stop outlasts it, as a minute outlasts the default 30 s in the drill.
"""

from __future__ import annotations

import asyncio
import logging
import time

import paho.mqtt.client as mqtt
import pytest

from ingest.kafka_sink import durable_producer
from ingest.mqtt.collector import MqttCollector, MqttCredentials
from tests.test_pipeline import enroll
from vitalproof.cli.drill import _read_topic, end_collector_session
from vitalproof.devstack import StackManager, collector_credentials
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_the_collector_waits_for_a_stopped_kafka_and_loses_nothing(
    kafka_topics: Settings, stack: StackManager, caplog: pytest.LogCaptureFixture
) -> None:
    settings = kafka_topics.evolve(
        mqtt={"share_group": ""}, runtime={"retry_min_s": 0.5, "retry_max_s": 2.0}
    )
    ((device, password),) = enroll(settings, 1, prefix=f"dv-{settings.namespace}")
    user, collector_password = collector_credentials(settings)
    collector = MqttCollector(
        settings,
        MqttCredentials(user, collector_password),
        producer_factory=lambda: durable_producer(settings, request_timeout_ms=3000),
    )
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    client.username_pw_set(device, password)
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()

    def publish(lo: int, hi: int) -> None:
        infos = [
            client.publish(f"devices/{device}/vitals", b'{"n": %d}' % i, qos=1)
            for i in range(lo, hi)
        ]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()  # the broker has it

    async def until(what: str, cond: object, within_s: float, task: asyncio.Task[object]) -> None:
        deadline = time.monotonic() + within_s
        while not cond():  # type: ignore[operator]
            assert not task.done(), f"the collector stopped while waiting for {what}"
            assert time.monotonic() < deadline, f"{what}: not within {within_s:g} s"
            await asyncio.sleep(0.2)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop=stop))
        await asyncio.wait_for(collector.subscribed.wait(), 30)
        await asyncio.to_thread(publish, 0, 50)
        await until("the first 50 acked", lambda: collector.stats.acked >= 50, 30, task)
        await asyncio.to_thread(stack.stop, "kafka")
        t_stop = time.monotonic()
        try:
            await asyncio.to_thread(publish, 50, 150)  # while Kafka is away
            # Kafka stays stopped until the collector has noticed (a loaded CI machine took
            # just over 30 s once: its 3 s producer timeouts, retries and metadata waits).
            await until("Kafka called away", lambda: collector.stats.kafka == "waiting", 60, task)
            await asyncio.sleep(max(0.0, 20.0 - (time.monotonic() - t_stop)))
            assert not task.done(), "the collector exited while Kafka was away"
        finally:
            await asyncio.to_thread(stack.start, "kafka")
        await until("Kafka back", lambda: collector.stats.kafka == "ok", 90, task)
        await asyncio.to_thread(publish, 150, 160)
        # Stopped only once everything is on Kafka: what the collector has not acked when it
        # stops stays in its session, which the test then ends (and would count as lost).
        deadline = time.monotonic() + 60
        while wanted - set(await raw_values()) and time.monotonic() < deadline:
            assert not task.done(), "the collector stopped"
            await asyncio.sleep(1.0)
        stop.set()
        await task

    wanted = {b'{"n": %d}' % i for i in range(160)}

    async def raw_values() -> list[bytes]:
        return [v for v, _ in await _read_topic(settings, settings.kafka.topic_raw)]

    try:
        with caplog.at_level(logging.INFO, logger="ingest.mqtt.collector"):
            asyncio.run(go())
    finally:
        client.disconnect()
        client.loop_stop()
        end_collector_session(settings)
    values = asyncio.run(raw_values())
    assert wanted - set(values) == set(), f"{len(wanted - set(values))} messages lost"
    assert set(values) <= wanted
    lines = [r.getMessage() for r in caplog.records if "Kafka" in r.getMessage()]
    away = [ln for ln in lines if "retrying with backoff" in ln]
    back = [ln for ln in lines if "back after" in ln]
    assert len(away) == 1 and len(back) == 1, lines  # one line per change, not per message
    assert f"Kafka at {settings.kafka.bootstrap}: unavailable" in away[0], away[0]
    assert collector.stats.kafka_outages == 1
