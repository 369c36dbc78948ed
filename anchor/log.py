"""The append-only Merkle log of sealed batches, in the manner of a Certificate Transparency log.

Each sealed batch becomes one leaf; every anchoring period one transaction puts the log's
root and size on-chain. A reading's proof is then two RFC 9162 inclusion paths (reading in
batch, batch in log) and one transaction.

The leaf of a batch is :func:`vitalproof_verify.leaves.log_leaf_data` (the canonical JSON of
its id, root and size), hashed as RFC 9162 section 2.1.1 says; the verify kit holds that
definition because a verifier recomputes it from a proof bundle.

On disk, a directory holds:

``entries.jsonl``
    one leaf data per line, exactly the bytes hashed. The leaf hashes are recomputed on
    open, so rewriting an entry changes the root and :meth:`MerkleLog.check_extends` notices.
``anchors.jsonl``
    the heads that were anchored on-chain, one JSON object per line.
``LOCK``
    held (``flock``) by the one writer; readers open with ``readonly=True``.

Every append is flushed and fsync'd before it returns, so an index handed out survives a
crash. A torn last line (crash during write, never acknowledged) is cut off on open.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from anchor.errors import AnchorError
from vitalproof.durable import fsync_dir
from vitalproof_verify import merkle
from vitalproof_verify.errors import MerkleError
from vitalproof_verify.leaves import LOG_ENTRY_VERSION, check_log_entry, log_leaf_data

__all__ = ["LogEntry", "LogHead", "MerkleLog"]

ENTRIES_FILE = "entries.jsonl"
ANCHORS_FILE = "anchors.jsonl"
LOCK_FILE = "LOCK"


def _check_entry(batch_id: object, batch_root: object, batch_size: object) -> None:
    try:
        check_log_entry(batch_id, batch_root, batch_size)
    except MerkleError as e:
        raise AnchorError(str(e)) from None


@dataclass(frozen=True, slots=True)
class LogEntry:
    batch_id: str
    batch_root: bytes
    batch_size: int

    def leaf_data(self) -> bytes:
        return log_leaf_data(self.batch_id, self.batch_root, self.batch_size)

    @classmethod
    def parse(cls, line: bytes) -> LogEntry:
        """Decode one stored line; only the canonical encoding is accepted.

        Accepting any equivalent JSON would let the stored bytes and the hashed bytes drift
        apart; refusing it turns silent edits into a loud error.
        """
        try:
            doc = json.loads(line)
            entry = cls(doc["batch_id"], bytes.fromhex(doc["batch_root"]), doc["batch_size"])
            if doc.get("v") != LOG_ENTRY_VERSION:
                raise ValueError(f"unknown entry version {doc.get('v')!r}")
            canonical = entry.leaf_data()
        except (ValueError, KeyError, TypeError, AttributeError, MerkleError) as e:
            raise AnchorError(f"unreadable log entry: {e}") from None
        if canonical != line:
            raise AnchorError("log entry is not in canonical form")
        return entry


@dataclass(frozen=True, slots=True)
class LogHead:
    """A (tree_size, root) pair that was put on-chain, with what the chain said about it."""

    tree_size: int
    root: bytes
    anchor: Mapping[str, Any] = field(default_factory=dict)

    def to_json_line(self) -> bytes:
        doc = {"anchor": dict(self.anchor), "root": self.root.hex(), "tree_size": self.tree_size}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> LogHead:
        try:
            doc = json.loads(line)
            head = cls(int(doc["tree_size"]), bytes.fromhex(doc["root"]), dict(doc["anchor"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AnchorError(f"unreadable anchored head: {e}") from None
        if head.tree_size <= 0 or len(head.root) != merkle.HASH_SIZE:
            raise AnchorError(f"invalid anchored head: size {head.tree_size}")
        return head


def _read_lines(path: Path, *, repair: bool) -> list[bytes]:
    """Complete lines of a JSON-lines file; a torn last line is dropped (and cut if ``repair``).

    Appends are acknowledged only after fsync, so a line without its newline was never
    acknowledged to anyone: dropping it loses nothing that was promised.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete = data.rfind(b"\n") + 1
    if complete < len(data) and repair:
        with path.open("r+b") as f:
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    return data[:complete].split(b"\n")[:-1]


