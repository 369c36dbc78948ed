"""Device time: the clock offset estimate per device, and the BEFORE_ENROLLMENT flag.

Properties of the estimator (hypothesis), the flag through the real ``normalize``, the new
field through the wire JSON, the lake table and the exports, and one run through the real
Mosquitto and Kafka with a simulated device whose clock jumps back a day.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ble_collector import consume
from test_pipeline import collector_running, enroll, start_worker, stop, wait_sealed

from device_sims.faults import FaultInjector
from device_sims.fleet import Fleet
from device_sims.record import sent_reading_ids
from streams import lake
from streams.clock import CONFIRM, THRESHOLD_US, WINDOW, ClockEstimator
from streams.lake import export
from streams.lake.keystore import LocalKeystore
from streams.lake.table import _upgrade
from streams.normalize import ENROLLMENT_TOLERANCE_US, PAST_LIMIT_US, normalize
from vitalproof.errors import WireFormatError
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus, Registry
from vitalproof.schema import CONTENT_TYPE_JSON, Quality, SampleBatch, Transport
from vitalproof.settings import Settings

NOW = 1_800_000_000_000_000
HOUR = 3_600_000_000
SKEWS = st.integers(-400 * 24 * HOUR, 400 * 24 * HOUR)
#: Delivery delays of a healthy link: up to a quarter of the jump threshold.
DELAYS = st.integers(0, THRESHOLD_US // 4)


def feed(est: ClockEstimator, skew: int, delays: list[int], dev: str = "d") -> list[int | None]:
    """Observations ``skew + delay`` one by one; the estimate after each."""
    out = []
    for d in delays:
        est.update(dev, skew + d)
        out.append(est.offset(dev))
    return out


# -- the estimator -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(SKEWS, st.lists(DELAYS, min_size=1, max_size=120))
def test_constant_skew_estimate_is_skew_plus_smallest_recent_delay(
    skew: int, delays: list[int]
) -> None:
    est = ClockEstimator()
    for n, got in enumerate(feed(est, skew, delays), start=1):
        assert got is not None
        # never below the true offset (delays are >= 0), never above the best recent delay
        assert skew <= got <= skew + min(delays[max(0, n - WINDOW) : n])


@settings(max_examples=300, deadline=None)
@given(
    SKEWS,
    st.lists(DELAYS, min_size=CONFIRM + 2, max_size=100),
    st.sets(st.integers(0, 49)),
    st.integers(THRESHOLD_US + 1, 30 * 24 * HOUR),
)
def test_single_late_messages_are_not_followed(
    skew: int, delays: list[int], late_at: set[int], lateness: int
) -> None:
    # late messages anywhere except twice in a row (odd positions only), any lateness
    delays = [d + lateness if i % 2 and i // 2 in late_at else d for i, d in enumerate(delays)]
    est = ClockEstimator()
    for got in feed(est, skew, delays):
        assert got is not None and skew <= got <= skew + THRESHOLD_US // 4
    assert est.jumps == 0


@settings(max_examples=300, deadline=None)
@given(
    SKEWS,
    st.lists(DELAYS, min_size=CONFIRM, max_size=60),
    st.integers(2 * THRESHOLD_US, 400 * 24 * HOUR),
    st.booleans(),
    st.lists(DELAYS, min_size=CONFIRM, max_size=60),
)
def test_a_clock_step_is_followed_within_confirm_messages(
    skew: int, before: list[int], size: int, back: bool, after: list[int]
) -> None:
    step = size if back else -size  # set back: observations rise; set forward: they fall
    est = ClockEstimator()
    feed(est, skew, before)
    got = feed(est, skew + step, after)
    new = skew + step
    # the old estimate holds until CONFIRM messages agree, then the new one is taken
    for i, g in enumerate(got, start=1):
        assert g is not None
        if i < CONFIRM:
            assert skew <= g <= skew + THRESHOLD_US // 4
        else:
            assert new <= g <= new + THRESHOLD_US // 4
    # Every message that followed contributed; checks the same from the event's side:
    batch_est = ClockEstimator()
    events = []
    for i, d in enumerate(before + after):
        o = (skew if i < len(before) else new) + d
        b = SampleBatch("dev", patient_id="p", receive_time_us=NOW)
        b.add("heart_rate", "/min", NOW - o, i, 60.0)
        events += batch_est.observe(b)
    assert len(events) == 1
    ev = events[0]
    assert skew <= ev.old_offset_us <= skew + THRESHOLD_US // 4
    assert new <= ev.new_offset_us <= new + THRESHOLD_US // 4
    assert ev.device_id == "dev" and ev.patient_id == "p" and ev.receive_time_us == NOW


def test_a_backlog_draining_does_not_move_the_estimate() -> None:
    # A device offline for an hour uploads 3,600 one-second messages in a burst: each is
    # late, by less and less, down to the usual delay.
    est = ClockEstimator()
    feed(est, 0, [20_000] * 10)
    backlog = [3600 * 1_000_000 - k * 1_000_000 + 1_000 * k // 100 for k in range(3600)]
    assert all(g == 20_000 for g in feed(est, 0, backlog + [20_000] * 5))
    assert est.jumps == 0


def test_an_early_glitch_is_not_followed_but_a_clock_set_forward_is() -> None:
    est = ClockEstimator()
    feed(est, 0, [10_000] * 10)
    feed(est, -HOUR, [10_000])  # one timestamp an hour ahead: impossible as delay, yet one
    assert est.offset("d") == 10_000
    feed(est, 0, [10_000] * 3)
    assert feed(est, -HOUR, [10_000] * CONFIRM)[-1] == -HOUR + 10_000
    assert est.jumps == 1


def test_devices_are_independent_and_bounded() -> None:
    est = ClockEstimator(max_devices=2)
    feed(est, 5_000_000, [0], "a")
    feed(est, -7_000_000, [0], "b")
    assert (est.offset("a"), est.offset("b")) == (5_000_000, -7_000_000)
    feed(est, 0, [0], "c")
    assert est.offset("a") is None and est.offset("c") == 0  # least recently seen forgotten


def test_rejects_settings_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="confirm"):
        ClockEstimator(window=4, confirm=8)
    with pytest.raises(ValueError, match="threshold"):
        ClockEstimator(threshold_us=0)


def test_observe_uses_the_newest_real_device_time_and_sets_the_field() -> None:
    est = ClockEstimator()
    b = SampleBatch("dev", receive_time_us=NOW)
    b.add("heart_rate", "/min", NOW - 9_000_000, 1, 60.0)
    b.add("heart_rate", "/min", NOW - 4_000_000, 2, 61.0)  # the newest: offset 4 s
    b.add("spo2", "%", NOW, 3, 97.0, int(Quality.ESTIMATED_TIME))  # made-up time: ignored
    assert est.observe(b) == []
    assert b.clock_offset_us == 4_000_000
    only_made_up = SampleBatch("dev", receive_time_us=NOW + 1)
    only_made_up.add("spo2", "%", NOW + 1, 4, 97.0, int(Quality.ESTIMATED_TIME))
    est.observe(only_made_up)
    assert only_made_up.clock_offset_us == 4_000_000  # carries the estimate, learns nothing
    unknown = SampleBatch("new-dev", receive_time_us=NOW)
    unknown.add("spo2", "%", NOW, 1, 97.0, int(Quality.ESTIMATED_TIME))
    est.observe(unknown)
    assert unknown.clock_offset_us is None


def test_event_json_says_what_jumped() -> None:
    est = ClockEstimator()
    events = []
    for i in range(CONFIRM * 3):
        b = SampleBatch("dev", patient_id="p", receive_time_us=NOW + i * 1_000_000)
        skew = 0 if i < CONFIRM else 24 * HOUR
        b.add("heart_rate", "/min", NOW + i * 1_000_000 - skew, i, 60.0)
        events += est.observe(b)
    assert [json.loads(e.to_json()) for e in events] == [
        {
            "kind": "clock_jump",
            "device_id": "dev",
            "patient_id": "p",
            "old_offset_us": 0,
            "new_offset_us": 24 * HOUR,
            "device_time_us": NOW + (2 * CONFIRM - 1) * 1_000_000 - 24 * HOUR,
            "receive_time_us": NOW + (2 * CONFIRM - 1) * 1_000_000,
            "step_us": 24 * HOUR,
        }
    ]
    assert events[0].describe() == (
        "clock jump on dev: offset +0.000 s -> +86400.000 s (step +86400.000 s)"
    )


# -- BEFORE_ENROLLMENT ---------------------------------------------------------------------

ENROLLED = NOW - 2 * HOUR
DEVICES = {"dev-1": Device("dev-1", "pat-1", DeviceStatus.ACTIVE, ENROLLED)}


def normalized_series(series: list[dict[str, Any]]) -> SampleBatch:
    """``series`` from dev-1 through the real ``normalize``, received at NOW."""
    raw = RawRecord(
        "dev-1",
        json.dumps({"schema": 1, "series": series}).encode(),
        CONTENT_TYPE_JSON,
        Transport.MQTT,
        "gw-1",
        NOW,
        "devices/dev-1/vitals",
    )
    out = normalize(raw, DEVICES.get)
    assert isinstance(out, SampleBatch)
    return out


def normalized(times: list[int]) -> SampleBatch:
    n = len(times)
    return normalized_series(
        [{"metric": "heart_rate", "unit": "/min", "t": times, "seq": list(range(n)), "v": [60] * n}]
    )


def test_readings_before_enrollment_are_flagged_not_dropped() -> None:
    times = [
        ENROLLED - HOUR,  # recorded before the device was this patient's
        ENROLLED - ENROLLMENT_TOLERANCE_US - 1,  # just beyond the tolerance
        ENROLLED - ENROLLMENT_TOLERANCE_US,  # within it: clock drift, not flagged
        ENROLLED + 1,
        NOW,
    ]
    out = normalized(times)
    assert out.device_time_us == times, "flags, never drops"
    flagged = [bool(q & Quality.BEFORE_ENROLLMENT) for q in out.quality]
    assert flagged == [True, True, False, False, False]
    assert not any(q & Quality.CLOCK_PAST for q in out.quality)


def test_before_enrollment_and_clock_past_are_independent() -> None:
    long_ago = NOW - PAST_LIMIT_US - HOUR  # a month before receipt *and* before enrollment
    (q,) = normalized([long_ago]).quality
    assert q & Quality.BEFORE_ENROLLMENT and q & Quality.CLOCK_PAST


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([("heart_rate", "/min"), ("body_temperature", "[degF]")]),
            st.sampled_from([-HOUR, -ENROLLMENT_TOLERANCE_US - 1, -ENROLLMENT_TOLERANCE_US, 0]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_before_enrollment_flags_exactly_the_early_samples_in_any_run(
    samples: list[tuple[tuple[str, str], int]],
) -> None:
    # Runs of metrics and units (the per-run fast path, conversions) mixed with early times.
    series = [
        {"metric": m, "unit": u, "t": [ENROLLED + dt], "seq": [i], "v": [98.0]}
        for i, ((m, u), dt) in enumerate(samples)
    ]
    out = normalized_series(series)
    assert len(out) == len(samples)
    for t, q in zip(out.device_time_us, out.quality, strict=True):
        assert bool(q & Quality.BEFORE_ENROLLMENT) == (t < ENROLLED - ENROLLMENT_TOLERANCE_US)


def test_the_flag_fits_the_binary_codecs_quality_byte() -> None:
    assert int(Quality.BEFORE_ENROLLMENT) < 256
    assert "BEFORE_ENROLLMENT" in export.quality_names(int(Quality.BEFORE_ENROLLMENT))


# -- carrying the offset: wire JSON, lake, exports -------------------------------------------


def clean_batch(device: str, offset: int | None, n: int = 3) -> SampleBatch:
    b = SampleBatch(device, patient_id="pat-1", gateway_id="gw", transport=Transport.MQTT)
    b.receive_time_us = NOW
    b.clock_offset_us = offset
    for i in range(n):
        b.add("heart_rate", "/min", NOW - 10_000_000 + i, i, 60.0 + i)
    b.fill_reading_ids()
    return b


def test_wire_json_carries_the_offset_only_when_known() -> None:
    b = clean_batch("dev-1", -1_234_567)
    doc = json.loads(b.to_json())
    assert doc["clock_offset"] == -1_234_567
    assert SampleBatch.from_json(b.to_json()).clock_offset_us == -1_234_567
    assert "clock_offset" not in json.loads(clean_batch("dev-1", None).to_json())
    doc["clock_offset"] = "5"
    with pytest.raises(WireFormatError, match="clock_offset must be an integer"):
        SampleBatch.from_json(json.dumps(doc).encode())


def test_lake_table_and_exports_carry_the_offset() -> None:
    table = lake.build_table(
        [clean_batch("dev-1", 7_000_000), clean_batch("dev-2", None, 2)], "b-1"
    )
    assert table["clock_offset_us"].to_pylist() == [7_000_000] * 3 + [None] * 2
    buf = io.BytesIO()
    export.write_jsonl(table, buf)
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["clock_offset_us"] for r in rows] == [7_000_000] * 3 + [None] * 2
    buf = io.BytesIO()
    export.write_csv(table, buf)
    header, first, *_ = buf.getvalue().decode().splitlines()
    col = header.split(",").index('"clock_offset_us"')
    assert first.split(",")[col] == "7000000"


def test_lake_files_written_before_the_column_read_with_nulls() -> None:
    table = lake.build_table([clean_batch("dev-1", 7_000_000)], "b-1")
    old = table.drop_columns(["clock_offset_us"])
    up = _upgrade(old, lake.SCHEMA)
    assert up.schema.names == lake.SCHEMA.names
    assert up["clock_offset_us"].null_count == old.num_rows


# -- through the real Mosquitto and Kafka ----------------------------------------------------

SEED = 2619  # with FAULTS: clk-0's clock jumps back 24 h at its 4th message, clk-1 never
FAULTS = "jump=0.05"
#: The fleet times samples on the monotonic clock, the collector on the wall clock: allow for
#: their drift apart during a run (offsets below zero by up to this much).
SLACK_US = -100_000


def _clock_shifts(device: str, messages: int) -> list[int]:
    """What the fleet's fault injector adds to the device times of each of its messages."""
    inj = FaultInjector(FAULTS, SEED, ["clk-0", "clk-1"])
    probe = b'{"schema":1,"series":[{"metric":"spo2","unit":"%","t":[0],"seq":[0],"v":[97]}]}'
    return [
        json.loads(inj.apply(device, probe)[0].payload)["series"][0]["t"][0]
        for _ in range(messages)
    ]


