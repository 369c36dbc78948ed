"""Sealed rows keep the ``vitals.clean`` record they came from (partition, offset) and their
place among its readings: what the clinician service replays past Kafka's retention from
(:mod:`clinic.lake_replay`). The index counts across every batch one record decoded to, and
survives deduplication (a dropped copy leaves a hole, the kept readings keep their places)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import lake
from streams.lake.keystore import LocalKeystore
from streams.lake.table import CleanPosition, build_table
from streams.sealer import Pending, Sealer
from tests.test_seal_process import batch


def _rows(tmp_path: Path, patient: str) -> list[tuple[int, int, int, int]]:
    t = lake.read_patient(tmp_path, patient, LocalKeystore(tmp_path / "keys"))
    t = t.sort_by([("clean_offset", "ascending"), ("clean_index", "ascending")])
    return list(
        zip(
            t["clean_partition"].to_pylist(),
            t["clean_offset"].to_pylist(),
            t["clean_index"].to_pylist(),
            t["seq"].to_pylist(),
            strict=True,
        )
    )


def test_rows_keep_their_record_and_place_across_batches_and_deduplication(
    tmp_path: Path,
) -> None:
    first, second = batch("dev-1", "pat-1", 3), batch("dev-2", "pat-1", 2, seq0=100)
    copy = batch("dev-1", "pat-1", 4)  # seq 0..2 are copies of `first`, seq 3 is new
    later = batch("dev-3", "pat-2", 2)
    sealer = Sealer(tmp_path, LocalKeystore(tmp_path / "keys"))
    items = [
        Pending("vitals.clean", 2, 40, first),  # one record decoded to two batches
        Pending("vitals.clean", 2, 40, second),
        Pending("vitals.clean", 2, 41, copy),
        Pending("vitals.clean", 0, 7, later),
    ]
    assert sealer.seal(items) is not None
    assert _rows(tmp_path, "pat-1") == [
        (2, 40, 0, 0), (2, 40, 1, 1), (2, 40, 2, 2), (2, 40, 3, 100), (2, 40, 4, 101),
        (2, 41, 3, 3),  # its first three were copies: dropped, the fourth keeps place 3
    ]  # fmt: skip
    assert _rows(tmp_path, "pat-2") == [(0, 7, 0, 0), (0, 7, 1, 1)]


def test_compaction_keeps_every_rows_position(tmp_path: Path) -> None:
    kms = LocalKeystore(tmp_path / "keys")
    sealer = Sealer(tmp_path, kms)
    for k in range(3):  # three batches of one patient-day: compaction merges their files
        b = batch("dev-1", "pat-1", 4, seq0=10 * k)
        assert sealer.seal([Pending("vitals.clean", 1, 5 + k, b)]) is not None
    before = _rows(tmp_path, "pat-1")
    report = lake.compact_lake(tmp_path, kms)
    assert (report.files_in, report.files_out) == (3, 1), report
    assert _rows(tmp_path, "pat-1") == before
    assert [r[1] for r in before] == [5] * 4 + [6] * 4 + [7] * 4


def test_rows_built_without_positions_have_null_positions() -> None:
    t = build_table([batch("dev-1", "pat-1", 3)], "b-1")
    for name in ("clean_partition", "clean_offset", "clean_index"):
        assert t[name].null_count == 3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**40), st.integers(1, 5)), max_size=8))
def test_positions_become_columns_row_for_row(spec: list[tuple[int, int, int]]) -> None:
    batches = [batch(f"dev-{k}", "pat-1", n) for k, (_, _, n) in enumerate(spec)]
    positions = [CleanPosition(p, o, range(3, 3 + n)) for p, o, n in spec]
    t = build_table(batches, "b-1", positions=positions)
    assert t["clean_partition"].to_pylist() == [p for p, _, n in spec for _ in range(n)]
    assert t["clean_offset"].to_pylist() == [o for _, o, n in spec for _ in range(n)]
    assert t["clean_index"].to_pylist() == [i for _, _, n in spec for i in range(3, 3 + n)]
    assert t.schema.field("clean_offset").type == pa.int64()
    assert pc.min(t["clean_index"]).as_py() in (None, 3)
