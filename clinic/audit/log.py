"""The audit log on disk: append-only, hash-chained records in SQLite.

Why SQLite (WAL, ``synchronous=FULL``, like :mod:`anchor.outbox`) rather than an fsync'd
JSON-lines file: several processes append to the same log (the service for every disclosure
and refusal, the ``consent`` and ``patients erase`` commands for theirs), and each append
must read the previous hash and write the next record as one step. SQLite's write lock
(``BEGIN IMMEDIATE``) serialises them across processes; a JSON-lines file would need its own
locking and its own torn-line repair. Many records go in one transaction and one fsync
(:meth:`AuditLog.append_many`: a fan-out audits per delivery batch, not per reading), and the
indexes answer "this patient's disclosures" without a scan. What makes it checkable is not
the database: every record carries its chain fields and its canonical bytes are defined in
:mod:`clinic.audit.records`, so an exported record is checked without it.

Triggers refuse UPDATE and DELETE on the records table, so no code path of ours can rewrite
history by mistake; someone with the file can still drop them, which is what the hash chain
and the anchored checkpoints are for. At scale the same records would go to an append-only
store (a Kafka topic with infinite retention, or object storage with object lock); the chain
and the checkpoints do not change.

The log keeps pseudonymous patient ids and names of queries or streams, never reading
values; an erased patient's records stay (the audit log is the record that the erasure
happened), but they link to nothing once the keys and salts are gone.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from clinic.audit.records import (
    GENESIS_HASH,
    AuditAction,
    AuditEntry,
    AuditError,
    AuditRecord,
    Outcome,
    verify_chain,
)
from vitalproof.durable import fsync_dir
from vitalproof_verify import merkle

__all__ = ["AuditCheckpoint", "AuditHead", "AuditLog", "checkpoint_id", "prefix_roots"]

FORMAT = "vitalproof-audit-1"
#: How long an append waits for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 10_000
#: Prefix of the Merkle-log entries that hold audit checkpoints (see :func:`checkpoint_id`).
CHECKPOINT_PREFIX = "audit-"

_COLUMNS = (
    "seq, time_us, actor, role, patient_id, action, what, purpose, outcome, reason, count,"
    " prev_hash, hash"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq        INTEGER PRIMARY KEY,
    time_us    INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    role       TEXT NOT NULL,
    patient_id TEXT,
    action     TEXT NOT NULL,
    what       TEXT NOT NULL,
    purpose    TEXT,
    outcome    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    count      INTEGER NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_patient ON records (patient_id, seq);
CREATE INDEX IF NOT EXISTS records_by_actor ON records (actor, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    size    INTEGER PRIMARY KEY,
    root    TEXT NOT NULL,
    time_us INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"""


def prefix_roots(leaves: Sequence[bytes], sizes: Iterable[int]) -> dict[int, bytes]:
    """RFC 9162 roots of several prefixes of ``leaves`` (leaf hashes) in one pass.

    Keeps the perfect subtrees of the prefix read so far (one per set bit of its size,
    largest first); the root of that prefix folds them right to left, which is the RFC's
    left-balanced split. So each root costs O(log n) beyond the single pass.
    """
    out: dict[int, bytes] = {}
    stack: list[tuple[int, bytes]] = []  # (leaves covered, hash), left to right
    i = 0
    for target in sorted(set(sizes)):
        if target == 0:
            out[0] = merkle.EMPTY_ROOT
            continue
        while i < target:
            width, node = 1, leaves[i]
            i += 1
            while stack and stack[-1][0] == width:
                width, node = 2 * width, merkle.node_hash(stack.pop()[1], node)
            stack.append((width, node))
        root = stack[-1][1]
        for _, left in reversed(stack[:-1]):
            root = merkle.node_hash(left, root)
        out[target] = root
    return out


def checkpoint_id(size: int) -> str:
    """The Merkle-log entry id of the audit checkpoint at ``size`` records."""
    return f"{CHECKPOINT_PREFIX}{size}"


@dataclass(frozen=True, slots=True)
class AuditHead:
    """The first ``size`` records as one RFC 9162 root over their hashes (leaf ``seq - 1``
    is the 32 bytes of record ``seq``'s hash)."""

    size: int
    root: bytes

    def to_json_dict(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex()}


class AuditCheckpoint(NamedTuple):
    """An audit head shaped as a Merkle-log entry, ``(batch_id, batch_root, batch_size)``:
    what :class:`anchor.log.MerkleLog.append` takes, so the anchor package needs nothing of
    clinic to anchor it."""

    batch_id: str
    batch_root: bytes
    batch_size: int