async def _events(settings: Settings) -> list[dict[str, Any]]:
    """Every record on vitals.events so far (read for a few seconds)."""
    records = await consume(settings, settings.kafka.topic_events, expect=10**9, timeout_s=5)
    return [json.loads(value) for value, _ in records]


@pytest.mark.integration
def test_skewed_device_reaches_the_lake_with_its_offset_and_flags(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    settings = kafka_topics.evolve(batching={"max_age_s": 1.5})
    shifts = _clock_shifts("clk-0", 40)
    jump_at = next(i for i, s in enumerate(shifts) if s)
    assert shifts[jump_at] < -23 * HOUR and set(shifts[jump_at:]) == {shifts[jump_at]}
    assert not any(_clock_shifts("clk-1", 40)), "the seed no longer gives a clean device"
    true_offset = -shifts[jump_at]  # receive clock minus device clock after the jump
    creds = enroll(settings, 2, prefix="clk")
    registry = Registry(settings.paths.registry_path)
    enrolled = {d.device_id: d.enrolled_us for d in registry.list()}
    record = tmp_path / "truth.jsonl"
    worker = start_worker(settings, tmp_path / "worker.log")
    try:

        async def go() -> tuple[list[str], list[dict[str, Any]]]:
            async with collector_running(settings):
                fleet = Fleet(
                    creds,
                    settings.mqtt.host,
                    settings.mqtt.port,
                    rate_hz=1.0,
                    duration_s=20.0,
                    faults=FAULTS,
                    record_path=record,
                    seed=SEED,
                )
                report = await fleet.run()
                assert report.ok, report.errors
                ids = await wait_sealed(settings, sent_reading_ids(record), within_s=90)
            return ids, await _events(settings)

        ids, events = asyncio.run(go())
    finally:
        stop(worker)
    assert sent_reading_ids(record) <= set(ids), "a reading went missing"

    kms = LocalKeystore(settings.paths.keys_dir)
    sealed = lake.sealed_batch_ids(settings.lake_dir)
    skewed = lake.read_patient(settings.lake_dir, "pat-0", kms, batches=sealed)
    clean = lake.read_patient(settings.lake_dir, "pat-1", kms, batches=sealed)
    assert skewed.num_rows and clean.num_rows

    # The clean device: offset ~ 0 (delivery plus up to one sampling period), never flagged.
    offsets = clean["clock_offset_us"].to_pylist()
    assert all(o is not None and SLACK_US <= o < 3_000_000 for o in offsets), offsets
    assert not any(q & Quality.BEFORE_ENROLLMENT for q in clean["quality"].to_pylist())

    # The skewed device: one jump event, to the injected offset...
    jumps = [e for e in events if e.get("kind") == "clock_jump"]
    assert [e["device_id"] for e in jumps] == ["clk-0"], events
    (jump,) = jumps
    assert SLACK_US <= int(jump["new_offset_us"]) - true_offset < 3_000_000
    assert abs(int(jump["old_offset_us"])) < 3_000_000
    # ...carried by every row that arrived from then on, the old estimate before it.
    rx = pc.cast(skewed["receive_time"], pa.int64()).to_pylist()
    for r, o in zip(rx, skewed["clock_offset_us"].to_pylist(), strict=True):
        assert o is not None
        if r >= int(jump["receive_time_us"]):
            assert SLACK_US <= o - true_offset < 3_000_000
        else:
            assert SLACK_US <= o < 3_000_000
    assert max(rx) > int(jump["receive_time_us"]), "no message after the jump was followed"

    # Readings timed a day back are before enrollment: flagged, all of them, and kept.
    limit = enrolled["clk-0"] - ENROLLMENT_TOLERANCE_US
    t = pc.cast(skewed["device_time"], pa.int64()).to_pylist()
    q = skewed["quality"].to_pylist()
    flagged = [bool(x & Quality.BEFORE_ENROLLMENT) for x in q]
    assert flagged == [ti < limit for ti in t]
    assert any(flagged) and not all(flagged)
