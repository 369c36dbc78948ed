"""anchor.txmanager: an anchor lands exactly once across a crash between signing and sending,
survives a reorg that drops its block, and gets a fee bump when stuck (py-evm and Anvil)."""

from __future__ import annotations

import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from hexbytes import HexBytes

from anchor.chain import Chain, FeePolicy
from anchor.errors import AnchorError
from anchor.txmanager import OUTBOX_FILE, OutboxError, TxManager, TxState
from vitalproof.devstack.procs import free_ports
from vitalproof_verify.onchain import ANCHORED_TOPIC, check_anchor_on_chain, rpc_web3

REPO = Path(__file__).resolve().parent.parent
ANVIL = REPO / "node_modules" / ".bin" / "anvil"


def _root(i: int) -> bytes:
    return keccak(text=f"root {i}")


class FakeClock:
    """Wall clock the test moves by hand, to age a pending transaction."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _anchored_logs(chain: Chain) -> list[Any]:
    return list(
        chain.w3.eth.get_logs(
            {
                "address": chain.contract_address,
                "topics": ["0x" + ANCHORED_TOPIC.hex()],
                "fromBlock": 0,
                "toBlock": "latest",
            }
        )
    )


def _nonce(chain: Chain) -> int:
    return int(chain.w3.eth.get_transaction_count(chain.account.address, "latest"))


def _rpc(chain: Chain, method: str, *params: Any) -> Any:
    resp = chain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
    assert "error" not in resp, resp
    return resp["result"]


# -- Anvil (own fixture until a shared one replaces it) -----------------------------------


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    """Anvil on a free port for this module; fails loudly (never skips) if it cannot start."""
    if not ANVIL.exists():
        pytest.fail(f"{ANVIL} missing: run `npm ci` in {REPO}")
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        cmd = [str(ANVIL), "--port", str(port), "--host", "127.0.0.1", "--silent"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"anvil exited {proc.returncode}: {log.read().decode()[-2000:]}")
                try:
                    rpc_web3(url, timeout_s=1).eth.chain_id  # noqa: B018 - the call is the probe
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        pytest.fail(f"anvil on {url} did not answer eth_chainId within 30 s")
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- chains under test ----------------------------------------------------------------------


def _embedded() -> Chain:
    c = Chain.embedded()
    c.deploy()
    return c


def _anvil(url: str) -> Chain:
    c = Chain.rpc(url)
    c.deploy()
    return c


@pytest.fixture(params=["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
def chain(request: pytest.FixtureRequest) -> Chain:
    if request.param == "embedded":
        return _embedded()
    return _anvil(request.getfixturevalue("anvil_url"))


class Reorg:
    """Drop the blocks mined since ``take()``: eth-tester snapshots or Anvil evm_snapshot."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.snap: Any = None

    def take(self) -> None:
        if self.chain.tester is not None:
            self.snap = self.chain.tester.take_snapshot()
        else:
            self.snap = _rpc(self.chain, "evm_snapshot")

    def drop(self, then_mine: int = 2) -> None:
        """Revert, then mine other blocks so the old ones are gone from the canonical chain."""
        if self.chain.tester is not None:
            self.chain.tester.revert_to_snapshot(self.snap)
        else:
            assert _rpc(self.chain, "evm_revert", self.snap) is True
        self.chain.mine(then_mine)


# -- tests ----------------------------------------------------------------------------------


def test_crash_between_sign_and_send_rebroadcasts_the_same_tx(chain: Chain, tmp_path: Path) -> None:
    before = _nonce(chain)
    mgr = TxManager(chain, tmp_path, confirmations=3)
    entry = mgr.prepare(_root(1), 1)
    assert entry.state is TxState.PENDING and entry.nonce == before
    # Persisted before any send: the outbox holds the exact signed bytes and its nonce.
    with sqlite3.connect(tmp_path / OUTBOX_FILE) as db:
        raw, nonce = db.execute(
            "SELECT raw, nonce FROM attempts WHERE tx_hash = ?", (entry.tx_hash,)
        ).fetchone()
    assert "0x" + keccak(HexBytes(raw)).hex() == entry.tx_hash and nonce == before
    mgr.close()
    del mgr  # "crash": the process dies before send_raw_transaction
    assert _nonce(chain) == before  # nothing reached the chain

    restarted = TxManager(chain, tmp_path, confirmations=3)
    restarted.resume()
    chain.mine(3)
    restarted.poll()
    final = restarted.get(entry.id)
    assert final.state is TxState.FINAL
    assert final.tx_hash == entry.tx_hash  # the same signed tx, not a new one
    assert final.attempts == 1
    assert _nonce(chain) == before + 1  # that nonce was used exactly once

    # Asking again, resuming again: no second transaction.
    assert restarted.submit(_root(1), 1).id == entry.id
    restarted.resume()
    assert _nonce(chain) == before + 1
    logs = _anchored_logs(chain)
    assert len(logs) == 1 and bytes(logs[0]["topics"][1]) == _root(1)
    receipt = restarted.receipt(entry.id)
    check_anchor_on_chain(
        rpc_web3(str(chain.w3.provider.endpoint_uri))  # type: ignore[attr-defined]
        if chain.tester is None
        else chain.w3,
        chain_id=receipt.chain_id,
        contract=receipt.contract,
        tx_hash=receipt.tx_hash,
        block_number=receipt.block_number,
        block_hash=receipt.block_hash,
        log_index=receipt.log_index,
        root=receipt.root,
        tree_size=receipt.tree_size,
    )


