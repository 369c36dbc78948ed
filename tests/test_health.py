"""The health figures' rules without Kafka: consumer lag, rates measured from samples, DLQ
reasons made fit for a metric's label (from the reasons the real rejecting code writes), and
the lake and anchor-log readers on real manifests and a real anchor log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchor.chain import AnchorReceipt
from anchor.errors import AnchorError
from anchor.log import MerkleLog
from clinic.health.figures import (
    MAX_REASONS,
    OTHER_REASONS,
    Consumer,
    DlqTally,
    Offsets,
    Throughput,
    group_lag,
    kafka_figures,
    partition_lag,
    reason_kind,
)
from clinic.health.sources import AnchorWatch, LakeTally
from streams.agents.ports import dlq_headers
from streams.lake.keystore import LocalKeystore
from streams.normalize import Rejection, normalize
from streams.sealer import Pending, Sealer
from vitalproof.errors import WireFormatError
from vitalproof.raw import H_DLQ_REASON, RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch, Transport
from vitalproof.wire import clean

NOW = 1_800_000_000_000_000
DEVICES = {"dev-1": Device("dev-1", "pat-1", DeviceStatus.ACTIVE, 0)}


# -- lag --------------------------------------------------------------------------------------


def test_lag_is_the_records_after_the_committed_offset() -> None:
    assert partition_lag(100, 0, 100, from_start=True) == 0
    assert partition_lag(100, 0, 93, from_start=True) == 7
    # Records removed by retention are not waiting for anyone.
    assert partition_lag(100, 40, 10, from_start=True) == 60


def test_a_group_without_a_commit_lags_by_what_it_will_read() -> None:
    # From the first retained record (the worker, the anchor job) ...
    assert partition_lag(100, 20, None, from_start=True) == 80
    assert partition_lag(100, 20, -1, from_start=True) == 80  # Kafka's "no offset"
    # ... or from the end (the service's live fan-out): nothing to catch up.
    assert partition_lag(100, 20, None, from_start=False) == 0


def test_group_lag_sums_partitions_and_figures_pick_each_groups_own_topic() -> None:
    assert group_lag({0: 10, 1: 5}, {0: 0, 1: 0}, {0: 4}, from_start=True) == 6 + 5
    normalize = Consumer("normalize", "g", "t.raw", from_start=True)
    seal = Consumer("seal", "g", "t.clean", from_start=True)
    anchor = Consumer("anchor", "a", "t.batches", from_start=True)
    figures = kafka_figures(
        {"t.raw": Offsets({0: 10, 1: 10}, {0: 0, 1: 0}), "t.clean": Offsets({0: 4}, {0: 0})},
        {"g": {("t.raw", 0): 10, ("t.raw", 1): 7, ("t.clean", 0): 1}},
        [normalize, seal, anchor],
    )
    assert figures.records == {"t.raw": 20, "t.clean": 4}
    assert [(x.consumer.name, x.records) for x in figures.lag] == [("normalize", 3), ("seal", 3)]
    assert figures.consumed("seal") == 1
    assert figures.consumed("anchor") is None  # its topic does not exist yet


# -- rates ------------------------------------------------------------------------------------


def test_rates_are_the_change_over_the_window() -> None:
    tp = Throughput(window_s=5.0, keep_s=60.0)
    assert tp.add(0.0, {"raw_in": 0}) == {"raw_in": None}  # one sample: no rate yet
    assert tp.add(1.0, {"raw_in": 10}) == {"raw_in": 10.0}
    assert tp.add(2.0, {"raw_in": 30}) == {"raw_in": 15.0}
    for t in range(3, 10):
        rates = tp.add(float(t), {"raw_in": 30})
    assert rates == {"raw_in": 0.0}  # quiet for longer than the window
    assert tp.add(10.0, {"raw_in": 80})["raw_in"] == pytest.approx(50 / 5)


def test_an_unknown_or_reset_counter_has_no_rate_and_history_is_bounded() -> None:
    tp = Throughput(window_s=5.0, keep_s=3.0)
    tp.add(0.0, {"a": 5})
    assert tp.add(1.0, {"a": None}) == {"a": None}  # Kafka did not answer
    assert tp.add(2.0, {"a": 7}) == {"a": 1.0}  # measured against the last known sample
    assert tp.add(3.0, {"a": 2}) == {"a": None}  # a topic recreated: not a negative rate
    tp.add(4.0, {"a": 4})
    tp.add(5.0, {"a": 6})
    columns = tp.columns(("a",))
    assert columns["t"] == [2.0, 3.0, 4.0, 5.0]
    assert columns["a"] == [1.0, None, 2.0, 2.0]


# -- DLQ reasons ------------------------------------------------------------------------------


def _raw(payload: bytes, device: str = "dev-1", unit: str = "/min") -> RawRecord:
    return RawRecord(device, payload, CONTENT_TYPE_JSON, Transport.MQTT, "gw", NOW, "src")


def _reason(raw: RawRecord) -> str:
    out = normalize(raw, DEVICES.get)
    assert isinstance(out, Rejection), out
    return out.reason


def _series(metric: str, unit: str, values: list[object]) -> bytes:
    doc = {
        "schema": 1,
        "series": [
            {
                "metric": metric,
                "unit": unit,
                "t": [NOW + i for i in range(len(values))],
                "seq": list(range(len(values))),
                "v": values,
            }
        ],
    }
    return json.dumps(doc).encode()


def test_reasons_lose_the_names_and_values_they_quote() -> None:
    unknown = [_reason(_raw(_series("heart_rate", "/min", [70]), f"ghost-{i}")) for i in range(3)]
    assert unknown == ["unknown device ghost-0", "unknown device ghost-1", "unknown device ghost-2"]
    assert {reason_kind(r) for r in unknown} == {"unknown device …"}
    assert reason_kind("unknown device alice") == "unknown device …"  # no digit in the id

    not_json = _reason(_raw(b"{heart_rate: 71"))
    assert not_json == "invalid JSON: Expecting property name enclosed in double quotes at byte 1"
    assert reason_kind(not_json) == (
        "invalid JSON: Expecting property name enclosed in double quotes at byte …"
    )
    unit = _reason(_raw(_series("heart_rate", "mmHg", [71])))
    assert "'mmHg'" in unit
    assert reason_kind(unit) == "unit … is not valid for heart_rate (expected …)"
    value = _reason(_raw(_series("heart_rate", "/min", [71, "72 bpm"])))
    assert "72 bpm" in value
    kind = reason_kind(value)
    assert "72" not in kind and "bpm" not in kind and kind.endswith("is not a number")

    with pytest.raises(WireFormatError) as bad_clean:
        clean.decode_record(b"VPC1" + bytes(40))
    assert not any(ch.isdigit() for ch in reason_kind(str(bad_clean.value)))
    assert reason_kind("2a19: battery level must be one byte 0..100, got ff") == (
        "… battery level must be one byte … got …"
    )
    assert reason_kind("") == "unspecified"
    assert len(reason_kind("x " * 200)) <= 80


def test_dlq_tally_counts_the_headers_the_agents_write_by_stage_and_kind() -> None:
    tally = DlqTally()
    for device in ("ghost-1", "ghost-2"):
        reason = _reason(_raw(_series("heart_rate", "/min", [70]), device))
        tally.add(dlq_headers(reason, "normalize", "t/0/1", {"device-id": device.encode()}))
    tally.add(dlq_headers(_reason(_raw(b"nope")), "normalize", "t/0/2", {}))
    tally.add(dlq_headers("clean record shorter than its fixed header", "seal", "t/0/3", {}))
    tally.add({})  # a record with no reason at all still counts
    assert tally.rows() == [
        ("normalize", "unknown device …", 2),
        ("normalize", "invalid JSON: Expecting value at byte …", 1),
        ("seal", "clean record shorter than its fixed header", 1),
        ("other", "unspecified", 1),
    ]
    assert tally.total == 5


def test_dlq_tally_folds_reasons_past_its_bound() -> None:
    tally = DlqTally(max_reasons=3)
    for word in ("alpha", "beta", "gamma", "delta", "epsilon"):
        tally.add({H_DLQ_REASON: f"{word} broke".encode(), "dlq-stage": b"ble"})
    assert len(tally.counts) == 4 and tally.counts[("ble", OTHER_REASONS)] == 2
    assert MAX_REASONS >= 10


# -- the lake's manifests and the anchor log --------------------------------------------------


def _seal(lake: Path, keys: Path, offset: int, n: int) -> int:
    b = SampleBatch(
        device_id="dev-1",
        patient_id="pat-1",
        gateway_id="gw",
        transport=Transport.MQTT,
        receive_time_us=NOW,
    )
    for i in range(n):
        b.add("heart_rate", "/min", NOW + (offset * 100 + i) * 1_000_000, offset * 100 + i, 70.0)
    b.fill_reading_ids()
    manifest = Sealer(lake, LocalKeystore(keys)).seal([Pending("t.vitals.clean", 0, offset, b)])
    assert manifest is not None
    return manifest.sealed_at_us


def test_lake_tally_counts_sealed_readings_and_batches_from_the_manifests(tmp_path: Path) -> None:
    lake, keys = tmp_path / "lake", tmp_path / "keys"
    tally = LakeTally(lake)
    assert (tally.read().readings, tally.read().batches) == (0, 0)  # no lake yet
    _seal(lake, keys, 0, 30)
    last = _seal(lake, keys, 1, 12)
    sealed = tally.read()
    assert (sealed.readings, sealed.batches, sealed.last_sealed_us) == (42, 2, last)
    (lake / "_batches" / "broken.json").write_text("{")  # unreadable: skipped, not fatal
    assert tally.read().readings == 42


def _receipt(block: int, root: bytes, size: int) -> AnchorReceipt:
    return AnchorReceipt(
        chain_id=31337,
        contract="0x" + "11" * 20,
        tx_hash="0x" + f"{block:02x}" * 32,
        block_number=block,
        block_hash="0x" + "22" * 32,
        log_index=0,
        root=root,
        tree_size=size,
        block_timestamp=1_700_000_000 + block,
        gas_used=50_000,
    )


def test_anchor_watch_reads_the_last_receipt_of_the_anchor_log(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    watch = AnchorWatch(folder)
    assert watch.read() is None
    with MerkleLog(folder) as log:
        for size in (1, 2):
            log.append(f"b{size}", bytes([size]) * 32, 10)
            root = log.root()
            log.record_anchor(size, root, _receipt(40 + size, root, size).to_json_dict())
    last = watch.read()
    assert last is not None
    assert (last.tx_hash, last.block_number, last.tree_size, last.anchors) == (
        "0x" + "2a" * 32,
        42,
        2,
        2,
    )
    assert last.age_s(last.block_time + 12.5) == 12.5
    with (folder / "anchors.jsonl").open("ab") as f:
        f.write(b'{"anchor": {"tx_hash"')  # a torn line: never acknowledged, ignored
    assert watch.read() == last
    with (folder / "anchors.jsonl").open("ab") as f:
        f.write(b"\n")
    with pytest.raises(AnchorError):
        watch.read()
