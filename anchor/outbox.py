"""The anchor outbox: every anchor request and every transaction signed for it, in SQLite.

Why a table of signed bytes: a transaction is committed here (WAL, ``synchronous=FULL``, so
each commit is fsync'd) *before* it is sent, so after a crash the same bytes are sent again and
the chain sees one transaction per nonce ("Effectively once"). This module holds the storage
only; :mod:`anchor.txmanager` decides what to sign and when.

An outbox is bound to one chain id, contract and account at creation: nonces and signed bytes
mean nothing (or harm) elsewhere.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from hexbytes import HexBytes

from anchor.chain import Fees
from anchor.errors import AnchorError
from vitalproof.durable import fsync_dir

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
class Attempt:
    """One signed transaction of an anchor (the first, a fee bump, or a re-anchor)."""

    tx_hash: str
    anchor_id: int
    nonce: int
    raw: bytes
    gas: int
    fees: Fees
    signed_at: float


class Outbox:
    """The outbox file in ``outbox_dir``, bound to (``chain_id``, ``contract``, ``account``).

    ``clock``: wall-clock seconds, stamped on every change; injectable so tests can age a
    transaction.
    """

    def __init__(
        self,
        outbox_dir: Path | str,
        *,
        chain_id: int,
        contract: str,
        account: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.dir = Path(outbox_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / OUTBOX_FILE
        created = not self.path.exists()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if created:
            fsync_dir(self.dir)  # make the new file's directory entry durable too
        try:
            self._bind_identity(
                {"chain_id": str(chain_id), "contract": contract, "account": account}
            )
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def _bind_identity(self, want: dict[str, str]) -> None:
        """Refuse an outbox written for another chain, contract or account."""
        with self.transaction():
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
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction; COMMIT is fsync'd (WAL + synchronous=FULL)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- reading ------------------------------------------------------------------------

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

    def find(self, root: bytes, tree_size: int) -> OutboxEntry | None:
        row = self._db.execute(
            "SELECT id FROM anchors WHERE root = ? AND tree_size = ?", (hex0x(root), tree_size)
        ).fetchone()
        return None if row is None else self.get(int(row["id"]))

    def attempt_hashes(self, entry_id: int) -> list[str]:
        """Every transaction hash ever signed for this anchor, oldest first."""
        rows = self._db.execute(
            "SELECT tx_hash FROM attempts WHERE anchor_id = ? ORDER BY signed_at, rowid",
            (entry_id,),
        )
        return [r["tx_hash"] for r in rows]

    def attempt(self, tx_hash: str) -> Attempt:
        r = self._db.execute("SELECT * FROM attempts WHERE tx_hash = ?", (tx_hash,)).fetchone()
        if r is None:
            raise OutboxError(f"outbox {self.path} lost attempt {tx_hash}")
        return Attempt(
            tx_hash=r["tx_hash"],
            anchor_id=int(r["anchor_id"]),
            nonce=int(r["nonce"]),
            raw=bytes(HexBytes(r["raw"])),
            gas=int(r["gas"]),
            fees=Fees(int(r["max_fee"]), int(r["priority_fee"])),
            signed_at=float(r["signed_at"]),
        )

    def max_nonce(self) -> int | None:
        """The highest nonce any attempt used (signed-but-unsent ones still own theirs)."""
        row = self._db.execute("SELECT MAX(nonce) AS m FROM attempts").fetchone()
        return None if row["m"] is None else int(row["m"])

    # -- writing ------------------------------------------------------------------------

    def add_anchor(self, root: bytes, tree_size: int, attempt: Attempt) -> int:
        """A new PENDING anchor with its first signed attempt, in one transaction; returns
        the anchor's id (the attempt's own ``anchor_id`` is not read)."""
        now = attempt.signed_at
        with self.transaction():
            cur = self._db.execute(
                "INSERT INTO anchors (root, tree_size, state, nonce, tx_hash, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    hex0x(root),
                    tree_size,
                    TxState.PENDING.value,
                    attempt.nonce,
                    attempt.tx_hash,
                    now,
                    now,
                ),
            )
            anchor_id = cast(int, cur.lastrowid)
            self._insert_attempt(anchor_id, attempt)
        return anchor_id

    def add_attempt(self, attempt: Attempt, **fields: Any) -> None:
        """Another signed transaction for an anchor, and the anchor's changed fields, at once."""
        with self.transaction():
            self._insert_attempt(attempt.anchor_id, attempt)
            self.set(attempt.anchor_id, **fields)

    def set(self, anchor_id: int, **fields: Any) -> None:
        fields["updated_at"] = self.clock()
        cols = ", ".join(f"{k} = ?" for k in fields)
        values = [v.value if isinstance(v, TxState) else v for v in fields.values()]
        if self._db.in_transaction:
            self._db.execute(f"UPDATE anchors SET {cols} WHERE id = ?", (*values, anchor_id))
        else:
            with self.transaction():
                self._db.execute(f"UPDATE anchors SET {cols} WHERE id = ?", (*values, anchor_id))

    def note(self, anchor_id: int, message: str) -> None:
        self.set(anchor_id, last_error=message)

    def _insert_attempt(self, anchor_id: int, a: Attempt) -> None:
        self._db.execute(
            "INSERT INTO attempts (tx_hash, anchor_id, nonce, raw, gas, max_fee, priority_fee,"
            " signed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                a.tx_hash,
                anchor_id,
                a.nonce,
                hex0x(a.raw),
                a.gas,
                str(a.fees.max_fee_per_gas),
                str(a.fees.max_priority_fee_per_gas),
                a.signed_at,
            ),
        )


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


def hex0x(value: bytes) -> str:
    return "0x" + bytes(value).hex()
