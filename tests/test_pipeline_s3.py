"""The whole write path with the lake on a real S3 server (the session's SeaweedFS): fleet
-> Mosquitto -> collector -> Kafka -> `vitalproof worker` sealing into ``s3://`` -> the anchor
job on Anvil -> a proof exported and verified against the chain, every step after the fleet
through the CLI a user would run, with nothing but the settings pointing at S3."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_sims.fleet import Fleet
from device_sims.record import sent_reading_ids
from tests.s3 import s3_lake
from tests.test_pipeline import collector_running, enroll, start_worker, stop
from vitalproof.settings import LakeSettings, Settings

pytestmark = pytest.mark.integration


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", *args],
        env=settings.child_env(settings.paths.home / "secrets") | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _sealed_ids(settings: Settings) -> set[str]:
    """Every reading id the lake holds, read back per patient as `lake stats`/`lake read`."""
    stats = _cli(settings, "lake", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    ids: set[str] = set()
    for p in json.loads(stats.stdout)["by_patient"]:
        read = _cli(settings, "lake", "read", "--patient", p["patient_id"], "--format", "json")
        assert read.returncode == 0, read.stderr
        ids.update(json.loads(line)["reading_id"] for line in read.stdout.splitlines())
    return ids


def test_fleet_to_an_s3_lake_anchored_and_proven_through_the_cli(
    kafka_topics: Settings, seaweedfs_lake: LakeSettings, anvil_rpc_url: str, tmp_path: Path
) -> None:
    settings = kafka_topics.evolve(
        lake=s3_lake(seaweedfs_lake).model_dump(),
        chain={"kind": "anvil", "rpc_url": anvil_rpc_url},
        batching={"max_age_s": 1.5},
    )
    assert settings.lake_uri.startswith("s3://")
    creds = enroll(settings, 6)
    record = tmp_path / "truth.jsonl"
    worker = start_worker(settings, tmp_path / "worker.log")
    try:

        async def go() -> None:
            async with collector_running(settings):
                fleet = Fleet(
                    creds, settings.mqtt.host, settings.mqtt.port, rate_hz=2.0,
                    duration_s=3.0, record_path=record, seed=11,
                )  # fmt: skip
                report = await fleet.run()
                assert report.ok, report.errors

        asyncio.run(go())
        sent = sent_reading_ids(record)
        assert len(sent) > 20, "the fleet sent too little to prove anything"
        deadline, sealed = time.monotonic() + 90, set[str]()
        while time.monotonic() < deadline and not sent <= sealed:
            time.sleep(1.0)
            sealed = _sealed_ids(settings)
    finally:
        stop(worker)
    assert sent <= sealed, f"{len(sent - sealed)} of {len(sent)} readings not in the S3 lake"
    assert sealed <= sent, "the lake holds readings the fleet never sent"
    assert not any(settings.paths.home.glob("lake/**/*.parquet")), "sealed to disk, not to S3"

    anchored = _cli(settings, "anchor", "run", "--once")
    assert anchored.returncode == 0, anchored.stderr
    for reading in sorted(sealed)[:2]:
        bundle = tmp_path / f"{reading}.json"
        export = _cli(settings, "proof", "export", "--reading", reading, "-o", str(bundle))
        assert export.returncode == 0, export.stderr
        verified = _cli(settings, "verify", str(bundle), "--rpc", anvil_rpc_url)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "on chain" in verified.stdout, verified.stdout
    # a tampered bundle fails against the same chain, with the reason
    doc = json.loads(bundle.read_text())
    doc["reading"]["value"] = float(doc["reading"]["value"]) + 1
    bundle.write_text(json.dumps(doc))
    tampered = _cli(settings, "verify", str(bundle), "--rpc", anvil_rpc_url)
    assert tampered.returncode != 0
    assert "wrong leaf" in tampered.stdout + tampered.stderr, tampered.stdout + tampered.stderr
