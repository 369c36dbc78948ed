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

The outbox is SQLite (WAL, ``synchronous=FULL``: each commit is fsync'd). One manager per
outbox at a time: the anchor job (``anchor.job``, its own process) holds the log's writer
lock while it runs.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from hexbytes import HexBytes
from web3.exceptions import TransactionNotFound, Web3Exception

from anchor.chain import AnchorReceipt, AnchorRejected, Chain, Fees, compute_fees
from anchor.errors import AnchorError
from vitalproof.crashpoints import crashpoint
from vitalproof.durable import fsync_dir

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS anchors (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    root         TEXT NOT NULL,
    tree_size    INTEGER NOT NULL,
    state        TEXT NOT NULL,
    nonce        INTEGER NOT NULL,
    tx_hash      TEXT NOT NULL,   -- the attempt to (re)broadcast, or the included one
    block_number INTEGER,
    block_hash   TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    last_error   TEXT,
    UNIQUE (root, tree_size)
);
CREATE TABLE IF NOT EXISTS attempts (
    tx_hash      TEXT PRIMARY KEY,
    anchor_id    INTEGER NOT NULL REFERENCES anchors (id),
    nonce        INTEGER NOT NULL,
    raw          TEXT NOT NULL,
    gas          INTEGER NOT NULL,
    max_fee      INTEGER NOT NULL,
    priority_fee INTEGER NOT NULL,
    signed_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_anchor ON attempts (anchor_id);
"""

_BENIGN_SEND_ERRORS = ("already known", "known transaction", "already imported", "nonce too low")


class TxState(StrEnum):
    """Lifecycle of one anchor in the outbox."""

    PENDING = "PENDING"
    INCLUDED = "INCLUDED"
    FINAL = "FINAL"
    SUPERSEDED = "SUPERSEDED"
    """A later, larger tree size is anchored: nothing left to do for this one."""
    FAILED = "FAILED"
    """Mined but reverted, or refused by the contract for another reason: needs a person."""


OPEN_STATES = (TxState.PENDING, TxState.INCLUDED)


class OutboxError(AnchorError):
    """The outbox belongs to another chain, contract or account, or is unreadable."""


@dataclass(frozen=True)
class OutboxEntry:
    """One anchor request and where its transaction stands."""

    id: int
    root: bytes
    tree_size: int
    state: TxState
    nonce: int
    tx_hash: str
    block_number: int | None
    block_hash: str | None
    created_at: float
    updated_at: float
    last_error: str | None
    attempts: int


@dataclass(frozen=True)
class _Attempt:
    tx_hash: str
    anchor_id: int
    nonce: int
    raw: bytes
    gas: int
    fees: Fees
    signed_at: float


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
        self.outbox_dir = Path(outbox_dir)
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.outbox_dir / OUTBOX_FILE
        created = not self.path.exists()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if created:
            fsync_dir(self.outbox_dir)  # make the new file's directory entry durable too
        self._bind_identity()

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TxManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind_identity(self) -> None:
        """Refuse an outbox written for another chain, contract or account: its nonces and
        signed bytes would be meaningless (or harmful) elsewhere."""
        want = {
            "chain_id": str(self.chain.chain_id),
            "contract": self.chain.contract_address,
            "account": self.chain.address,
        }
        with self._tx():
            have = {r["key"]: r["value"] for r in self._db.execute("SELECT key, value FROM meta")}
            for key, value in want.items():
                if key not in have:
                    self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
                elif have[key] != value:
                    raise OutboxError(
                        f"outbox {self.path} is for {key} {have[key]}, not {value}:"
                        " use a separate outbox directory per chain, contract and account"
                    )

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One SQLite transaction; COMMIT is fsync'd (WAL + synchronous=FULL)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- public API ---------------------------------------------------------------------

    def prepare(self, root: bytes, tree_size: int) -> OutboxEntry:
        """Sign an anchor transaction and persist it, without sending it.

        Idempotent: the same (root, tree_size) returns the existing entry, so an anchor job
        that restarts and asks again does not sign a second transaction.
        """
        existing = self._find(root, tree_size)
        if existing is not None:
            return existing
        data = self.chain.anchor_calldata(root, tree_size)
        gas = self.chain.estimate_gas(data, self.chain.contract_address)
        fees = compute_fees(self.chain.w3, self.chain.fee_policy)
        nonce = self._next_nonce()
        raw, tx_hash = self._sign(data, nonce, gas, fees)
        now = self.clock()
        with self._tx():
            cur = self._db.execute(
                "INSERT INTO anchors (root, tree_size, state, nonce, tx_hash, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_hex(root), tree_size, TxState.PENDING.value, nonce, tx_hash, now, now),
            )
            anchor_id = cast(int, cur.lastrowid)
            self._insert_attempt(anchor_id, tx_hash, nonce, raw, gas, fees, now)
        log.info("anchor %d: size %d signed as %s (nonce %d)", anchor_id, tree_size, tx_hash, nonce)
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
        row = self._db.execute(
            "SELECT a.*, (SELECT COUNT(*) FROM attempts t WHERE t.anchor_id = a.id) AS n"
            " FROM anchors a WHERE a.id = ?",
            (entry_id,),
        ).fetchone()
        if row is None:
            raise OutboxError(f"no anchor {entry_id} in {self.path}")
        return _entry(row)

    def entries(self, *states: TxState) -> list[OutboxEntry]:
        """Entries in the given states (all when none given), oldest first."""
        sql = (
            "SELECT a.*, (SELECT COUNT(*) FROM attempts t WHERE t.anchor_id = a.id) AS n"
            " FROM anchors a"
        )
        args: tuple[Any, ...] = ()
        if states:
            sql += f" WHERE a.state IN ({','.join('?' * len(states))})"
            args = tuple(s.value for s in states)
        return [_entry(r) for r in self._db.execute(sql + " ORDER BY a.id", args)]

    def attempt_hashes(self, entry_id: int) -> list[str]:
        """Every transaction hash ever signed for this anchor, oldest first."""
        rows = self._db.execute(
            "SELECT tx_hash FROM attempts WHERE anchor_id = ? ORDER BY signed_at, rowid",
            (entry_id,),
        )
        return [r["tx_hash"] for r in rows]

    # -- state machine ------------------------------------------------------------------

    def _advance(self, entry: OutboxEntry) -> None:
        w3 = self.chain.w3
        found = self._find_receipt(entry.id)
        if found is not None:
            receipt = found
            if receipt["status"] != 1:
                self._settle_refused(
                    entry, f"transaction {_hex(receipt['transactionHash'])} reverted on chain"
                )
                return
            number = int(receipt["blockNumber"])
            depth = int(w3.eth.block_number) - number + 1
            state = TxState.FINAL if depth >= self.confirmations else TxState.INCLUDED
            self._set(
                entry.id,
                state=state,
                tx_hash=_hex(receipt["transactionHash"]),
                block_number=number,
                block_hash=_hex(receipt["blockHash"]),
            )
            if entry.block_hash not in (None, _hex(receipt["blockHash"])):
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
        raw, tx_hash = self._sign(data, nonce, gas, fees)
        now = self.clock()
        with self._tx():
            self._insert_attempt(entry.id, tx_hash, nonce, raw, gas, fees, now)
            self._set(
                entry.id,
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

    def _bump(self, entry: OutboxEntry, attempt: _Attempt) -> None:
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
        raw, tx_hash = self._sign(data, attempt.nonce, attempt.gas, fees)
        now = self.clock()
        with self._tx():
            self._insert_attempt(entry.id, tx_hash, attempt.nonce, raw, attempt.gas, fees, now)
            self._set(entry.id, tx_hash=tx_hash)
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
        row = self._db.execute("SELECT MAX(nonce) AS m FROM attempts").fetchone()
        used = -1 if row["m"] is None else int(row["m"])
        return max(chain_next, used + 1)

    def _sign(self, data: bytes, nonce: int, gas: int, fees: Fees) -> tuple[bytes, str]:
        tx = self.chain.build_tx(
            data, to=self.chain.contract_address, nonce=nonce, gas=gas, fees=fees
        )
        signed = self.chain.account.sign_transaction(cast(dict[str, Any], tx))
        return bytes(signed.raw_transaction), _hex(bytes(signed.hash))

    def _insert_attempt(
        self,
        anchor_id: int,
        tx_hash: str,
        nonce: int,
        raw: bytes,
        gas: int,
        fees: Fees,
        now: float,
    ) -> None:
        self._db.execute(
            "INSERT INTO attempts (tx_hash, anchor_id, nonce, raw, gas, max_fee, priority_fee,"
            " signed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                tx_hash,
                anchor_id,
                nonce,
                _hex(raw),
                gas,
                str(fees.max_fee_per_gas),
                str(fees.max_priority_fee_per_gas),
                now,
            ),
        )

    def _attempt(self, tx_hash: str) -> _Attempt:
        r = self._db.execute("SELECT * FROM attempts WHERE tx_hash = ?", (tx_hash,)).fetchone()
        if r is None:
            raise OutboxError(f"outbox {self.path} lost attempt {tx_hash}")
        return _Attempt(
            tx_hash=r["tx_hash"],
            anchor_id=int(r["anchor_id"]),
            nonce=int(r["nonce"]),
            raw=bytes(HexBytes(r["raw"])),
            gas=int(r["gas"]),
            fees=Fees(int(r["max_fee"]), int(r["priority_fee"])),
            signed_at=float(r["signed_at"]),
        )

    def _broadcast(self, anchor_id: int, attempt: _Attempt) -> None:
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

    def _find(self, root: bytes, tree_size: int) -> OutboxEntry | None:
        row = self._db.execute(
            "SELECT id FROM anchors WHERE root = ? AND tree_size = ?", (_hex(root), tree_size)
        ).fetchone()
        return None if row is None else self.get(int(row["id"]))

    def _set(self, anchor_id: int, **fields: Any) -> None:
        fields["updated_at"] = self.clock()
        cols = ", ".join(f"{k} = ?" for k in fields)
        values = [v.value if isinstance(v, TxState) else v for v in fields.values()]
        if self._db.in_transaction:
            self._db.execute(f"UPDATE anchors SET {cols} WHERE id = ?", (*values, anchor_id))
        else:
            with self._tx():
                self._db.execute(f"UPDATE anchors SET {cols} WHERE id = ?", (*values, anchor_id))

    def _note(self, anchor_id: int, message: str) -> None:
        self._set(anchor_id, last_error=message)


def _entry(row: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        id=int(row["id"]),
        root=bytes(HexBytes(row["root"])),
        tree_size=int(row["tree_size"]),
        state=TxState(row["state"]),
        nonce=int(row["nonce"]),
        tx_hash=row["tx_hash"],
        block_number=row["block_number"],
        block_hash=row["block_hash"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        last_error=row["last_error"],
        attempts=int(row["n"]),
    )


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


__all__ = [
    "OUTBOX_FILE",
    "OutboxEntry",
    "OutboxError",
    "TxManager",
    "TxState",
]
