"""Durable anchor transactions: sign, persist, send, confirm, and survive crashes and reorgs.

The rule that makes a crash harmless: a transaction is signed and its raw bytes, hash and
nonce are committed (fsync'd) to the outbox *before* it is sent. After a crash anywhere,
a restart finds the same signed bytes and re-broadcasts them, so the chain sees one
transaction hash per nonce, never two competing anchors. Broadcasting twice is harmless
(the node answers "already known" or the nonce is simply used).

Each anchor moves PENDING -> INCLUDED -> FINAL:

* PENDING: signed and persisted, maybe sent. :meth:`TxManager.poll` re-broadcasts it if
  the node does not know it, and replaces it with >= 12.5% higher fees, same nonce, when it
  has waited longer than ``bump_after_s``.
* INCLUDED: a receipt exists in a canonical block; block number and hash are recorded.
* FINAL: ``confirmations`` blocks deep, with the block hash re-checked at that moment.

If an INCLUDED transaction's block is reorged away and the transaction is no longer on the
chain, it goes back to PENDING and is re-sent: the same signed bytes while its nonce is still
free, otherwise a fresh transaction with a new nonce ("re-anchor"). If the contract's head
has meanwhile reached the same or a larger tree size (a later anchor landed first), the
entry becomes SUPERSEDED: the later root covers this tree (RFC 9162 consistency), and the
contract would refuse a smaller size anyway.

The outbox is SQLite (:mod:`anchor.outbox`: each commit is fsync'd). One manager per
outbox at a time: the anchor job (``anchor.job``, its own process) holds the log's writer
lock while it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from hexbytes import HexBytes
from web3.exceptions import TransactionNotFound, Web3Exception

from anchor.chain import AnchorReceipt, AnchorRejected, Chain, Fees, compute_fees
from anchor.errors import AnchorError
from anchor.outbox import (
    OPEN_STATES,
    OUTBOX_FILE,
    Attempt,
    Outbox,
    OutboxEntry,
    OutboxError,
    TxState,
    hex0x,
)
from vitalproof.crashpoints import crashpoint

log = logging.getLogger(__name__)

_BENIGN_SEND_ERRORS = ("already known", "known transaction", "already imported", "nonce too low")


class TxManager:
    """Anchor transactions for one chain, contract and submitter, persisted in ``outbox_dir``.

    ``confirmations``: blocks (including the inclusion block) before an anchor is FINAL.
    ``bump_after_s``: how long a transaction may stay pending before a fee bump.
    ``clock``: wall-clock seconds; injectable so tests can age a transaction.
    """

    def __init__(
        self,
        chain: Chain,
        outbox_dir: Path | str,
        *,
        confirmations: int = 12,
        bump_after_s: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if confirmations < 1:
            raise AnchorError("confirmations must be >= 1")
        self.chain = chain
        self.confirmations = confirmations
        self.bump_after_s = bump_after_s
        self.clock = clock
        self.outbox = Outbox(
            outbox_dir,
            chain_id=chain.chain_id,
            contract=chain.contract_address,
            account=chain.address,
            clock=lambda: self.clock(),
        )
        self.path = self.outbox.path

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self.outbox.close()

    def __enter__(self) -> TxManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------

    def prepare(self, root: bytes, tree_size: int) -> OutboxEntry:
        """Sign an anchor transaction and persist it, without sending it.

        Idempotent: the same (root, tree_size) returns the existing entry, so an anchor job
        that restarts and asks again does not sign a second transaction.
        """
        existing = self.outbox.find(root, tree_size)
        if existing is not None:
            return existing
        data = self.chain.anchor_calldata(root, tree_size)
        gas = self.chain.estimate_gas(data, self.chain.contract_address)
        fees = compute_fees(self.chain.w3, self.chain.fee_policy)
        nonce = self._next_nonce()
        attempt = self._sign(0, data, nonce, gas, fees)
        anchor_id = self.outbox.add_anchor(root, tree_size, attempt)
        log.info(
            "anchor %d: size %d signed as %s (nonce %d)",
            anchor_id,
            tree_size,
            attempt.tx_hash,
            nonce,
        )
        return self.get(anchor_id)

    def submit(self, root: bytes, tree_size: int) -> OutboxEntry:
        """Sign, persist, then broadcast an anchor; returns its outbox entry (PENDING or
        later). Call :meth:`poll` to follow it to FINAL."""
        entry = self.prepare(root, tree_size)
        crashpoint("anchor_after_sign")  # tests: kill -9 between the fsync'd sign and the send
        if entry.state is TxState.PENDING:
            self._broadcast(entry.id, self._attempt(entry.tx_hash))
        return self.get(entry.id)

    def resume(self) -> list[OutboxEntry]:
        """After a restart: re-broadcast every PENDING transaction exactly as it was signed
        (same bytes, same hash), then advance every open entry."""
        for entry in self.entries(TxState.PENDING):
            self._broadcast(entry.id, self._attempt(entry.tx_hash))
        return self.poll()

    def poll(self) -> list[OutboxEntry]:
        """Advance every open entry one step (see the module docstring); returns them."""
        out = []
        for entry in self.entries(*OPEN_STATES):
            try:
                self._advance(entry)
            except OutboxError:
                raise  # the outbox itself is inconsistent: stop, a person must look
            except (Web3Exception, OSError, AnchorError) as exc:
                # Node unreachable, or fees above the cap right now: keep the entry as it is,
                # record why, and let the next poll try again; other entries still advance.
                self._note(entry.id, f"poll: {exc}")
                log.warning("anchor %d: poll failed: %s", entry.id, exc)
            out.append(self.get(entry.id))
        return out

    def wait_final(
        self, entry_id: int, *, timeout_s: float = 60.0, interval_s: float = 0.2
    ) -> AnchorReceipt:
        """Poll until ``entry_id`` is FINAL and return its receipt (for chains that mine on
        their own; on a dev chain mine blocks between polls instead)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            entry = self.get(entry_id)
            if entry.state is TxState.FINAL:
                return self.receipt(entry_id)
            if entry.state in (TxState.FAILED, TxState.SUPERSEDED):
                raise AnchorError(f"anchor {entry_id} ended {entry.state}: {entry.last_error}")
            if time.monotonic() > deadline:
                raise AnchorError(f"anchor {entry_id} not final after {timeout_s}s ({entry.state})")
            time.sleep(interval_s)

    def receipt(self, entry_id: int) -> AnchorReceipt:
        """The :class:`AnchorReceipt` of an INCLUDED or FINAL anchor (what proofs cite)."""
        entry = self.get(entry_id)
        if entry.state not in (TxState.INCLUDED, TxState.FINAL):
            raise AnchorError(f"anchor {entry_id} is {entry.state}, not on chain yet")
        return self.chain.anchor_receipt(entry.tx_hash)

    def get(self, entry_id: int) -> OutboxEntry:
        return self.outbox.get(entry_id)

    def entries(self, *states: TxState) -> list[OutboxEntry]:
        """Entries in the given states (all when none given), oldest first."""
        return self.outbox.entries(*states)

    def attempt_hashes(self, entry_id: int) -> list[str]:
        """Every transaction hash ever signed for this anchor, oldest first."""
        return self.outbox.attempt_hashes(entry_id)

    # -- state machine ------------------------------------------------------------------

    def _advance(self, entry: OutboxEntry) -> None:
        w3 = self.chain.w3
        found = self._find_receipt(entry.id)
        if found is not None:
            receipt = found
            if receipt["status"] != 1:
                self._settle_refused(
                    entry, f"transaction {hex0x(receipt['transactionHash'])} reverted on chain"
                )
                return
            number = int(receipt["blockNumber"])
            depth = int(w3.eth.block_number) - number + 1
            state = TxState.FINAL if depth >= self.confirmations else TxState.INCLUDED
            self._set(
                entry.id,
                state=state,
                tx_hash=hex0x(receipt["transactionHash"]),
                block_number=number,
                block_hash=hex0x(receipt["blockHash"]),
            )
            if entry.block_hash not in (None, hex0x(receipt["blockHash"])):
                log.warning("anchor %d: moved to block %d after a reorg", entry.id, number)
            return

        if entry.state is TxState.INCLUDED:
            log.warning(
                "anchor %d: block %s reorged away, %s no longer on chain",
                entry.id,
                entry.block_number,
                entry.tx_hash,
            )
            self._set(
                entry.id,
                state=TxState.PENDING,
                block_number=None,
                block_hash=None,
                last_error=f"reorged out of block {entry.block_number}",
            )
            entry = self.get(entry.id)

        mined_nonce = int(w3.eth.get_transaction_count(self.chain.account.address, "latest"))
        if mined_nonce > entry.nonce:
            if self._find_receipt(entry.id) is not None:
                # Ours was mined between the receipt lookup above and the nonce query.
                self._advance(entry)
                return
            # Our nonce was used by a transaction that is none of ours: sign afresh.
            self._reanchor(entry)
            return
        attempt = self._attempt(entry.tx_hash)
        if self.clock() - attempt.signed_at >= self.bump_after_s:
            self._bump(entry, attempt)
        elif not self._node_knows(attempt.tx_hash):
            self._broadcast(entry.id, attempt)

    def _find_receipt(self, entry_id: int) -> Any | None:
        """The canonical receipt of any attempt of this anchor (newest attempt first): after
        a fee bump either the original or the replacement may be the one mined."""
        w3 = self.chain.w3
        for tx_hash in reversed(self.attempt_hashes(entry_id)):
            try:
                receipt = w3.eth.get_transaction_receipt(HexBytes(tx_hash))
            except TransactionNotFound:
                continue
            if receipt is None or receipt.get("blockHash") is None:
                continue
            # Re-check that the receipt's block is the canonical one at that height.
            block = w3.eth.get_block(int(receipt["blockNumber"]))
            if bytes(block["hash"]) == bytes(receipt["blockHash"]):
                return receipt
        return None

    def _reanchor(self, entry: OutboxEntry) -> None:
        """A new transaction with a fresh nonce for an anchor whose nonce was taken."""
        data = self.chain.anchor_calldata(entry.root, entry.tree_size)
        try:
            gas = self.chain.estimate_gas(data, self.chain.contract_address)
        except AnchorRejected as exc:
            self._settle_refused(entry, exc.reason)
            return
        fees = compute_fees(self.chain.w3, self.chain.fee_policy)
        nonce = self._next_nonce()
        attempt = self._sign(entry.id, data, nonce, gas, fees)
        tx_hash = attempt.tx_hash
        self.outbox.add_attempt(
            attempt,
            nonce=nonce,
            tx_hash=tx_hash,
            last_error=f"nonce {entry.nonce} taken by another transaction; re-anchored",
        )
        log.warning(
            "anchor %d: nonce %d taken, re-anchored as %s (nonce %d)",
            entry.id,
            entry.nonce,
            tx_hash,
            nonce,
        )
        self._broadcast(entry.id, self._attempt(tx_hash))

    def _bump(self, entry: OutboxEntry, attempt: Attempt) -> None:
        """Replace a stuck transaction: same nonce and data, fees >= 12.5% higher."""
        policy = self.chain.fee_policy
        bumped = attempt.fees.bumped()
        try:
            fresh = compute_fees(self.chain.w3, policy)
        except AnchorError:
            fresh = bumped
        fees = Fees(
            max_fee_per_gas=max(bumped.max_fee_per_gas, fresh.max_fee_per_gas),
            max_priority_fee_per_gas=max(
                bumped.max_priority_fee_per_gas, fresh.max_priority_fee_per_gas
            ),
        )
        if fees.max_fee_per_gas > policy.max_fee_cap_wei:
            msg = (
                f"fee bump to {fees.max_fee_per_gas} wei would exceed the cap "
                f"{policy.max_fee_cap_wei} wei; waiting"
            )
            self._note(entry.id, msg)
            log.warning("anchor %d: %s", entry.id, msg)
            if not self._node_knows(attempt.tx_hash):
                self._broadcast(entry.id, attempt)
            return
        data = self.chain.anchor_calldata(entry.root, entry.tree_size)
        replacement = self._sign(entry.id, data, attempt.nonce, attempt.gas, fees)
        tx_hash = replacement.tx_hash
        self.outbox.add_attempt(replacement, tx_hash=tx_hash)
        log.info(
            "anchor %d: fee bump %s -> %s (nonce %d)",
            entry.id,
            attempt.tx_hash,
            tx_hash,
            attempt.nonce,
        )
        self._broadcast(entry.id, self._attempt(tx_hash))

    def _settle_refused(self, entry: OutboxEntry, reason: str) -> None:
        """The contract refused (or would refuse) this anchor: superseded or failed."""
        head = self.chain.head()
        if head.tree_size >= entry.tree_size:
            self._set(
                entry.id,
                state=TxState.SUPERSEDED,
                last_error=f"contract head is already at size {head.tree_size}: {reason}",
            )
        else:
            self._set(entry.id, state=TxState.FAILED, last_error=reason)
            log.error("anchor %d failed: %s", entry.id, reason)

    # -- helpers ------------------------------------------------------------------------

    def _next_nonce(self) -> int:
        """The node's pending count, but never below a nonce the outbox already used: a
        signed-but-unsent transaction (crash before send) still owns its nonce."""
        chain_next = int(
            self.chain.w3.eth.get_transaction_count(self.chain.account.address, "pending")
        )
        used = self.outbox.max_nonce()
        return max(chain_next, -1 if used is None else used + 1)

    def _sign(self, anchor_id: int, data: bytes, nonce: int, gas: int, fees: Fees) -> Attempt:
        """A signed transaction, not yet stored (``anchor_id`` 0: a new anchor's first)."""
        tx = self.chain.build_tx(
            data, to=self.chain.contract_address, nonce=nonce, gas=gas, fees=fees
        )
        signed = self.chain.account.sign_transaction(cast(dict[str, Any], tx))
        return Attempt(
            tx_hash=hex0x(bytes(signed.hash)),
            anchor_id=anchor_id,
            nonce=nonce,
            raw=bytes(signed.raw_transaction),
            gas=gas,
            fees=fees,
            signed_at=self.clock(),
        )

    def _attempt(self, tx_hash: str) -> Attempt:
        return self.outbox.attempt(tx_hash)

    def _broadcast(self, anchor_id: int, attempt: Attempt) -> None:
        """Send signed bytes; errors meaning "the node has it / the nonce is used" are fine,
        anything else is recorded on the entry and retried by the next poll."""
        try:
            self.chain.w3.eth.send_raw_transaction(attempt.raw)
        except Exception as exc:  # node errors come in many types across providers
            text = str(exc).lower()
            if any(s in text for s in _BENIGN_SEND_ERRORS) or self._node_knows(attempt.tx_hash):
                log.debug("anchor %d: %s already known (%s)", anchor_id, attempt.tx_hash, exc)
                return
            self._note(anchor_id, f"send {attempt.tx_hash}: {exc}")
            log.warning("anchor %d: send of %s failed: %s", anchor_id, attempt.tx_hash, exc)

    def _node_knows(self, tx_hash: str) -> bool:
        try:
            self.chain.w3.eth.get_transaction(HexBytes(tx_hash))
        except TransactionNotFound:
            return False
        return True

    def _set(self, anchor_id: int, **fields: Any) -> None:
        self.outbox.set(anchor_id, **fields)

    def _note(self, anchor_id: int, message: str) -> None:
        self.outbox.note(anchor_id, message)


__all__ = [
    "OUTBOX_FILE",
    "OutboxEntry",
    "OutboxError",
    "TxManager",
    "TxState",
]
