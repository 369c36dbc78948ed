"""Invariant 1 for the MQTT collector: kill -9 it in the middle of a run, restart it, and no
reading is lost.

The collector is a real subprocess (``vitalproof collect``) with its fixed client id and
persistent session; 20 simulated devices publish through the real Mosquitto for ~6 s; the
collector is SIGKILLed mid-run, stays down a moment (the broker must queue for its session),
and is restarted. Every reading id of the fleet's ground truth must then be in ``vitals.raw``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest
from paho.mqtt.client import MQTTv5

from device_sims.fleet import Fleet
from device_sims.record import sent_reading_ids
from tests.taps import RawTap
from tests.test_pipeline import enroll, stop
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

PROBE = "probe"


def start_collector(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    # Client id vitalproof-collector-<gateway_id> and share group come from the settings.
    with log.open("ab") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "vitalproof", "collect"],
            env=os.environ | settings.child_env(settings.paths.home / "secrets"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


async def wait_collector_ready(
    settings: Settings, tap: RawTap, probe_password: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Publish probes as a device until one comes out in ``vitals.raw``: subscribed end to end."""
    before = tap.count(PROBE)
    for _ in range(60):
        if proc.poll() is not None:
            pytest.fail(f"the collector exited ({proc.returncode}):\n{log_tail(log)}")
        await asyncio.to_thread(
            mqtt_publish.single,
            f"devices/{PROBE}-0/vitals",
            b"probe",
            qos=1,
            hostname=settings.mqtt.host,
            port=settings.mqtt.port,
            client_id=f"{PROBE}-0",
            auth={"username": f"{PROBE}-0", "password": probe_password},
            protocol=MQTTv5,
        )
        await asyncio.sleep(0.5)
        if tap.count(PROBE) > before:
            return
    pytest.fail(f"the collector forwarded no probe within 30 s:\n{log_tail(log)}")


def test_collector_sigkilled_mid_run_loses_no_reading(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    settings = kafka_topics
    creds = enroll(settings, 20)
    ((_, probe_password),) = enroll(settings, 1, prefix=PROBE)
    record = tmp_path / "truth.jsonl"
    log = tmp_path / "collector.log"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    procs: list[subprocess.Popen[bytes]] = [start_collector(settings, log)]

    async def go() -> tuple[int, int, set[str]]:
        tap = RawTap(settings)
        await tap.start()
        try:
            await wait_collector_ready(settings, tap, probe_password, procs[0], log)
            fleet = Fleet(
                creds,
                settings.mqtt.host,
                settings.mqtt.port,
                rate_hz=2.0,
                duration_s=6.0,
                record_path=record,
                seed=seed % 1000,
            )
            run = asyncio.create_task(fleet.run())
            await asyncio.sleep(rng.uniform(2.0, 3.5))
            assert not run.done(), "the fleet finished before the kill"
            assert procs[0].poll() is None, f"the collector died by itself:\n{log_tail(log)}"
            forwarded_before_kill = tap.count("dev-")
            os.killpg(procs[0].pid, signal.SIGKILL)
            assert procs[0].wait(10) == -signal.SIGKILL
            await asyncio.sleep(1.0)  # down for a while: the broker queues for the session
            assert not run.done(), "the fleet finished while the collector was down"
            procs.append(start_collector(settings, log))
            report = await run
            assert report.ok, report.errors
            sent = sent_reading_ids(record)
            for _ in range(300):
                if sent <= tap.ids:
                    break
                if procs[1].poll() is not None:
                    pytest.fail(f"the restarted collector exited:\n{log_tail(log)}")
                await asyncio.sleep(0.1)
            return forwarded_before_kill, report.messages_sent, set(tap.ids)
        finally:
            await tap.stop()

    try:
        forwarded_before_kill, messages_sent, raw_ids = asyncio.run(go())
    finally:
        for p in procs:
            stop(p)
    sent = sent_reading_ids(record)
    assert sent, "the fleet sent nothing"
    assert 0 < forwarded_before_kill < messages_sent, (
        f"the kill should fall mid-run: {forwarded_before_kill} of {messages_sent} forwarded"
    )
    missing = sent - raw_ids
    assert not missing, (
        f"seed {seed}: {len(missing)} of {len(sent)} readings never reached vitals.raw "
        f"after the collector was killed and restarted"
    )
