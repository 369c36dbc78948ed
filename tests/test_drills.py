"""The chaos drill, CI-sized: a fleet of 200 devices through the whole real pipeline while the
harness SIGKILLs the worker, the MQTT collector or the anchor job at random moments and
restarts them; then the harness's reading-by-reading checks must find nothing lost, nothing
sealed twice, every malformed message in the DLQ, every batch once in the anchor log, every
anchor consistent with the last and sampled proofs verifying on Anvil.

The full drill set (Kafka, Mosquitto, Anvil and the clinician service killed, Kafka stopped
for a minute, the lake's disk full, a partition, clock steps) is ``vitalproof drill``; its
figures are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.test_pipeline import collector_running, enroll
from vitalproof.cli.drill import (
    DrillPlan,
    DrillResult,
    check_readings,
    end_collector_session,
    run_drill,
)
from vitalproof.devstack import StackManager
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


def test_worker_collector_and_anchor_killed_under_load_lose_nothing(
    anvil_settings: Settings,
) -> None:
    plan = DrillPlan(
        devices=200, rate_hz=0.5, duration_s=20.0, kills=3, proofs=10, serve=False, privacy=False,
        settle_timeout_s=120.0, seed=random.randrange(2**31),
    )  # fmt: skip
    lines: list[str] = []
    result = run_drill(anvil_settings, "kill-worker+collector+anchor", plan, lines.append)
    story = "\n".join(lines) + "\n" + json.dumps(result.to_json_dict(), indent=1)
    kills = [i for i in result.injected if "SIGKILL" in i]
    assert len(kills) == 3, story
    assert result.readings_sent > 1000, story
    assert result.lost == 0, story
    assert result.duplicated == 0, story
    assert result.unknown_sealed == 0, story
    assert result.malformed_sent > 0 and result.dlq_missing == 0, story
    assert result.dlq_without_reason == 0, story
    assert result.batches_not_in_log == 0 and result.log_entries_twice == 0, story
    # At least one anchor: a killed anchor job's successor waits out the lease (6 s) and a
    # period, so on a loaded machine one anchor may cover every batch of the run.
    assert result.anchors_on_chain >= 1 and result.heads_inconsistent == 0, story
    assert result.heads_not_on_chain == 0, story
    assert result.proofs_verified == 10 and result.proofs_failed == 0, story
    assert result.ok, story

    # The check is not blind: a reading the fleet recorded but nobody sealed counts as lost.
    record = next((anvil_settings.paths.home / "runs").glob("drill-*.truth.jsonl"))
    forged = _with_unsealed_reading(record, record.with_name("forged.truth.jsonl"))
    again = DrillResult("forged", 0, 0, 0, "")
    rs = anvil_settings.evolve(kafka={"topic_prefix": result.namespace + "."})
    check_readings(rs, forged, again)
    assert again.lost == 1 and again.readings_sent == result.readings_sent + 1


def _with_unsealed_reading(record: Path, out: Path) -> Path:
    lines = record.read_text().splitlines()
    doc = json.loads(next(ln for ln in lines if json.loads(ln)["kind"] == "msg"))
    doc["reading_ids"] = ["00" * 16]
    doc["malformed"] = False
    out.write_text("\n".join([*lines, json.dumps(doc)]) + "\n")
    return out


def test_a_single_collector_keeps_what_a_sigkilled_mosquitto_acknowledged(
    kafka_topics: Settings, stack: StackManager
) -> None:
    """The kill-mosquitto drill's finding, pinned: with ``share_group=""`` and the broker
    saving after every change (``devstack.mqtt_autosave_changes=1``) the collector's plain
    subscription is on disk, so messages that devices publish (and
    Mosquitto PUBACKs) after the broker was SIGKILLed and restarted, while the collector is
    away, wait in its restored session instead of matching no one."""
    settings = kafka_topics.evolve(mqtt={"share_group": ""})
    durable = StackManager(settings.evolve(devstack={"mqtt_autosave_changes": 1}))
    durable.stop("mosquitto")
    durable.start("mosquitto")  # saving after every change: what the drill runs with
    (device, password), *_ = enroll(settings, 1, prefix=f"dv-{settings.namespace}")

    async def collector_once(expect: int) -> int:
        async with collector_running(settings) as collector:
            for _ in range(100):
                if collector.stats.acked >= expect:
                    break
                await asyncio.sleep(0.1)
            return collector.stats.acked

    try:
        asyncio.run(collector_once(0))  # subscribes, then leaves: its session stays
        time.sleep(1.0)
        assert durable.kill("mosquitto") is not None
        durable.start("mosquitto")
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5
        )
        client.username_pw_set(device, password)
        client.connect(settings.mqtt.host, settings.mqtt.port)
        client.loop_start()
        infos = [client.publish(f"devices/{device}/vitals", b"{}", qos=1) for _ in range(20)]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()  # Mosquitto acknowledged each one
        client.disconnect()
        client.loop_stop()
        assert asyncio.run(collector_once(20)) == 20, "messages acknowledged by Mosquitto lost"
    finally:
        end_collector_session(settings)
        stack.stop("mosquitto")
        stack.start("mosquitto")  # the session's own config back
