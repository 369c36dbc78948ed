"""Three MQTT collectors on one shared subscription, one SIGKILLed under load: nothing is lost.

Each collector is a real ``vitalproof collect --gateway-id ...`` subprocess with its own
persistent session (client id ``vitalproof-collector-<gateway id>``, clean_start=False) in
one share group (``$share/<group>/devices/+/vitals``) on the real Mosquitto; a simulated fleet
publishes QoS 1 through it. One collector is SIGKILLed mid-run and stays down until the
fleet has finished.

What Mosquitto 2.0 does then (src/subs.c: the group's members are served round robin,
connected or not; eclipse-mosquitto/mosquitto#1747, #2662): the dead member's session keeps
its subscription, so the messages it had in flight *and* its round-robin share of everything
published while it is down stay queued in that session. No other member gets them. They are
delivered when the same client id comes back within the session expiry (24 h), so the test
checks exactly that:

* before the restart, readings are missing from ``vitals.raw`` (held for the dead session),
  and every one of them arrives through the killed collector once it is back;
* every published reading is then in ``vitals.raw`` at least once;
* a reading is on ``vitals.raw`` twice only if the killed collector forwarded it before the
  kill without its PUBACK reaching the broker (its in-flight window, at most Receive Maximum
  messages) and forwarded it again after its restart; the survivors forward no duplicate;
* retiring it for good: killed again, its share piles up in the session; ``vitalproof
  collect --gateway-id ID --leave`` forwards that and ends the session, after which the
  survivors receive everything published.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import paho.mqtt.publish as mqtt_publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_sims.fleet import Fleet
from device_sims.record import reading_ids_of, sent_reading_ids
from ingest.mqtt.collector import RECEIVE_MAXIMUM
from tests.taps import RawTap
from tests.test_pipeline import enroll
from vitalproof.cli import processes
from vitalproof.devstack import collector_credentials
from vitalproof.raw import H_DEVICE, H_GATEWAY, H_RECEIVED
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

PROBE = "probe"
COLLECTORS = 3


@dataclass(frozen=True)
class Forwarded:
    """One record on vitals.raw: which collector forwarded it, when it received it."""

    device: str
    gateway: str
    received_us: int
    reading_ids: tuple[str, ...]


class GatewayTap(RawTap):
    """:class:`RawTap` keeping who forwarded each record and when it received it."""

    records: list[Forwarded]

    def take(self, headers: dict[str, str], payload: bytes) -> Forwarded:
        ids = tuple(reading_ids_of(headers[H_DEVICE], payload))
        self.ids.update(ids)
        return Forwarded(headers[H_DEVICE], headers[H_GATEWAY], int(headers[H_RECEIVED]), ids)

    def gateways_seen(self, device_prefix: str) -> set[str]:
        return {r.gateway for r in self.records if r.device.startswith(device_prefix)}


@dataclass(frozen=True)
class Run:
    kill_us: int
    restart_us: int
    sent: set[str]
    missing_while_down: set[str]  # not on vitals.raw after the survivors had drained
    records: list[Forwarded]
    ids: set[str]
    held_then_left: set[str]  # readings held for the victim's session when it left
    after_leave: set[str]  # readings published once it had left


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def start_collector(settings: Settings, gateway: str, log: Path) -> processes.Child:
    return processes.start(settings, "collect", "--gateway-id", gateway, log=log)


def forget_session(settings: Settings, gateway: str) -> None:
    """Drop a collector's persistent session (clean start, expiry 0), so the session broker
    stops queueing for it after the test. Discards what it holds: only once all arrived."""
    user, password = collector_credentials(settings)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"vitalproof-collector-{gateway}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(user, password)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(settings.mqtt.host, settings.mqtt.port, clean_start=True, properties=props)
    client.loop_start()
    try:
        time.sleep(0.3)
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(settings: Settings, creds: list[tuple[str, str]], path: Path) -> set[str]:
    """A short second fleet; the reading ids it published."""
    fleet = Fleet(
        creds,
        settings.mqtt.host,
        settings.mqtt.port,
        rate_hz=10.0,
        duration_s=2.0,
        record_path=path,
    )
    report = await fleet.run()
    assert report.ok, report.errors
    return sent_reading_ids(path)


async def settle(tap: GatewayTap, wanted: set[str], until_missing: bool) -> None:
    """Wait until vitals.raw stops growing (and, ``until_missing``, something is missing) or
    until everything ``wanted`` is there; 10 s at most."""
    settled, quiet = len(tap.records), 0
    for _ in range(50):
        await asyncio.sleep(0.2)
        quiet = quiet + 1 if len(tap.records) == settled else 0
        settled = len(tap.records)
        if not until_missing and wanted <= tap.ids:
            return
        if until_missing and quiet >= 3 and wanted - tap.ids:
            return


async def wait_all_subscribed(
    settings: Settings,
    tap: GatewayTap,
    probe_password: str,
    procs: dict[str, processes.Child],
    logs: dict[str, Path],
) -> None:
    """Publish probes until each collector has forwarded one: all members of the group."""
    for _ in range(150):
        for gw, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"collector {gw} exited ({proc.returncode}):\n{log_tail(logs[gw])}")
        await asyncio.to_thread(
            mqtt_publish.single,
            f"devices/{PROBE}-0/vitals",
            b"probe",
            qos=1,
            hostname=settings.mqtt.host,
            port=settings.mqtt.port,
            client_id=f"{PROBE}-0",
            auth={"username": f"{PROBE}-0", "password": probe_password},
            protocol=mqtt.MQTTv5,
        )
        await asyncio.sleep(0.2)
        if tap.gateways_seen(PROBE) >= set(procs):
            return
    missing = set(procs) - tap.gateways_seen(PROBE)
    pytest.fail(f"collectors {sorted(missing)} forwarded no probe within 30 s")


def test_shared_subscription_collector_killed_loses_nothing(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    settings = kafka_topics
    creds = enroll(settings, 40)
    leave_creds = enroll(settings, 20, prefix="lv")
    ((_, probe_password),) = enroll(settings, 1, prefix=PROBE)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    gateways = [f"{settings.gateway.id}-{i}" for i in range(COLLECTORS)]
    victim = rng.choice(gateways)
    logs = {gw: tmp_path / f"{gw}.log" for gw in gateways}
    record = tmp_path / "truth.jsonl"
    procs = {gw: start_collector(settings, gw, logs[gw]) for gw in gateways}
    restarted: list[processes.Child] = []

    async def go() -> Run:
        tap = GatewayTap(settings)
        await tap.start()
        try:
            await wait_all_subscribed(settings, tap, probe_password, procs, logs)
            fleet = Fleet(
                creds,
                settings.mqtt.host,
                settings.mqtt.port,
                rate_hz=20.0,
                accel_hz=50,
                duration_s=7.0,
                record_path=record,
                seed=seed % 1000,
            )
            run = asyncio.create_task(fleet.run())
            await asyncio.sleep(rng.uniform(2.0, 3.5))
            assert not run.done(), "the fleet finished before the kill"
            for gw, proc in procs.items():
                assert proc.poll() is None, f"{gw} died by itself:\n{log_tail(logs[gw])}"
            kill_us = time.time_ns() // 1000
            os.killpg(procs[victim].pid, signal.SIGKILL)
            assert procs[victim].wait(10) == -signal.SIGKILL
            assert not run.done(), "the fleet finished before the kill took effect"
            report = await run  # the victim stays down for the rest of the run
            assert report.ok, report.errors
            assert report.reconnects == 0, "a device reconnected: its resends would be dupes"
            sent = sent_reading_ids(record)
            # The survivors drain what they were given; what is left is held for the victim.
            await settle(tap, sent, until_missing=True)
            missing_while_down = sent - tap.ids
            restart_us = time.time_ns() // 1000
            restarted.append(start_collector(settings, victim, logs[victim]))
            for _ in range(300):
                if sent <= tap.ids:
                    break
                if restarted[0].poll() is not None:
                    pytest.fail(f"the restarted {victim} exited:\n{log_tail(logs[victim])}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # late duplicates, if any, land before we count
            records = [r for r in tap.records if r.device.startswith("dev-")]
            ids = set(tap.ids)

            # Retiring it: down again, its share piles up; `--leave` forwards that and ends
            # the session, after which the survivors get everything.
            os.killpg(restarted[0].pid, signal.SIGKILL)
            restarted[0].wait(10)
            sent_2 = await publish(settings, leave_creds[:10], tmp_path / "truth-2.jsonl")
            await settle(tap, sent_2, until_missing=True)
            held = sent_2 - tap.ids
            leave = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "vitalproof", "collect", "--gateway-id", victim, "--leave"],
                env=os.environ | settings.child_env(tmp_path / "leave-secrets"),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert leave.returncode == 0, leave.stderr
            assert "left the share group" in leave.stderr
            assert sent_2 <= tap.ids, f"{len(sent_2 - tap.ids)} held readings not forwarded"
            sent_3 = await publish(settings, leave_creds[10:], tmp_path / "truth-3.jsonl")
            await settle(tap, sent_3, until_missing=False)
            assert sent_3 <= tap.ids, (
                f"{len(sent_3 - tap.ids)} readings held for the session that left"
            )
            return Run(kill_us, restart_us, sent, missing_while_down, records, ids, held, sent_3)
        finally:
            await tap.stop()

    try:
        out = asyncio.run(go())
    finally:
        for p in [*procs.values(), *restarted]:
            processes.stop(p)
    for gw in gateways:
        if gw != victim:  # it ended its own session
            forget_session(settings, gw)
    assert out.held_then_left, "nothing was held for the session before it left"

    kill_us, restart_us, sent, records = out.kill_us, out.restart_us, out.sent, out.records
    missing_while_down = out.missing_while_down
    assert sent, "the fleet sent nothing"

    # Nothing lost.
    lost = sent - out.ids
    assert not lost, f"seed {seed}: {len(lost)} of {len(sent)} readings never reached vitals.raw"

    by_gateway: dict[str, list[Forwarded]] = defaultdict(list)
    for r in records:
        by_gateway[r.gateway].append(r)
    survivors = [gw for gw in gateways if gw != victim]
    for gw in survivors:
        during = [r for r in by_gateway[gw] if kill_us < r.received_us < restart_us]
        assert during, f"survivor {gw} forwarded nothing while {victim} was down"
    before = [r for r in by_gateway[victim] if r.received_us < kill_us]
    after = [r for r in by_gateway[victim] if r.received_us >= restart_us]
    assert before, f"{victim} forwarded nothing before it was killed"
    assert not [r for r in by_gateway[victim] if kill_us <= r.received_us < restart_us]

    # Mosquitto held the dead member's share: missing until it came back, then through it.
    assert missing_while_down, "nothing was held for the killed collector's session"
    after_ids = {i for r in after for i in r.reading_ids}
    assert missing_while_down <= after_ids, (
        f"{len(missing_while_down - after_ids)} held readings came back through another member"
    )

    # Duplicates: only the killed collector's in-flight window, forwarded again after restart.
    copies: dict[str, list[Forwarded]] = defaultdict(list)
    for r in records:
        for i in r.reading_ids:
            copies[i].append(r)
    duplicated = {i: rs for i, rs in copies.items() if len(rs) > 1}
    for rid, rs in duplicated.items():
        assert all(r.gateway == victim for r in rs), (
            f"reading {rid} duplicated by {sorted({r.gateway for r in rs})}: only {victim}'s "
            "in-flight window may be forwarded twice"
        )
        first, *again = sorted(rs, key=lambda r: r.received_us)
        assert first.received_us < kill_us, f"{rid}: first copy after the kill"
        assert all(r.received_us >= restart_us for r in again), f"{rid}: a copy while down"
    dup_messages = {(r.device, r.reading_ids) for rs in duplicated.values() for r in rs}
    print(
        f"seed {seed}: {len(records)} records, {len(sent)} readings; {victim} killed: "
        f"{len(missing_while_down)} readings held for its session, "
        f"{len(after)} records forwarded after its restart, {len(dup_messages)} messages twice; "
        f"{len(out.held_then_left)} readings held when it left, {len(out.after_leave)} after"
    )
    assert len(dup_messages) <= RECEIVE_MAXIMUM, (
        f"{len(dup_messages)} messages forwarded twice: more than one in-flight window"
    )
