"""The proof kit installs alone: a fresh virtual environment with only ``pip install ./verifier``
checks a bundle the real pipeline made (sealed, logged, anchored on Anvil), offline and
against the chain, and names the check a tampered copy fails.

The environment is built once per session from PyPI (web3 and its dependencies; nothing of
the pipeline), outside this repository's own virtual environment, and the kit is run as a
person would run it: the ``vitalproof-verify`` console script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from anchor.job import AnchorJob
from clinic.proofs import LakeView
from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000_000_000
#: Distributions the pipeline needs and a verifier must not: pip names, lowercased.
PIPELINE_ONLY = {
    "pyarrow",
    "faust-streaming",
    "aiokafka",
    "pydantic-settings",
    "py-evm",
    "eth-tester",
    "numpy",
    "paho-mqtt",
    "bleak",
    "cryptography",
    "vitalproof",
}


@pytest.fixture(scope="session")
def kit_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding the kit and what pip resolves for it, nothing else."""
    root = tmp_path_factory.mktemp("kit-venv")
    venv.create(root, with_pip=True, clear=True)
    python = root / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         str(REPO / "verifier")],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    if install.returncode != 0:
        pytest.fail(f"pip install ./verifier failed:\n{install.stderr[-3000:]}", pytrace=False)
    return root


def _run(env: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(env / "bin" / "vitalproof-verify"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=env,  # not the repository: nothing of it may be importable by accident
    )


@pytest.fixture
def pipeline_bundle(anvil_settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """One reading's bundle from a batch the sealer sealed and the anchor job anchored."""
    batch = SampleBatch(
        device_id="dev-kit-1",
        patient_id="pt-kit-1",
        gateway_id="gw",
        transport=Transport.MQTT,
        receive_time_us=T0,
    )
    for i in range(20):
        batch.add("heart_rate", "/min", T0 + i * 1_000_000, i, float(60 + i))
    batch.fill_reading_ids()
    kms = LocalKeystore(anvil_settings.paths.keys_dir)
    manifest = Sealer(anvil_settings.lake_dir, kms).seal(
        [Pending(anvil_settings.kafka.topic_clean, 0, 0, batch)]
    )
    assert manifest is not None
    job = AnchorJob.from_settings(anvil_settings)
    try:
        job.add_manifest(manifest.to_json_bytes())
        assert job.anchor_once() is not None
    finally:
        job.close()
    bundle = LakeView(anvil_settings).bundle(batch.reading_id[7])
    path = tmp_path / "bundle.json"
    path.write_bytes(bundle.to_json())
    yield path


def test_the_kit_installs_without_the_pipeline(kit_env: Path) -> None:
    listed = subprocess.run(
        [str(kit_env / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "vitalproof-verify" in names and "web3" in names
    assert not names & PIPELINE_ONLY, f"the kit pulled in {sorted(names & PIPELINE_ONLY)}"


def test_the_kit_verifies_a_pipeline_bundle_offline_and_on_anvil(
    kit_env: Path, pipeline_bundle: Path, anvil_rpc_url: str
) -> None:
    offline = _run(kit_env, str(pipeline_bundle))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.startswith(f"OK {pipeline_bundle}: reading ")
    assert "offline only" in offline.stdout
    onchain = _run(kit_env, str(pipeline_bundle), "--rpc", anvil_rpc_url, "--json")
    assert onchain.returncode == 0, onchain.stderr
    verdict = json.loads(onchain.stdout)
    assert verdict["ok"] and verdict["onchain"] and verdict["chain_id"] == 31337

    # The pipeline's own command says the same about the same file.
    ours = subprocess.run(
        [sys.executable, "-m", "vitalproof", "verify", str(pipeline_bundle), "--rpc",
         anvil_rpc_url],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    kit_line = _run(kit_env, str(pipeline_bundle), "--rpc", anvil_rpc_url).stdout
    assert ours.stdout == kit_line


@pytest.mark.parametrize(
    ("tamper", "failure"),
    [
        (lambda d: d["reading"].update(value=d["reading"]["value"] + 1), "wrong leaf"),
        (
            lambda d: d["patient"].update(leaf_index=d["patient"]["leaf_index"] + 1),
            "wrong patient path",
        ),
        (lambda d: d["patient"].update(root="0" * 64), "wrong patient path"),
        (lambda d: d["batch"].update(batch_root="0" * 64), "wrong batch path"),
        (lambda d: d["anchor"].update(tree_size=d["anchor"]["tree_size"] + 1), "root not on chain"),
        (lambda d: d["anchor"].update(chain_id=1), "wrong chain"),
        (lambda d: d.pop("salt"), "malformed bundle"),
    ],
)
def test_a_tampered_bundle_fails_with_its_reason(
    kit_env: Path,
    pipeline_bundle: Path,
    anvil_rpc_url: str,
    tmp_path: Path,
    tamper: object,
    failure: str,
) -> None:
    doc = json.loads(pipeline_bundle.read_text())
    tamper(doc)  # type: ignore[operator]
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(doc))
    out = _run(kit_env, str(bad), "--rpc", anvil_rpc_url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith(f"FAILED {bad}: {failure}: "), out.stderr
    assert out.stdout == ""


def test_the_kit_still_verifies_a_version_1_bundle(kit_env: Path) -> None:
    """Bundles handed out before the two-level tree (version 1) verify as they did."""
    frozen = Path(__file__).parent / "data" / "bundle-v1-75a88b5.json"
    assert json.loads(frozen.read_text())["version"] == 1
    out = _run(kit_env, str(frozen))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"OK {frozen}: reading ")


def test_an_unreachable_endpoint_is_not_a_verdict(kit_env: Path, pipeline_bundle: Path) -> None:
    out = _run(kit_env, str(pipeline_bundle), "--rpc", "http://127.0.0.1:9", "--timeout", "3")
    assert out.returncode == 2
    assert out.stderr.startswith("error: cannot reach the JSON-RPC endpoint http://127.0.0.1:9")
    assert len(out.stderr.strip().splitlines()) == 1
