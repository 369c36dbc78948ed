"""A full lake disk, for real (a small tmpfs filled to the last page): the seal process
waits it out instead of exiting. One line says what, where and how many bytes are free;
no manifest (the commit point) appears while the disk is full, so no reader sees a partial
batch and the worker acks nothing; once space is back the same batch is sealed whole."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.lake.layout import BATCHES_DIR
from streams.seal_process import SealProcess
from tests.test_seal_process import records
from vitalproof.manifest import BatchManifest

pytestmark = pytest.mark.integration  # a real filesystem of its own: mount, as root


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own (the drill's ``disk-full`` does the same to the lake)."""
    path = tmp_path / "lake"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:  # the disk-full drill needs the same: fail, never skip
        pytest.fail(f"cannot mount a tmpfs (root needed): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses more (ENOSPC): nothing is left."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == 28, e
    return filler


def test_the_seal_process_waits_for_space_and_then_seals_the_batch_whole(
    small_disk: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("VITALPROOF_RETRY_MIN_S", "0.1")
    monkeypatch.setenv("VITALPROOF_RETRY_MAX_S", "0.4")
    proc = SealProcess(small_disk, tmp_path / "keys")
    proc.start()
    batches = small_disk / BATCHES_DIR

    async def go() -> BatchManifest:
        await proc.ready()
        filler = fill(small_disk)
        await proc.submit(records())
        await asyncio.sleep(2.0)  # ~8 tries at 0.1-0.4 s
        assert proc._proc is not None and proc._proc.poll() is None, "the seal process exited"
        assert not list(batches.glob("*.json")), "a manifest appeared on a full disk"
        filler.unlink()
        outcome = await asyncio.wait_for(proc.outcome(), 30)
        assert outcome.batch_id is not None and outcome.manifest_json is not None
        return BatchManifest.model_validate_json(outcome.manifest_json)

    try:
        manifest = asyncio.run(go())
    finally:
        proc.close()
    assert manifest.rows == 80
    for f in manifest.files:  # whole: every file the manifest names, with its digest
        assert hashlib.sha256((small_disk / f.path).read_bytes()).hexdigest() == f.sha256
    assert not list(small_disk.rglob(".*.tmp")), "temp files left behind"
    err = capfd.readouterr().err
    waits = [ln for ln in err.splitlines() if "lake disk" in ln]
    assert len(waits) == 2, err  # one when it filled, one when it was back: not one per try
    assert "No space left on device" in waits[0] and "bytes free" in waits[0], waits[0]
    assert str(small_disk) in waits[0] and "retrying with backoff" in waits[0]
    assert "back after" in waits[1], waits[1]
    assert "Traceback" not in err
