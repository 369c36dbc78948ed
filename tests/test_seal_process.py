"""The sealer's child process, for real: it seals what an in-process Sealer would, reports
undecodable records, remembers what it sealed, and its death and the worker's are tied (a
child killed mid-run is an error the worker sees; a worker killed takes the child with it)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streams.lake.keystore import LocalKeystore
from streams.lake.layout import BATCHES_DIR
from streams.lake.storage import open_uri
from streams.seal_process import (
    CleanRecord,
    SealOutcome,
    SealProcess,
    SealProcessDied,
    decode_records,
    seal_records,
)
from streams.sealer import Pending, Sealer, unproduced
from tests.s3 import s3_lake
from vitalproof.durable import write_atomic
from vitalproof.manifest import BatchManifest
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import LakeSettings
from vitalproof.wire import clean


def batch(device: str, patient: str, n: int, seq0: int = 0) -> SampleBatch:
    b = SampleBatch(device_id=device)
    t = 1_800_000_000_000_000
    for i in range(n):
        b.add("heart_rate", "/min", t + (seq0 + i) * 1_000_000, seq0 + i, 60.0 + i % 7)
    b.patient_id = patient
    b.receive_time_us = t
    b.transport = Transport.MQTT
    b.fill_reading_ids()
    return b


def records() -> list[CleanRecord]:
    return [
        ("vitals.clean", 0, 10, clean.encode_bundle([batch("dev-1", "pat-1", 50)])),
        ("vitals.clean", 0, 11, b"\x00not a clean record"),
        ("vitals.clean", 1, 3, clean.encode_bundle([batch("dev-2", "pat-2", 30)])),
    ]


def test_the_child_seals_like_the_sealer_and_reports_what_it_could_not_decode(
    tmp_path: Path,
) -> None:
    lake_dir, keys_dir = tmp_path / "lake", tmp_path / "keys"
    proc = SealProcess(lake_dir, keys_dir)
    proc.start()

    async def go() -> tuple[SealOutcome, SealOutcome]:
        await proc.ready()
        first = await proc.seal(records())
        again = await proc.seal(records())  # a redelivery after a crash: the ledger skips it
        return first, again

    try:
        first, again = asyncio.run(go())
    finally:
        proc.close()
    assert [i for i, _ in first.rejected] == [1] and first.rejected[0][1]
    assert first.rows == 80 and first.files == 2
    path = lake_dir / BATCHES_DIR / f"{first.batch_id}.json"
    assert first.manifest_json is not None and path.read_bytes() == first.manifest_json
    manifest = BatchManifest.model_validate_json(first.manifest_json)
    assert manifest.rows == 80
    assert [(c.partition, c.first, c.last) for c in manifest.covers] == [(0, 10, 10), (1, 3, 3)]
    assert again.batch_id is None and again.rows == 0 and again.rejected == first.rejected
    # Not produced yet: the worker's outbox holds it, and finds it without a Sealer.
    assert [m.batch_id for m in unproduced(lake_dir / BATCHES_DIR)] == [first.batch_id]

    # A Sealer in this process, on a fresh lake, makes the same batch (same id and root).
    items, _ = decode_records(records())
    assert len(items) == 2 and all(isinstance(p, Pending) for p in items)
    local = seal_records(Sealer(tmp_path / "lake2", LocalKeystore(keys_dir)), records())
    local_manifest = BatchManifest.model_validate_json(local.manifest_json or b"")
    assert local.batch_id == first.batch_id
    assert local_manifest.merkle_root == manifest.merkle_root


def test_a_killed_child_is_an_error_with_its_exit_status(tmp_path: Path) -> None:
    proc = SealProcess(tmp_path / "lake", tmp_path / "keys")
    proc.start()

    async def go() -> None:
        await proc.ready()
        assert proc._proc is not None
        os.kill(proc._proc.pid, signal.SIGKILL)
        await proc.seal(records())

    try:
        with pytest.raises(SealProcessDied) as died:
            asyncio.run(go())
    finally:
        proc.close()
    assert died.value.returncode == -signal.SIGKILL


def test_the_child_dies_with_the_worker(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from pathlib import Path
        from streams.seal_process import SealProcess
        p = SealProcess(Path({str(tmp_path / "lake")!r}), Path({str(tmp_path / "keys")!r}))
        p.start()
        asyncio.run(p.ready())
        print(p._proc.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the seal process outlived the worker"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.mark.parametrize(("returncode", "expected"), [(-signal.SIGKILL, -signal.SIGKILL), (3, 3)])
def test_the_worker_ends_the_way_its_child_did(returncode: int, expected: int) -> None:
    code = f"from streams.seal_process import exit_like; exit_like({returncode})"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == expected


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_child_seals_into_a_lake_on_s3(
    seaweedfs_lake: LakeSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``VITALPROOF_LAKE=s3://...``: the worker hands the child the URI, the child reaches S3
    as its environment and secrets folder say (the worker's), and the outbox reads the bucket."""
    lake_s3 = s3_lake(seaweedfs_lake)
    assert lake_s3.root and lake_s3.s3_endpoint and lake_s3.s3_access_key and lake_s3.s3_secret_key
    secrets = tmp_path / "secrets"
    for var, secret in (
        ("VITALPROOF_S3_ACCESS_KEY", lake_s3.s3_access_key),
        ("VITALPROOF_S3_SECRET_KEY", lake_s3.s3_secret_key),
    ):
        write_atomic(secrets / var, secret.get_secret_value().encode(), mode=0o600)
    monkeypatch.setenv("VITALPROOF_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("VITALPROOF_S3_ENDPOINT", lake_s3.s3_endpoint)
    uri = f"{lake_s3.root}/default"
    proc = SealProcess(uri, tmp_path / "keys")
    proc.start()

    async def go() -> SealOutcome:
        await proc.ready()
        return await proc.seal(records())

    try:
        first = asyncio.run(go())
    finally:
        proc.close()
    assert first.rows == 80 and first.files == 2 and first.manifest_json is not None
    root = open_uri(lake_s3, uri)
    assert root.read(f"{BATCHES_DIR}/{first.batch_id}.json") == first.manifest_json
    assert [m.batch_id for m in unproduced(root.child(BATCHES_DIR))] == [first.batch_id]
    assert len(root.files()) == 2