def _record(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord.from_json_dict(dict(row))


class AuditLog:
    """The audit log in the SQLite file ``path`` (created with its folder unless ``readonly``).

    ``clock``: wall-clock seconds, stamped on every record (injectable for tests). Safe to
    share between threads (one lock around the connection) and between processes (SQLite's
    write lock); every append is committed, and so fsync'd, before it returns.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.readonly = readonly
        self._lock = threading.RLock()
        self._leaves: list[bytes] = []  # leaf hashes of the records seen so far, by seq - 1
        self._checked: tuple[int, str] | None = None  # (size, last hash) checkpoint() verified
        if readonly:
            if not self.path.is_file():
                raise AuditError(f"no audit log at {self.path}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                if created:
                    fsync_dir(self.path.parent)  # the new file's name must survive a crash
                self._check_format(write=True)
            else:
                self._check_format(write=False)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise AuditError(f"{self.path} is not a usable audit log: {e}") from None
        except BaseException:
            self._db.close()
            raise

    def _check_format(self, *, write: bool) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None and write:
            with self._transaction():
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
            return
        if row is None or row["value"] != FORMAT:
            found = None if row is None else row["value"]
            raise AuditError(f"{self.path} is not a {FORMAT} log (format {found!r})")

    # -- housekeeping ---------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; its COMMIT is fsync'd (WAL + synchronous=FULL). A database
        error (disk full, lock timeout, a constraint) rolls it all back as an AuditError."""
        if self.readonly:
            raise AuditError(f"audit log {self.path} is open read-only")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise AuditError(f"cannot write the audit log {self.path}: {e}") from None
                raise

    # -- writing --------------------------------------------------------------------------

    def append(
        self,
        *,
        actor: str,
        role: str,
        patient_id: str | None,
        action: AuditAction | str,
        what: str,
        purpose: str | None,
        outcome: Outcome | str,
        reason: str,
        count: int = 0,
    ) -> AuditRecord:
        """Record one event; returns it with its ``seq`` and hashes once it is on disk."""
        entry = AuditEntry(
            actor=actor,
            role=role,
            patient_id=patient_id,
            action=AuditAction(action),
            what=what,
            purpose=purpose,
            outcome=Outcome(outcome),
            reason=reason,
            count=count,
        )
        return self.append_many([entry])[0]

    def append_many(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        """Record several events in one transaction (one fsync), chained in the given order.

        All or none: if anything fails, nothing of the call is stored.
        """
        if not entries:
            return []
        for e in entries:
            if not isinstance(e, AuditEntry):
                raise AuditError(f"append_many takes AuditEntry values, got {type(e).__name__}")
        time_us = int(self.clock() * 1_000_000)
        out: list[AuditRecord] = []
        with self._transaction():
            last = self._db.execute(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev = (0, GENESIS_HASH) if last is None else (int(last[0]), str(last[1]))
            for entry in entries:
                seq += 1
                rec = AuditRecord.seal(entry, seq=seq, time_us=time_us, prev_hash=prev)
                self._db.execute(
                    f"INSERT INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        rec.seq,
                        rec.time_us,
                        rec.actor,
                        rec.role,
                        rec.patient_id,
                        rec.action.value,
                        rec.what,
                        rec.purpose,
                        rec.outcome.value,
                        rec.reason,
                        rec.count,
                        rec.prev_hash,
                        rec.hash,
                    ),
                )
                out.append(rec)
                prev = rec.hash
        return out

    # -- reading --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM records").fetchone()
        return int(row[0] or 0)

    def count(self, *, patient_id: str | None = None) -> int:
        """How many records there are (of one patient)."""
        sql, args = "SELECT COUNT(*) FROM records", []
        if patient_id is not None:
            sql, args = sql + " WHERE patient_id = ?", [patient_id]
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    def __len__(self) -> int:
        return self.size

    def records(
        self,
        *,
        patient_id: str | None = None,
        actor: str | None = None,
        since_seq: int = 0,
        before_seq: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        """Records with ``since_seq < seq < before_seq``, oldest first (or newest first, for
        a log read a page at a time from the end), optionally of one patient and/or one
        actor, at most ``limit`` of them."""
        sql = f"SELECT {_COLUMNS} FROM records WHERE seq > ?"
        args: list[Any] = [since_seq]
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        if patient_id is not None:
            sql += " AND patient_id = ?"
            args.append(patient_id)
        if actor is not None:
            sql += " AND actor = ?"
            args.append(actor)
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_record(r) for r in rows]

    def record(self, seq: int) -> AuditRecord:
        with self._lock:
            sql = f"SELECT {_COLUMNS} FROM records WHERE seq = ?"
            row = self._db.execute(sql, (seq,)).fetchone()
        if row is None:
            raise AuditError(f"no audit record {seq} (size {self.size})")
        return _record(row)

    def _iter_all(self, since_seq: int = 0, page: int = 4096) -> Iterator[AuditRecord]:
        """Every record after ``since_seq`` in order, a page at a time (records are only ever
        added at the end, so paging by ``seq`` sees a consistent prefix)."""
        last = since_seq
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, page),
                ).fetchall()
            for row in rows:
                try:
                    yield _record(row)
                except AuditError as e:
                    raise AuditError(e.reason, seq=int(row["seq"])) from None
            if len(rows) < page:
                return
            last = int(rows[-1]["seq"])

    def verify(self) -> int:
        """Recompute the whole chain from the genesis; return the number of records.

        Raises :class:`AuditError` naming the first bad ``seq`` and why; also if a recorded
        checkpoint no longer matches (records below it were removed or rewritten).
        """
        hashes: list[bytes] = []

        def tap(it: Iterator[AuditRecord]) -> Iterator[AuditRecord]:
            for rec in it:
                hashes.append(merkle.leaf_hash(rec.leaf))
                yield rec

        n, last_hash = verify_chain(tap(self._iter_all()))
        self._check_checkpoints(hashes)
        with self._lock:
            self._leaves = hashes
            self._checked = (n, last_hash)
        return n

    def _check_checkpoints(self, leaves: list[bytes]) -> None:
        cps = self.checkpoints()
        roots = prefix_roots(leaves, [cp.batch_size for cp in cps if cp.batch_size <= len(leaves)])
        for cp in cps:
            if cp.batch_size > len(leaves):
                raise AuditError(
                    f"checkpoint {cp.batch_id} covers {cp.batch_size} records but the log has "
                    f"{len(leaves)}: records were removed",
                    seq=len(leaves) + 1,
                )
            if roots[cp.batch_size] != cp.batch_root:
                raise AuditError(f"the log no longer matches checkpoint {cp.batch_id}")

    # -- Merkle head ----------------------------------------------------------------------

    def _leaf_hashes(self) -> list[bytes]:
        """Leaf hashes of every stored record, read incrementally (appends only add)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, hash FROM records WHERE seq > ? ORDER BY seq", (len(self._leaves),)
            ).fetchall()
            for seq, hash_ in rows:
                if seq != len(self._leaves) + 1:
                    raise AuditError(f"found record {seq} after {len(self._leaves)}", seq=seq)
                try:
                    self._leaves.append(merkle.leaf_hash(bytes.fromhex(hash_)))
                except ValueError:
                    raise AuditError(f"hash {hash_!r} is not hex", seq=seq) from None
            return list(self._leaves)

    def head(self, size: int | None = None) -> AuditHead:
        """The RFC 9162 root over the first ``size`` record hashes (default: all)."""
        leaves = self._leaf_hashes()
        n = len(leaves) if size is None else size
        if not 0 <= n <= len(leaves):
            raise AuditError(f"audit log has {len(leaves)} records, not {n}")
        return AuditHead(n, merkle.root(leaves[:n]))

    def roots(self, sizes: Iterable[int]) -> dict[int, bytes]:
        """The roots of several heads in one pass (``O(n + k log n)``, not ``O(n k)``)."""
        leaves = self._leaf_hashes()
        wanted = list(sizes)
        for n in wanted:
            if not 0 <= n <= len(leaves):
                raise AuditError(f"audit log has {len(leaves)} records, not {n}")
        return prefix_roots(leaves, wanted)

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """Audit path of record ``seq`` (leaf ``seq - 1``) in the head of ``size`` records."""
        leaves = self._leaf_hashes()
        n = len(leaves) if size is None else size
        if not 0 < seq <= n <= len(leaves):
            raise AuditError(f"no record {seq} in a head of {n} (log has {len(leaves)})")
        return merkle.inclusion_proof(leaves[:n], seq - 1)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        leaves = self._leaf_hashes()
        n = len(leaves) if new_size is None else new_size
        if not 0 < old_size <= n <= len(leaves):
            raise AuditError(f"no consistency proof from {old_size} to {n}")
        return merkle.consistency_proof(leaves[:n], old_size)

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoints(self) -> list[AuditCheckpoint]:
        with self._lock:
            rows = self._db.execute("SELECT size, root FROM checkpoints ORDER BY size").fetchall()
        return [AuditCheckpoint(checkpoint_id(r[0]), bytes.fromhex(r[1]), int(r[0])) for r in rows]

    def checkpoint(self) -> AuditCheckpoint | None:
        """Record the current head as a checkpoint and return it as a Merkle-log entry
        (``None`` for an empty log: a log entry needs at least one record).

        It never vouches for what it has not checked: the first call on this object runs
        :meth:`verify` (the whole chain from the genesis, and the recorded checkpoints);
        later calls check the records appended since, from the last hash they checked. A
        broken chain raises :class:`AuditError` and records nothing. Rewrites of older
        records after that first check are :meth:`verify`'s and
        :func:`clinic.audit.check_against_log`'s to find (the anchored roots pin them).
        Checkpointing the same head twice returns the same entry.
        """
        if self._checked is None:
            self.verify()
        assert self._checked is not None
        start, prev = self._checked
        n, last_hash = verify_chain(self._iter_all(start), first_seq=start + 1, prev_hash=prev)
        self._checked = (start + n, last_hash)
        head = self.head(start + n)  # what was checked, not what was appended meanwhile
        if head.size == 0:
            return None
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO checkpoints (size, root, time_us) VALUES (?, ?, ?)",
                (head.size, head.root.hex(), int(self.clock() * 1_000_000)),
            )
            row = self._db.execute(
                "SELECT root FROM checkpoints WHERE size = ?", (head.size,)
            ).fetchone()
        if bytes.fromhex(row[0]) != head.root:
            cp_id = checkpoint_id(head.size)
            raise AuditError(f"checkpoint {cp_id} was recorded with another root")
        return AuditCheckpoint(checkpoint_id(head.size), head.root, head.size)
