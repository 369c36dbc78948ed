"""anchor.chain: deploy, submit, read back, and the verifier's on-chain check, on the embedded
py-evm chain and on a real JSON-RPC node (Anvil started by this module)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anchor.chain import ANVIL_CHAIN_ID, AnchorReceipt, Chain, FeePolicy, Fees, compute_fees
from anchor.errors import AnchorError
from vitalproof.devstack.procs import free_ports
from vitalproof.errors import ConfigError
from vitalproof.settings import ChainSettings, Settings
from vitalproof_verify.errors import ProofError, ProofFailure
from vitalproof_verify.onchain import check_anchor_on_chain, rpc_web3

REPO = Path(__file__).resolve().parent.parent
ANVIL = REPO / "node_modules" / ".bin" / "anvil"


def _root(i: int) -> bytes:
    return bytes([i % 256]) * 31 + b"\x01"


# -- Anvil (own fixture until a shared one replaces it) -----------------------------------


def start_anvil(*extra: str) -> tuple[subprocess.Popen[bytes], str, Any]:
    """Start Anvil on a free port; fail (never skip) if it does not answer eth_chainId."""
    if not ANVIL.exists():
        pytest.fail(f"{ANVIL} missing: run `npm ci` in {REPO}")
    (port,) = free_ports(1)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop_anvil()
    cmd = [str(ANVIL), "--port", str(port), "--host", "127.0.0.1", "--silent", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"anvil exited with {proc.returncode}: {log.read().decode()[-2000:]}")
        try:
            rpc_web3(url, timeout_s=1).eth.chain_id  # noqa: B018 - the call is the probe
            return proc, url, log
        except Exception:
            pass
        if time.monotonic() > deadline:
            stop_anvil(proc, log)
            pytest.fail(f"anvil on {url} did not answer eth_chainId within 30 s")
        time.sleep(0.1)


def stop_anvil(proc: subprocess.Popen[bytes], log: Any) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    proc, url, log = start_anvil()
    try:
        yield url
    finally:
        stop_anvil(proc, log)


# -- embedded chain -------------------------------------------------------------------------


@pytest.fixture
def chain() -> Chain:
    c = Chain.embedded()
    c.deploy()
    return c


def _fields(r: AnchorReceipt) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d.pop("gas_used")
    return d


def test_embedded_chain_signs_locally_with_a_funded_dev_key() -> None:
    c = Chain.embedded()
    assert c.address == c.w3.eth.accounts[0]
    assert c.w3.eth.get_balance(c.address) > 10**18
    assert c.chain_id == c.w3.eth.chain_id


def test_submit_anchor_returns_a_receipt_that_verifies(chain: Chain) -> None:
    r = chain.submit_anchor(_root(1), 42)
    assert r.chain_id == chain.chain_id
    assert r.contract == chain.contract_address
    assert (r.root, r.tree_size) == (_root(1), 42)
    assert r.block_timestamp == chain.w3.eth.get_block(r.block_number)["timestamp"]
    assert r.gas_used > 21_000
    check_anchor_on_chain(chain.w3, **_fields(r))
    # JSON round trip, as a proof bundle stores it.
    assert AnchorReceipt.from_json_dict(json.loads(json.dumps(r.to_json_dict()))) == r


def test_at_attaches_to_a_deployed_contract_and_refuses_an_empty_address(chain: Chain) -> None:
    other = Chain(chain.w3, chain.account, tester=chain.tester)
    other.at(chain.contract_address)
    other.submit_anchor(_root(2), 1)
    assert chain.head().tree_size == 1
    with pytest.raises(ConfigError, match="no contract code"):
        other.at("0x" + "12" * 20)
    with pytest.raises(ConfigError, match="deploy"):
        Chain.embedded().contract  # noqa: B018


def test_wrong_chain(chain: Chain) -> None:
    r = chain.submit_anchor(_root(1), 1)
    with pytest.raises(ProofError) as e:
        check_anchor_on_chain(chain.w3, **{**_fields(r), "chain_id": r.chain_id + 1})
    assert e.value.failure is ProofFailure.WRONG_CHAIN


@pytest.mark.parametrize(
    "change",
    [
        {"tx_hash": "0x" + "ab" * 32},
        {"block_hash": "0x" + "cd" * 32},
        {"block_number": 10_000},
    ],
    ids=["unknown-tx", "other-block-hash", "missing-block"],
)
def test_reorged_out_on_mismatch(chain: Chain, change: dict[str, Any]) -> None:
    r = chain.submit_anchor(_root(1), 1)
    with pytest.raises(ProofError) as e:
        check_anchor_on_chain(chain.w3, **{**_fields(r), **change})
    assert e.value.failure is ProofFailure.REORGED_OUT


@pytest.mark.parametrize(
    "change",
    [
        {"root": _root(9)},
        {"tree_size": 2},
        {"log_index": 1},
        {"contract": "0x" + "12" * 20},
        {"block_timestamp": 1},
    ],
    ids=["root", "size", "log-index", "contract", "timestamp"],
)
def test_root_not_on_chain_on_mismatch(chain: Chain, change: dict[str, Any]) -> None:
    r = chain.submit_anchor(_root(1), 1)
    with pytest.raises(ProofError) as e:
        check_anchor_on_chain(chain.w3, **{**_fields(r), **change})
    assert e.value.failure is ProofFailure.ROOT_NOT_ON_CHAIN


def test_a_real_reorg_is_reported_as_reorged_out(chain: Chain) -> None:
    assert chain.tester is not None
    snapshot = chain.tester.take_snapshot()
    r = chain.submit_anchor(_root(1), 1)
    chain.check(r)
    chain.tester.revert_to_snapshot(snapshot)
    chain.mine(3)  # the canonical chain now has other blocks at that height
    with pytest.raises(ProofError) as e:
        chain.check(r)
    assert e.value.failure is ProofFailure.REORGED_OUT


def test_fee_policy_caps_and_refuses_a_cap_below_base_fee(chain: Chain) -> None:
    fees = compute_fees(chain.w3, FeePolicy(priority_fee_wei=7))
    base = chain.w3.eth.get_block("latest")["baseFeePerGas"]
    assert fees == Fees(max_fee_per_gas=2 * base + 7, max_priority_fee_per_gas=7)
    capped = compute_fees(chain.w3, FeePolicy(max_fee_cap_wei=base + 1, priority_fee_wei=7))
    assert capped.max_fee_per_gas == base + 1
    with pytest.raises(AnchorError, match="below the current base fee"):
        compute_fees(chain.w3, FeePolicy(max_fee_cap_wei=base - 1))
    bumped = fees.bumped()
    assert bumped.max_fee_per_gas * 8 >= fees.max_fee_per_gas * 9
    assert bumped.max_priority_fee_per_gas * 8 >= fees.max_priority_fee_per_gas * 9


def test_from_settings() -> None:
    assert Chain.from_settings(Settings(chain=ChainSettings(kind="embedded"))).tester is not None
    with pytest.raises(ConfigError, match="RPC_URL"):
        Chain.from_settings(Settings(chain=ChainSettings(kind="rpc")))
    with pytest.raises(ConfigError, match="SUBMITTER_KEY"):
        Chain.from_settings(Settings(chain=ChainSettings(kind="rpc", rpc_url="http://127.0.0.1:1")))


# -- Anvil ----------------------------------------------------------------------------------


@pytest.mark.anvil
def test_anvil_anchor_verifies_through_a_bare_rpc_endpoint(anvil_url: str) -> None:
    c = Chain.rpc(anvil_url)  # no key: Anvil's public dev key (chain 31337 only)
    assert c.chain_id == ANVIL_CHAIN_ID
    c.deploy()
    c.submit_anchor(_root(1), 1)
    r = c.submit_anchor(_root(2), 2)
    # The verifier has nothing but the URL and the receipt fields.
    check_anchor_on_chain(rpc_web3(anvil_url), **_fields(r))
    with pytest.raises(ProofError) as e:
        check_anchor_on_chain(rpc_web3(anvil_url), **{**_fields(r), "root": _root(1)})
    assert e.value.failure is ProofFailure.ROOT_NOT_ON_CHAIN


@pytest.mark.anvil
def test_anvil_reorg_is_reported(anvil_url: str) -> None:
    c = Chain.rpc(anvil_url)
    c.deploy()
    snap = c.w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
    r = c.submit_anchor(_root(3), 1)
    c.check(r)
    assert c.w3.provider.make_request("evm_revert", [snap])["result"] is True  # type: ignore[arg-type]
    c.mine(2)
    with pytest.raises(ProofError) as e:
        check_anchor_on_chain(rpc_web3(anvil_url), **_fields(r))
    assert e.value.failure is ProofFailure.REORGED_OUT


@pytest.mark.anvil
def test_rpc_without_key_refuses_a_non_anvil_chain_id() -> None:
    proc, url, log = start_anvil("--chain-id", "4242")
    try:
        with pytest.raises(ConfigError, match="not a local Anvil"):
            Chain.rpc(url)
    finally:
        stop_anvil(proc, log)
