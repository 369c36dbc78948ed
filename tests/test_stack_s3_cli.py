"""`vitalproof stack up --s3` as a user runs it: its own home and ports, the real SeaweedFS.

The CLI starts Kafka, Mosquitto and SeaweedFS, says where the lake is, reports the server in
`stack status`; a batch sealed into that lake with the keys `stack up` wrote is what
`vitalproof lake stats` counts there; `stack down` stops it all. The weed binary is the one
`vitalproof stack fetch --s3` builds (cached); without it this test fails, loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from streams.lake.keystore import LocalKeystore
from streams.lake.storage import open_lake
from streams.sealer import Pending, Sealer
from tests.test_partition_memory import _batch
from vitalproof.devstack import seaweedfs
from vitalproof.devstack.procs import free_ports
from vitalproof.settings import (
    DevStackSettings,
    KafkaSettings,
    LakeSettings,
    MqttSettings,
    PathSettings,
    Settings,
)

pytestmark = pytest.mark.integration


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


@pytest.mark.timeout(240)
def test_stack_up_s3_serves_a_lake_that_the_cli_seals_into_and_counts(tmp_path: Path) -> None:
    weed = seaweedfs.weed_path()
    if not weed.exists():
        pytest.fail(f"no weed binary at {weed}: run `vitalproof stack fetch --s3` first")
    kafka_port, controller_port, mqtt_port, s3_port = free_ports(4)
    settings = Settings(
        paths=PathSettings(home=tmp_path / "home"),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{kafka_port}"),
        devstack=DevStackSettings(
            kafka_controller_port=controller_port, kafka_heap="384m", s3_port=s3_port
        ),
        mqtt=MqttSettings(port=mqtt_port, collector_password=SecretStr("collector-s3-test")),
    )
    secrets_dir = settings.paths.home / "secrets"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALPROOF_")}
    env |= settings.child_env(secrets_dir)
    uri, endpoint = seaweedfs.lake_uri(settings), seaweedfs.endpoint(settings)
    try:
        up = _cli(env, "stack", "up", "--s3")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"VITALPROOF_LAKE={uri} VITALPROOF_S3_ENDPOINT={endpoint}" in up.stdout, up.stdout
        status = _cli(env, "stack", "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        parts = json.loads(status.stdout)["parts"]
        assert parts["seaweedfs"]["healthy"], parts
        assert parts["seaweedfs"]["address"] == f"127.0.0.1:{s3_port}"

        # The keys `stack up` generated, in the secrets folder every process reads.
        keys = {
            f: (secrets_dir / LakeSettings.env_name(f)).read_text().strip()
            for f in ("s3_access_key", "s3_secret_key")
        }
        on_s3 = settings.evolve(lake={"root": uri, "s3_endpoint": endpoint, **keys})
        lake_env = env | {
            LakeSettings.env_name("root"): uri,
            LakeSettings.env_name("s3_endpoint"): endpoint,
        }
        sealer = Sealer(open_lake(on_s3), LocalKeystore(on_s3.paths.keys_dir))
        sealed = sealer.seal([Pending("t.clean", 0, o, _batch("p-s3", o)) for o in range(5)])
        assert sealed is not None and sealed.rows == 5
        stats = _cli(lake_env, "lake", "stats", "--json")
        assert stats.returncode == 0, stats.stdout + stats.stderr
        doc = json.loads(stats.stdout)
        assert doc["readings"] == 5 and doc["lake"].startswith("s3://"), doc
        assert not list(settings.paths.home.rglob("*.parquet")), "the lake must not be local"
    finally:
        down = _cli(env, "stack", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    after = _cli(env, "stack", "status", "--json")
    parts = json.loads(after.stdout)["parts"]
    assert not any(p["running"] for p in parts.values()), parts
