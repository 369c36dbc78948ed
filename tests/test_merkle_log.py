"""anchor.log: idempotent appends, durability, and refusal to anchor over an edited history."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor.errors import AnchorError
from anchor.log import ANCHORS_FILE, ENTRIES_FILE, LogHead, MerkleLog
from vitalproof_verify import merkle
from vitalproof_verify.leaves import log_leaf_data, log_leaf_hash

ANCHOR_INFO = {"chain_id": 31337, "tx_hash": "0x" + "ab" * 32, "block_number": 7}


def _root(i: int) -> bytes:
    return hashlib.sha256(f"batch {i}".encode()).digest()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[MerkleLog]:
    with MerkleLog(tmp_path / "log") as lg:
        yield lg


def _fill(log: MerkleLog, n: int) -> None:
    for i in range(n):
        assert log.append(f"b-{i}", _root(i), 10 + i) == i


def test_leaf_encoding_is_the_documented_canonical_json() -> None:
    root = bytes(range(32))
    data = log_leaf_data("b-1", root, 42)
    assert data == (
        b'{"batch_id":"b-1","batch_root":"000102030405060708090a0b0c0d0e0f101112131415161718'
        b'191a1b1c1d1e1f","batch_size":42,"v":1}'
    )
    assert log_leaf_hash("b-1", root, 42) == hashlib.sha256(b"\x00" + data).digest()
    assert log_leaf_data("b-\u00e9", root, 1) == log_leaf_data("b-\u00e9", root, 1)
    assert b"\\u00e9" in log_leaf_data("b-\u00e9", root, 1)  # ASCII only, one spelling


@pytest.mark.parametrize(
    ("batch_id", "batch_root", "batch_size"),
    [
        ("", bytes(32), 1),
        ("x" * 257, bytes(32), 1),
        ("b", bytes(31), 1),
        ("b", bytes(32), 0),
        ("b", bytes(32), 2**64),
        ("b", bytes(32), True),
        (7, bytes(32), 1),
    ],
)
def test_invalid_entries_are_refused(
    log: MerkleLog, batch_id: str, batch_root: bytes, batch_size: int
) -> None:
    with pytest.raises(AnchorError):
        log.append(batch_id, batch_root, batch_size)
    assert log.size == 0


def test_append_is_idempotent(log: MerkleLog) -> None:
    _fill(log, 3)
    before = (log.directory / ENTRIES_FILE).read_bytes()
    root = log.root()
    assert log.append("b-1", _root(1), 11) == 1
    assert log.size == 3
    assert log.root() == root
    assert (log.directory / ENTRIES_FILE).read_bytes() == before
    with pytest.raises(AnchorError, match="already in the log"):
        log.append("b-1", _root(99), 11)
    with pytest.raises(AnchorError, match="already in the log"):
        log.append("b-1", _root(1), 12)
    assert log.size == 3
    assert (log.directory / ENTRIES_FILE).read_bytes() == before


def test_root_and_proofs_are_rfc9162_over_the_entries(log: MerkleLog) -> None:
    assert log.root() == merkle.EMPTY_ROOT
    _fill(log, 11)
    leaves = [log_leaf_hash(f"b-{i}", _root(i), 10 + i) for i in range(11)]
    assert log.leaf_hashes() == leaves
    for size in range(1, 12):
        assert log.root(size) == merkle.root(leaves[:size])
        for i in range(size):
            merkle.verify_inclusion(
                leaves[i], i, size, log.inclusion_proof(i, size), log.root(size)
            )
        for old in range(1, size + 1):
            merkle.verify_consistency(
                old, size, log.root(old), log.root(size), log.consistency_proof(old, size)
            )
    with pytest.raises(AnchorError):
        log.root(12)
    with pytest.raises(AnchorError):
        log.inclusion_proof(11)
    with pytest.raises(AnchorError):
        log.consistency_proof(0)


def test_persistence_across_reopen(tmp_path: Path) -> None:
    with MerkleLog(tmp_path / "log") as lg:
        _fill(lg, 5)
        lg.record_anchor(5, lg.root(), ANCHOR_INFO)
        root = lg.root()
    with MerkleLog(tmp_path / "log") as lg:
        assert lg.size == 5
        assert lg.root() == root
        assert lg.entry(3).batch_id == "b-3"
        assert lg.index_of("b-4") == 4
        assert lg.index_of("nope") is None
        head = lg.last_anchored()
        assert head == LogHead(5, root, ANCHOR_INFO)
        lg.check_extends(head)
        assert lg.append("b-2", _root(2), 12) == 2  # still idempotent after reopen
        assert lg.append("b-5", _root(5), 15) == 5
    with MerkleLog(tmp_path / "log", readonly=True) as lg:
        assert lg.size == 6
        lg.verify()


def test_same_appends_give_identical_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        with MerkleLog(tmp_path / name) as lg:
            _fill(lg, 4)
            lg.append("b-0", _root(0), 10)
            lg.record_anchor(4, lg.root(), ANCHOR_INFO)
    for f in (ENTRIES_FILE, ANCHORS_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_append_fsyncs_before_returning(log: MerkleLog, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    log.append("b-0", _root(0), 1)
    assert len(synced) >= 1
    synced.clear()
    log.append("b-0", _root(0), 1)  # idempotent replay: nothing written, nothing synced
    assert synced == []


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    with MerkleLog(tmp_path / "log") as lg:
        _fill(lg, 3)
    path = tmp_path / "log" / ENTRIES_FILE
    good = path.read_bytes()
    path.write_bytes(good + b'{"batch_id":"b-3","batch_ro')
    with MerkleLog(tmp_path / "log", readonly=True) as lg:
        assert lg.size == 3
    with MerkleLog(tmp_path / "log") as lg:
        assert lg.size == 3
        assert path.read_bytes() == good
        assert lg.append("b-3", _root(3), 13) == 3


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with MerkleLog(tmp_path / "log") as lg:
        _fill(lg, 1)
        with pytest.raises(AnchorError, match="another writer"):
            MerkleLog(tmp_path / "log")
        reader = MerkleLog(tmp_path / "log", readonly=True)
        assert reader.size == 1
        with pytest.raises(AnchorError, match="read-only"):
            reader.append("b-9", _root(9), 1)
        with pytest.raises(AnchorError, match="read-only"):
            reader.record_anchor(1, lg.root(), {})
    with MerkleLog(tmp_path / "log") as lg:  # released on close
        assert lg.size == 1
    with pytest.raises(AnchorError, match="no log"):
        MerkleLog(tmp_path / "missing", readonly=True)


def test_record_anchor_refuses_heads_the_log_does_not_have(log: MerkleLog) -> None:
    _fill(log, 4)
    with pytest.raises(AnchorError):
        log.record_anchor(5, log.root(), ANCHOR_INFO)
    with pytest.raises(AnchorError):
        log.record_anchor(0, merkle.EMPTY_ROOT, ANCHOR_INFO)
    with pytest.raises(AnchorError):
        log.record_anchor(4, log.root(3), ANCHOR_INFO)
    with pytest.raises(AnchorError, match="JSON"):
        log.record_anchor(4, log.root(), {"tx": b"bytes"})
    assert log.last_anchored() is None
    first = log.record_anchor(3, log.root(3), ANCHOR_INFO)
    assert log.record_anchor(3, log.root(3), ANCHOR_INFO) == first  # retried job
    assert len(log.anchored_heads()) == 1
    with pytest.raises(AnchorError, match="older"):
        log.record_anchor(2, log.root(2), ANCHOR_INFO)
    log.record_anchor(4, log.root(), {**ANCHOR_INFO, "block_number": 9})
    assert [h.tree_size for h in log.anchored_heads()] == [3, 4]
    assert log.anchor_covering(0) == first
    assert log.anchor_covering(3) == log.last_anchored()
    assert log.anchor_covering(4) is None


def _anchored_log(tmp_path: Path, n: int = 6, anchored: int = 5) -> Path:
    with MerkleLog(tmp_path / "log") as lg:
        _fill(lg, n)
        lg.record_anchor(anchored, lg.root(anchored), ANCHOR_INFO)
    return tmp_path / "log" / ENTRIES_FILE


def _rewrite(path: Path, index: int, line: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[index] = line
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_rewritten_leaf_is_refused(tmp_path: Path, victim: int) -> None:
    path = _anchored_log(tmp_path)
    # A perfectly well-formed entry, just not the one that was anchored.
    _rewrite(path, victim, log_leaf_data(f"b-{victim}", _root(100 + victim), 10 + victim))
    with MerkleLog(tmp_path / "log") as lg:
        assert lg.size == 6  # structurally fine: only the anchored root can tell
        with pytest.raises(AnchorError, match="does not extend"):
            lg.check_extends(lg.last_anchored())
        with pytest.raises(AnchorError, match="does not extend"):
            lg.verify()
        lg.append("b-6", _root(6), 16)  # growing does not launder the edit
        with pytest.raises(AnchorError, match="does not extend"):
            lg.verify()
        with pytest.raises(AnchorError):
            lg.record_anchor(7, lg.root(), ANCHOR_INFO)


def test_rewritten_batch_size_is_refused(tmp_path: Path) -> None:
    path = _anchored_log(tmp_path)
    _rewrite(path, 1, log_leaf_data("b-1", _root(1), 999))
    with MerkleLog(tmp_path / "log") as lg, pytest.raises(AnchorError, match="does not extend"):
        lg.verify()


def test_reordered_entries_are_refused(tmp_path: Path) -> None:
    path = _anchored_log(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[1], lines[3] = lines[3], lines[1]
    path.write_bytes(b"\n".join(lines))
    with MerkleLog(tmp_path / "log") as lg, pytest.raises(AnchorError, match="does not extend"):
        lg.verify()


def test_truncated_log_is_refused(tmp_path: Path) -> None:
    path = _anchored_log(tmp_path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:4]) + b"\n")
    with MerkleLog(tmp_path / "log") as lg, pytest.raises(AnchorError, match="lost or removed"):
        lg.verify()


def test_unanchored_tail_may_change_but_anchored_prefix_may_not(tmp_path: Path) -> None:
    """Entry 5 was never anchored: nothing outside the log vouches for it yet."""
    path = _anchored_log(tmp_path, n=6, anchored=5)
    _rewrite(path, 5, log_leaf_data("b-5", _root(555), 15))
    with MerkleLog(tmp_path / "log") as lg:
        lg.verify()


def test_head_from_another_log_is_refused(tmp_path: Path) -> None:
    with MerkleLog(tmp_path / "log") as lg:
        _fill(lg, 4)
        forged = LogHead(3, hashlib.sha256(b"other").digest(), {})
        with pytest.raises(AnchorError, match="does not extend"):
            lg.check_extends(forged)
        lg.check_extends(None)
        lg.check_extends(LogHead(4, lg.root(), {}))


@pytest.mark.parametrize(
    "line",
    [
        b'{"batch_id": "b-1","batch_root":"' + b"00" * 32 + b'","batch_size":1,"v":1}',
        b'{"batch_root":"' + b"00" * 32 + b'","batch_id":"b-1","batch_size":1,"v":1}',
        b'{"batch_id":"b-1","batch_root":"' + b"AB" * 32 + b'","batch_size":1,"v":1}',
        b'{"batch_id":"b-1","batch_root":"' + b"00" * 32 + b'","batch_size":1,"v":2}',
        b'{"batch_id":"b-1","batch_root":"' + b"00" * 32 + b'","batch_size":1}',
        b"not json",
        b"",
    ],
)
def test_non_canonical_entries_stop_the_open(tmp_path: Path, line: bytes) -> None:
    path = _anchored_log(tmp_path)
    _rewrite(path, 1, line)
    with pytest.raises(AnchorError, match="line 2"):
        MerkleLog(tmp_path / "log")


def test_duplicate_batch_id_on_disk_stops_the_open(tmp_path: Path) -> None:
    path = _anchored_log(tmp_path)
    _rewrite(path, 2, log_leaf_data("b-1", _root(1), 11))
    with pytest.raises(AnchorError, match="twice"):
        MerkleLog(tmp_path / "log")


def test_corrupt_anchor_record_stops_the_open(tmp_path: Path) -> None:
    _anchored_log(tmp_path)
    heads = tmp_path / "log" / ANCHORS_FILE
    doc = json.loads(heads.read_bytes())
    doc["root"] = "zz"
    heads.write_bytes(json.dumps(doc).encode() + b"\n")
    with pytest.raises(AnchorError, match="anchored head"):
        MerkleLog(tmp_path / "log")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 3)), max_size=40))
def test_replays_never_grow_the_log(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[int, int]]
) -> None:
    directory = tmp_path_factory.mktemp("log")
    first_seen: dict[int, int] = {}
    with MerkleLog(directory) as lg:
        for b, size in ops:
            fixed = first_seen.setdefault(b, size)
            if size == fixed:
                assert lg.append(f"b-{b}", _root(b), size) == list(first_seen).index(b)
            else:
                with pytest.raises(AnchorError):
                    lg.append(f"b-{b}", _root(b), size)
        want = [log_leaf_hash(f"b-{b}", _root(b), s) for b, s in first_seen.items()]
        assert lg.size == len(first_seen)
        assert lg.root() == merkle.root(want)
    with MerkleLog(directory, readonly=True) as lg:
        assert lg.root() == merkle.root(want)


def test_a_log_that_cannot_be_read_releases_its_writer_lock(tmp_path: Path) -> None:
    """The error names the bad line, and the lock is free at once, not when the failed log
    object is collected (the traceback kept here keeps it alive)."""
    import fcntl

    from anchor.log import ENTRIES_FILE, LOCK_FILE, MerkleLog

    (tmp_path / "log").mkdir()
    (tmp_path / "log" / ENTRIES_FILE).write_text('{"not": "an entry"}\n')
    with pytest.raises(AnchorError, match="line 1") as err:
        MerkleLog(tmp_path / "log")
    with open(tmp_path / "log" / LOCK_FILE, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held
    assert err.value is not None