def test_crash_after_send_before_bookkeeping_does_not_double_send(
    chain: Chain, tmp_path: Path
) -> None:
    before = _nonce(chain)
    mgr = TxManager(chain, tmp_path, confirmations=1)
    entry = mgr.submit(_root(2), 1)  # sent (and, on these chains, mined at once)
    mgr.close()
    restarted = TxManager(chain, tmp_path, confirmations=1)
    restarted.resume()  # re-broadcast of a mined tx is harmless
    restarted.poll()
    assert restarted.get(entry.id).state is TxState.FINAL
    assert _nonce(chain) == before + 1
    assert len(_anchored_logs(chain)) == 1


def test_reorg_resends_the_same_tx_while_its_nonce_is_free(chain: Chain, tmp_path: Path) -> None:
    mgr = TxManager(chain, tmp_path, confirmations=3)
    reorg = Reorg(chain)
    reorg.take()
    entry = mgr.submit(_root(3), 1)
    (included,) = mgr.poll()
    assert included.state is TxState.INCLUDED
    old_receipt = mgr.receipt(entry.id)

    reorg.drop()
    (after,) = mgr.poll()  # notices the tx is gone and re-sends the same signed bytes
    assert after.tx_hash == entry.tx_hash and after.nonce == entry.nonce
    chain.mine(3)
    mgr.poll()
    final = mgr.get(entry.id)
    assert final.state is TxState.FINAL
    assert final.block_hash != old_receipt.block_hash
    assert final.last_error is not None and "reorged out" in final.last_error
    assert len(_anchored_logs(chain)) == 1
    chain.check(mgr.receipt(entry.id))
    assert chain.head().root == _root(3)


def test_reorg_then_nonce_taken_re_anchors_with_a_fresh_tx(chain: Chain, tmp_path: Path) -> None:
    mgr = TxManager(chain, tmp_path, confirmations=2)
    reorg = Reorg(chain)
    reorg.take()
    entry = mgr.submit(_root(4), 1)
    mgr.poll()
    reorg.drop()
    # Another transaction from the same key takes the freed nonce (a 0-value self transfer).
    fees = chain.fees()
    other = chain.build_tx(b"", to=chain.address, nonce=entry.nonce, gas=21_000, fees=fees)
    signed = Account.from_key(chain.account.key).sign_transaction(dict(other))
    chain.w3.eth.send_raw_transaction(signed.raw_transaction)
    chain.mine(1)

    (after,) = mgr.poll()
    assert after.state is TxState.PENDING
    assert after.nonce > entry.nonce and after.tx_hash != entry.tx_hash
    assert after.attempts == 2
    chain.mine(2)
    mgr.poll()
    assert mgr.get(entry.id).state is TxState.FINAL
    assert chain.head().root == _root(4)
    assert len(_anchored_logs(chain)) == 1


def test_reorg_superseded_by_a_larger_anchor(chain: Chain, tmp_path: Path) -> None:
    mgr = TxManager(chain, tmp_path, confirmations=2)
    reorg = Reorg(chain)
    reorg.take()
    mgr.submit(_root(5), 1)
    mgr.poll()
    reorg.drop()
    chain.submit_anchor(_root(6), 2)  # takes the nonce, with a larger tree
    (after,) = mgr.poll()
    assert after.state is TxState.SUPERSEDED
    assert after.last_error is not None and "TreeSizeNotGrowing" in after.last_error


def test_outbox_refuses_another_contract(tmp_path: Path) -> None:
    c = _embedded()
    TxManager(c, tmp_path).close()
    c.deploy()  # a second contract on the same chain
    with pytest.raises(OutboxError, match="contract"):
        TxManager(c, tmp_path)


def test_fee_cap_below_base_fee_refuses_to_sign(tmp_path: Path) -> None:
    c = _embedded()
    c.fee_policy = FeePolicy(max_fee_cap_wei=1)
    mgr = TxManager(c, tmp_path)
    with pytest.raises(AnchorError, match="below the current base fee"):
        mgr.submit(_root(7), 1)
    assert mgr.entries() == []


def test_submit_many_in_order(tmp_path: Path) -> None:
    c = _embedded()
    mgr = TxManager(c, tmp_path, confirmations=1)
    ids = [mgr.submit(_root(10 + i), i + 1).id for i in range(4)]
    mgr.poll()
    assert [mgr.get(i).state for i in ids] == [TxState.FINAL] * 4
    n0 = mgr.get(ids[0]).nonce
    assert [mgr.get(i).nonce for i in ids] == [n0 + k for k in range(4)]
    assert c.head().tree_size == 4


@pytest.mark.anvil
def test_anvil_fee_bump_replaces_a_stuck_tx(anvil_url: str, tmp_path: Path) -> None:
    c = _anvil(anvil_url)
    clock = FakeClock()
    mgr = TxManager(c, tmp_path, confirmations=1, bump_after_s=60, clock=clock)
    _rpc(c, "evm_setAutomine", False)
    try:
        entry = mgr.submit(_root(20), 1)
        (still,) = mgr.poll()
        assert still.state is TxState.PENDING and still.attempts == 1

        clock.now += 61
        (bumped,) = mgr.poll()
        assert bumped.attempts == 2 and bumped.nonce == entry.nonce
        assert bumped.tx_hash != entry.tx_hash
        new_tx = c.w3.eth.get_transaction(HexBytes(bumped.tx_hash))
        first = mgr.outbox.attempt(entry.tx_hash).fees
        assert new_tx["maxPriorityFeePerGas"] * 8 >= first.max_priority_fee_per_gas * 9
        assert new_tx["maxFeePerGas"] * 8 >= first.max_fee_per_gas * 9

        _rpc(c, "evm_mine")
        (included,) = mgr.poll()
        assert included.state is TxState.FINAL
        assert included.tx_hash == bumped.tx_hash
        assert len(_anchored_logs(c)) == 1
    finally:
        _rpc(c, "evm_setAutomine", True)
