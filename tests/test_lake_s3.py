"""The lake on S3: the real SeaweedFS of ``stack up --s3`` (the session's ``seaweedfs``).

S3 has no rename, so a batch's commit point is the PUT of its manifest: every object PUT is
visible whole or not at all, readers count only files of batches with a manifest, and a
re-seal after a crash finds the batch's files under their deterministic names and keeps
them. The crash test kills a real sealer (SIGKILL at a crash point) between its data files
and its manifest and checks what every reader sees, then seals again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from clinic.patients import lake_counts
from clinic.proofs import LakeView
from streams import lake
from streams.lake.keystore import LocalKeystore
from streams.lake.storage import open_lake, open_uri
from streams.sealer import Pending, Sealer
from tests.s3 import s3_lake
from vitalproof.cli.namespaces import list_namespaces
from vitalproof.crashpoints import CRASH_EXIT_CODE
from vitalproof.devstack import StackManager
from vitalproof.errors import ConfigError
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import KafkaSettings, LakeSettings, PathSettings, Settings

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000_000_000
PATIENTS = ("pt-1", "pt-2", "pt-3")
PER_PATIENT = 40

#: A sealer in a process of its own, killed at the crash point named by argv[1].
SEAL = """
import sys
from streams.lake.keystore import LocalKeystore
from streams.lake.storage import open_lake
from streams.sealer import Sealer
from tests.test_lake_s3 import pendings
from vitalproof import crashpoints
from vitalproof.settings import Settings

settings = Settings()
crashpoints.arm(sys.argv[1])
Sealer(open_lake(settings), LocalKeystore(settings.paths.keys_dir)).seal(pendings(settings))
"""


def pendings(settings: Settings) -> list[Pending]:
    """The same records every time: one message per patient, offsets 0..2 of partition 0."""
    out = []
    for offset, patient in enumerate(PATIENTS):
        b = SampleBatch(
            device_id=f"dev-{patient}",
            patient_id=patient,
            gateway_id="gw",
            transport=Transport.MQTT,
            receive_time_us=T0,
        )
        for i in range(PER_PATIENT):
            b.add("heart_rate", "/min", T0 + i * 1_000_000, i, float(60 + i % 7))
        b.fill_reading_ids()
        out.append(Pending(settings.kafka.topic_clean, 0, offset, b))
    return out


@pytest.fixture
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings of a home whose lake is local or (``s3``) on the session's SeaweedFS."""
    lake_settings = LakeSettings()
    if request.param == "s3":
        lake_settings = s3_lake(request.getfixturevalue("seaweedfs_lake"))
    return Settings(
        paths=PathSettings(home=tmp_path / "home"),
        kafka=KafkaSettings(topic_prefix="crash."),
        lake=lake_settings,
    )


def _seal_and_crash(settings: Settings, tmp_path: Path, point: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    env |= settings.child_env(tmp_path / "child-secrets")  # the keys as files, not in env
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "verifier")])
    proc = subprocess.run(
        [sys.executable, "-c", SEAL, point],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (-9, CRASH_EXIT_CODE), proc.stderr


@pytest.mark.parametrize(
    ("where", "point"),
    [("s3", "after_files"), ("local", "after_files")],
    indirect=["where"],
)
def test_a_crash_between_data_files_and_manifest_leaves_nothing_visible(
    where: Settings, tmp_path: Path, point: str
) -> None:
    settings = where
    _seal_and_crash(settings, tmp_path, point)
    root = open_lake(settings)
    assert root.local == (settings.lake.root is None)
    kms = LocalKeystore(settings.paths.keys_dir)

    # the dead sealer's data files are there...
    orphans = root.files()
    assert len(orphans) == len(PATIENTS)
    # ...but no manifest, so no reader counts any of it
    assert root.names(".json", "_batches") == []
    sealed = lake.sealed_batch_ids(root)
    assert sealed == set()
    for patient in PATIENTS:
        assert lake.read_patient(root, patient, kms, batches=sealed).num_rows == 0
    stats = lake.lake_stats(root, kms, batches=sealed)
    assert (stats["readings"], stats["files"], stats["batches"]) == (0, 0, 0)
    view = LakeView(settings)
    assert view.manifests() == [] and view.table().num_rows == 0
    assert lake_counts(root) == {}
    restarted = Sealer(root, kms)
    assert restarted.manifests() == [] and restarted.unproduced() == []

    # the restart seals the same records under the same batch id and keeps the files it finds
    before = {i.path: root.read(i.path.removeprefix(root.base + "/")) for i in orphans}
    manifest = restarted.seal(pendings(settings))
    assert manifest is not None
    assert {root.path(f.path) for f in manifest.files} == set(before)
    for f in manifest.files:
        data = before[root.path(f.path)]
        assert data is not None and f.sha256 == hashlib.sha256(data).hexdigest()
    assert lake.sealed_batch_ids(root) == {manifest.batch_id}
    stats = lake.lake_stats(root, kms, batches=lake.sealed_batch_ids(root))
    assert stats["readings"] == stats["distinct_reading_ids"] == len(PATIENTS) * PER_PATIENT
    assert stats["duplicates"] == 0
    assert LakeView(settings).table().num_rows == len(PATIENTS) * PER_PATIENT
    # and the outbox still owes Kafka this manifest
    assert [m.batch_id for m in Sealer(root, kms).unproduced()] == [manifest.batch_id]
    # `vitalproof namespaces` finds it, in the folder or under the S3 prefix
    listed = list_namespaces(settings)
    assert [(n.namespace, n.batches, n.readings) for n in listed] == [
        ("crash", 1, len(PATIENTS) * PER_PATIENT)
    ]


def test_the_server_checks_the_keys(seaweedfs_lake: LakeSettings) -> None:
    """SeaweedFS runs with one identity: a wrong secret is refused, not served anonymously."""
    good = s3_lake(seaweedfs_lake)
    assert good.root is not None
    open_uri(good, good.root).write("probe.txt", b"ok")
    bad = good.model_copy(update={"s3_secret_key": SecretStr("not-the-secret")})
    with pytest.raises(OSError, match=r"(?i)denied|signature|forbidden|invalid"):
        open_uri(bad, good.root).read("probe.txt")


def test_stack_reports_seaweedfs(seaweedfs_server: Settings) -> None:
    status = StackManager(seaweedfs_server).status()
    assert status.seaweedfs is not None and status.seaweedfs.healthy
    assert status.seaweedfs.address == f"127.0.0.1:{seaweedfs_server.devstack.s3_port}"


def test_lake_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = Settings(
        paths=PathSettings(home=tmp_path),
        kafka=KafkaSettings(topic_prefix="ns1."),
        lake=LakeSettings(root="s3://bucket/lake/"),
    )
    assert s3.lake.remote and s3.lake_uri == "s3://bucket/lake/ns1"
    assert s3.lake_base == "s3://bucket/lake"
    local = Settings(paths=PathSettings(home=tmp_path), lake=LakeSettings())
    assert not local.lake.remote and local.lake_uri == str(tmp_path.resolve() / "lake/default")
    monkeypatch.setenv("VITALPROOF_LAKE", "gs://bucket/lake")
    with pytest.raises(ConfigError, match="VITALPROOF_LAKE"):
        LakeSettings.from_env()
    monkeypatch.setenv("VITALPROOF_LAKE", "s3://b")
    monkeypatch.setenv("VITALPROOF_S3_ENDPOINT", "127.0.0.1:8333")
    with pytest.raises(lake.LakeError, match="VITALPROOF_S3_ENDPOINT"):
        open_lake(Settings(paths=PathSettings(home=tmp_path), lake=LakeSettings.from_env()))
