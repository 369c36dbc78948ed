"""VitalAnchor: the committed artifact is what the source compiles to, the contract enforces
its rules, and a steady-state anchor costs at most 50,000 gas."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from anchor.chain import ARTIFACT_PATH, EVENT_ONLY_CONTRACT, AnchorRejected, Chain, load_artifact

REPO = Path(__file__).resolve().parent.parent
COMPILE = REPO / "anchor" / "contracts" / "compile.mjs"
GAS_TARGET = 50_000


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: the contract build needs Node.js and `npm ci`")
    return node


def _root(i: int) -> bytes:
    """A root with no zero bytes, so calldata costs the maximum (16 gas per byte)."""
    return bytes((i + k) % 255 + 1 for k in range(32))


@pytest.fixture
def chain() -> Chain:
    c = Chain.embedded()
    c.deploy()
    return c


def test_compile_check_passes() -> None:
    proc = subprocess.run(
        [_node(), str(COMPILE), "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_recompiled_bytecode_equals_committed_artifact() -> None:
    proc = subprocess.run(
        [_node(), str(COMPILE), "--stdout"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(proc.stdout)
    committed = json.loads(ARTIFACT_PATH.read_text())
    assert fresh["bytecode"] == committed["bytecode"]
    assert fresh["deployedBytecode"] == committed["deployedBytecode"]
    assert fresh["abi"] == committed["abi"]
    for name, variant in committed["variants"].items():
        assert fresh["variants"][name]["bytecode"] == variant["bytecode"]
    # Deterministic formatting: the text itself is byte-identical.
    assert proc.stdout == ARTIFACT_PATH.read_text()


def test_artifact_records_pinned_compiler_and_settings() -> None:
    art = json.loads(ARTIFACT_PATH.read_text())
    assert art["compiler"]["version"].startswith("0.8.28+")
    settings = art["compiler"]["settings"]
    assert settings["evmVersion"] == "cancun"
    assert settings["optimizer"] == {"enabled": True, "runs": 200}
    assert art["bytecode"].startswith("0x") and len(art["bytecode"]) > 100


def test_non_submitter_is_rejected(chain: Chain) -> None:
    stranger = chain.with_account(chain.dev_key(1))
    with pytest.raises(AnchorRejected, match="NotSubmitter"):
        stranger.submit_anchor(_root(1), 1)


def test_owner_adds_and_removes_submitters(chain: Chain) -> None:
    other = chain.with_account(chain.dev_key(1))
    chain.set_submitter(other.address, True)
    assert other.submit_anchor(_root(1), 1).tree_size == 1
    chain.set_submitter(other.address, False)
    with pytest.raises(AnchorRejected, match="NotSubmitter"):
        other.submit_anchor(_root(2), 2)
    with pytest.raises(AnchorRejected, match="NotOwner"):
        other.set_submitter(other.address, True)


def test_non_growing_size_duplicate_and_zero_root_are_rejected(chain: Chain) -> None:
    chain.submit_anchor(_root(1), 5)
    with pytest.raises(AnchorRejected, match=r"TreeSizeNotGrowing\(5, 5\)"):
        chain.submit_anchor(_root(1), 5)  # exact duplicate
    with pytest.raises(AnchorRejected, match=r"TreeSizeNotGrowing\(5, 5\)"):
        chain.submit_anchor(_root(2), 5)  # same size, other root
    with pytest.raises(AnchorRejected, match=r"TreeSizeNotGrowing\(5, 4\)"):
        chain.submit_anchor(_root(3), 4)  # older head
    with pytest.raises(AnchorRejected, match="ZeroRoot"):
        chain.submit_anchor(bytes(32), 6)


def test_growing_size_is_accepted_and_head_is_latest(chain: Chain) -> None:
    assert chain.head().tree_size == 0
    chain.submit_anchor(_root(1), 1)
    r = chain.submit_anchor(_root(2), 7)
    head = chain.head()
    assert (head.root, head.tree_size) == (_root(2), 7)
    assert head.timestamp == r.block_timestamp
    assert head.block_number == r.block_number
    chain.check(r)


def _steady_gas(chain: Chain, n: int = 5) -> list[int]:
    chain.submit_anchor(_root(0), 1)  # first anchor pays the fresh-slot SSTOREs
    return [chain.submit_anchor(_root(i), i + 1).gas_used for i in range(1, n + 1)]


def test_gas_per_anchor(record_property: pytest.RecordProperty) -> None:
    main = Chain.embedded()
    main.deploy()
    first = main.submit_anchor(_root(100), 1).gas_used
    steady = [main.submit_anchor(_root(i), i + 1).gas_used for i in range(1, 6)]

    event_only = Chain.embedded()
    event_only.deploy(EVENT_ONLY_CONTRACT)
    eo = _steady_gas(event_only)

    figures = {
        "VitalAnchor first anchor": first,
        "VitalAnchor steady state": max(steady),
        "VitalAnchorEventOnly steady state": max(eo),
    }
    for name, gas in figures.items():
        record_property(name, gas)
        print(f"gasUsed {name}: {gas}")
    out = os.environ.get("VITALPROOF_GAS_REPORT")
    if out:
        Path(out).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")

    assert max(steady) <= GAS_TARGET, figures
    assert max(eo) < max(steady), figures


def test_event_only_variant_checks_submitter_only() -> None:
    c = Chain.embedded()
    c.deploy(EVENT_ONLY_CONTRACT)
    c.submit_anchor(_root(1), 3)
    # No ordering on chain: a smaller size is accepted (verifiers must enforce growth).
    assert c.submit_anchor(_root(2), 2).tree_size == 2
    with pytest.raises(AnchorRejected, match="NotSubmitter"):
        c.with_account(c.dev_key(1)).submit_anchor(_root(3), 4)
    assert "head" not in {i.get("name") for i in load_artifact(EVENT_ONLY_CONTRACT)["abi"]}