class MerkleLog:
    """An append-only, persistent RFC 9162 log of batch roots. One writer per directory.

    Appends are idempotent by ``batch_id`` ("Effectively once": a replayed batch rewrites
    nothing), and :meth:`check_extends` refuses a log that does not extend what was already
    anchored, so a corrupted or edited log is never anchored over the honest history.
    """

    def __init__(self, directory: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.directory = Path(directory)
        self.readonly = readonly
        self._lock: IO[bytes] | None = None
        if not readonly:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = (self.directory / LOCK_FILE).open("a+b")
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                self._lock = None
                raise AnchorError(f"log {self.directory} is open by another writer") from None
        elif not self.directory.is_dir():
            raise AnchorError(f"no log at {self.directory}")
        try:
            self._load()
        except BaseException:
            self.close()  # a log that cannot be read must not keep its writer lock
            raise

    def _load(self) -> None:
        self._entries: list[LogEntry] = []
        self._leaves: list[bytes] = []
        self._index: dict[str, int] = {}
        self._tree: merkle.MerkleTree | None = None
        for n, line in enumerate(_read_lines(self._entries_path, repair=not self.readonly)):
            try:
                entry = LogEntry.parse(line)
            except AnchorError as e:
                raise AnchorError(f"{self._entries_path} line {n + 1}: {e}") from None
            if entry.batch_id in self._index:
                raise AnchorError(f"{self._entries_path}: batch {entry.batch_id!r} appears twice")
            self._add(entry)
        self._heads = [
            LogHead.parse(line)
            for line in _read_lines(self._anchors_path, repair=not self.readonly)
        ]

    # -- housekeeping ---------------------------------------------------------------------

    @property
    def _entries_path(self) -> Path:
        return self.directory / ENTRIES_FILE

    @property
    def _anchors_path(self) -> Path:
        return self.directory / ANCHORS_FILE

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self) -> MerkleLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add(self, entry: LogEntry) -> int:
        index = len(self._entries)
        self._entries.append(entry)
        self._leaves.append(merkle.leaf_hash(entry.leaf_data()))
        self._index[entry.batch_id] = index
        self._tree = None
        return index

    def _writable(self) -> None:
        if self._lock is None:
            raise AnchorError(f"log {self.directory} is open read-only or closed")

    def _append_line(self, path: Path, line: bytes) -> None:
        created = not path.exists()
        with path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.directory)  # the new name must survive a crash too

    # -- the log ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)

    def append(self, batch_id: str, batch_root: bytes, batch_size: int) -> int:
        """Add a batch; return its leaf index. Replaying the same batch returns the same index.

        The same ``batch_id`` with another root or size is refused: batch ids are
        deterministic from what a batch covers, so a second root means two different
        sealings of the same readings, and the log must not silently pick one.
        """
        _check_entry(batch_id, batch_root, batch_size)
        existing = self._index.get(batch_id)
        if existing is not None:
            old = self._entries[existing]
            if (old.batch_root, old.batch_size) != (batch_root, batch_size):
                raise AnchorError(
                    f"batch {batch_id!r} is already in the log at index {existing} with root "
                    f"{old.batch_root.hex()} and size {old.batch_size}; refusing "
                    f"{batch_root.hex()} / {batch_size}"
                )
            return existing
        self._writable()
        entry = LogEntry(batch_id, batch_root, batch_size)
        self._append_line(self._entries_path, entry.leaf_data() + b"\n")
        return self._add(entry)

    def entry(self, index: int) -> LogEntry:
        if not 0 <= index < self.size:
            raise AnchorError(f"no log entry {index} (size {self.size})")
        return self._entries[index]

    def index_of(self, batch_id: str) -> int | None:
        return self._index.get(batch_id)

    def leaf_hashes(self) -> list[bytes]:
        return list(self._leaves)

    def _tree_of(self, size: int | None) -> merkle.MerkleTree:
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise AnchorError(f"log has {self.size} entries, not {n}")
        if n == self.size:
            if self._tree is None:
                self._tree = merkle.MerkleTree(self._leaves)
            return self._tree
        return merkle.MerkleTree(self._leaves[:n])

    def root(self, size: int | None = None) -> bytes:
        """Root of the first ``size`` entries (default: all), RFC 9162 MTH."""
        return self._tree_of(size).root()

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path of entry ``index`` in the tree of the first ``size`` entries."""
        try:
            return self._tree_of(size).inclusion_proof(index)
        except MerkleError as e:
            raise AnchorError(str(e)) from None

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        try:
            return self._tree_of(new_size).consistency_proof(old_size)
        except MerkleError as e:
            raise AnchorError(str(e)) from None

    # -- anchored heads -----------------------------------------------------------------

    def last_anchored(self) -> LogHead | None:
        return self._heads[-1] if self._heads else None

    def anchored_heads(self) -> list[LogHead]:
        return list(self._heads)

    def anchor_covering(self, index: int) -> LogHead | None:
        """The earliest anchored head that includes entry ``index``: where its proof points."""
        for head in self._heads:
            if head.tree_size > index:
                return head
        return None

    def check_extends(self, last_head: LogHead | None) -> None:
        """Raise :class:`AnchorError` unless this log is an extension of ``last_head``.

        Checked the way an outside monitor would: a consistency proof from the anchored size
        to the current size, verified against the anchored root (RFC 9162 section 2.1.4.2).
        A rewritten, reordered or truncated entry below the anchored size fails here, and the
        anchor job must then refuse to anchor rather than publish a forked history.
        """
        if last_head is None:
            return
        if last_head.tree_size > self.size:
            raise AnchorError(
                f"log has {self.size} entries but {last_head.tree_size} were anchored: "
                "entries were lost or removed"
            )
        try:
            proof = self._tree_of(None).consistency_proof(last_head.tree_size)
            merkle.verify_consistency(
                last_head.tree_size, self.size, last_head.root, self.root(), proof
            )
        except MerkleError as e:
            raise AnchorError(
                f"log does not extend the anchored head (size {last_head.tree_size}, root "
                f"{last_head.root.hex()}): {e}"
            ) from e

    def verify(self) -> None:
        """Check the log against its own last anchored head (what the anchor job runs first)."""
        self.check_extends(self.last_anchored())

    def record_anchor(self, tree_size: int, root: bytes, anchor_info: Mapping[str, Any]) -> LogHead:
        """Remember that ``(tree_size, root)`` is on-chain; ``anchor_info`` says where.

        Refuses a head this log does not have, or one that does not extend the previous
        anchored head: anchors.jsonl must only ever describe this log's own history.
        Recording the identical head twice (a retried job) writes nothing.
        """
        self._writable()
        if not 0 < tree_size <= self.size:
            raise AnchorError(f"cannot record head of size {tree_size}: log has {self.size}")
        if root != self.root(tree_size):
            raise AnchorError(f"root {root.hex()} is not this log's root at size {tree_size}")
        head = LogHead(tree_size, root, dict(anchor_info))
        try:
            line = head.to_json_line()
        except (TypeError, ValueError) as e:
            raise AnchorError(f"anchor_info is not JSON-serialisable: {e}") from None
        last = self.last_anchored()
        if last is not None:
            if last.tree_size > tree_size:
                raise AnchorError(
                    f"head of size {tree_size} is older than the last anchored ({last.tree_size})"
                )
            if last.to_json_line() == line:
                return last
            try:
                merkle.verify_consistency(
                    last.tree_size,
                    tree_size,
                    last.root,
                    root,
                    self.consistency_proof(last.tree_size, tree_size),
                )
            except MerkleError as e:
                raise AnchorError(f"new head does not extend the last anchored head: {e}") from e
        self._append_line(self._anchors_path, line)
        self._heads.append(head)
        return head
