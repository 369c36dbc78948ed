"""What follows a partition to its next owner, without Kafka: the dedupe changelog's keys of a
raw partition, the sealer's ledger and recently sealed ids of a clean partition, and the
anchor log's shared entries (refused when they disagree or skip an index)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anchor.errors import AnchorError
from anchor.leader import LogReplica
from anchor.log import LogEntry, MerkleLog
from streams import lake as lakemod
from streams.dedupe import DedupeWindows
from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from tests.test_dedupe import MIN, T0, batch
from tests.test_recently_sealed import rid
from vitalproof.manifest import BatchManifest
from vitalproof.schema import SampleBatch, Transport

CLEAN = "t.vitals.clean"


def test_dedupe_adopts_only_the_assigned_partitions_keys() -> None:
    owner = DedupeWindows(window_us=MIN)
    owner.drop_seen(batch([0, 1], T0), "0:10")
    owner.drop_seen(batch([2, 3], T0 + 1_000_000), "1:20")
    records = owner.drain()
    assert sorted(k for k, _v in records) == [
        f"{T0 // MIN}/0:10".encode(),
        f"{T0 // MIN}/1:20".encode(),
    ]

    heir = DedupeWindows(window_us=MIN)
    assert heir.adopt(records, {1}) == 1  # partition 1's key only
    assert heir.drop_seen(batch([2, 3], T0 + 2_000_000), "1:21") == 2  # seen by the owner
    assert heir.drop_seen(batch([0, 1], T0 + 2_000_000), "0:11") == 0  # partition 0 not taken
    assert heir.adopt(records, {1}) == 0, "a key known already is not added twice"
    heir.drain()

    # A partition given up stops being tracked: its expiry tombstones are its new owner's.
    heir.forget({1})
    heir.drop_seen(batch([50], T0 + 10 * MIN), "0:99")  # far later: old windows expire
    tombstoned = [k for k, v in heir.drain() if v is None]
    assert tombstoned == [f"{T0 // MIN}/0:11".encode()]


def _batch(patient: str, seq: int) -> SampleBatch:
    b = SampleBatch(
        device_id=f"dev-{patient}",
        patient_id=patient,
        gateway_id="gw",
        transport=Transport.MQTT,
        receive_time_us=T0,
    )
    b.add("heart_rate", "/min", T0 + seq * 1_000_000, seq, 60.0 + seq)
    b.fill_reading_ids()
    return b


def test_the_next_owner_of_a_clean_partition_knows_what_was_sealed_from_it(
    tmp_path: Path,
) -> None:
    lake, kms = tmp_path / "lake", LocalKeystore(tmp_path / "keys")
    first = Sealer(lake, kms, adopt_all=False)
    first.adopt([(CLEAN, 0)])
    sealed = first.seal([Pending(CLEAN, 0, o, _batch("p0", o)) for o in range(3)])
    assert sealed is not None and [(c.partition, c.first, c.last) for c in sealed.covers] == [
        (0, 0, 2)
    ]

    heir = Sealer(lake, kms, adopt_all=False)
    # Before adopting partition 0 it holds only its ledger (offsets), not its reading ids.
    assert heir.recent((CLEAN, 0)).isdisjoint(sealed_ids(sealed, lake, kms))
    heir.adopt([(CLEAN, 0)])
    assert not heir.recent((CLEAN, 0)).isdisjoint(sealed_ids(sealed, lake, kms))
    assert heir.recent((CLEAN, 1)).isdisjoint(sealed_ids(sealed, lake, kms))
    # Redelivered offsets are skipped; a reading sealed before, again at a new offset (a
    # replay of normalize), is dropped; a new one is sealed.
    assert heir.seal([Pending(CLEAN, 0, 1, _batch("p0", 1))]) is None
    again = heir.seal(
        [Pending(CLEAN, 0, 3, _batch("p0", 2)), Pending(CLEAN, 0, 4, _batch("p0", 7))]
    )
    assert again is not None and again.rows == 1


def sealed_ids(manifest: BatchManifest, lake: Path, kms: LocalKeystore) -> set[str]:
    ids: set[str] = set()
    for f in manifest.files:
        ids.update(lakemod.read_reading_ids(lake, f.path, kms))
    return ids


def _entry(name: str) -> LogEntry:
    return LogEntry(name, bytes.fromhex(rid(name) * 2), 3)


def test_the_shared_anchor_log_is_replayed_in_order_and_refuses_two_histories(
    tmp_path: Path,
) -> None:
    replica = LogReplica("127.0.0.1:9", "t.vitals.anchor-log")  # never connects here
    with MerkleLog(tmp_path / "log") as log:
        assert replica._apply(log, 0, _entry("b0").leaf_data()) == 1
        assert replica._apply(log, 1, _entry("b1").leaf_data()) == 1
        assert replica._apply(log, 1, _entry("b1").leaf_data()) == 0  # a repeat: nothing
        assert log.size == 2 and log.entry(1).batch_id == "b1"
        with pytest.raises(AnchorError, match="two histories"):
            replica._apply(log, 0, _entry("bX").leaf_data())
        with pytest.raises(AnchorError, match="a gap"):
            replica._apply(log, 3, _entry("b3").leaf_data())
        assert log.size == 2
