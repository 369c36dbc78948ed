"""BLE gateway end to end on the REAL Kafka: simulated peripherals behind a bleak backend
-> real BleakScanner / establish_connection / BleakClient -> BleCollector -> Kafka."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from device_sims.ble import (
    BloodPressureSim,
    GlucoseMeterSim,
    HeartRateSim,
    PulseOximeterSim,
    SimBleBackend,
    SimPeripheral,
    ThermometerSim,
    WeightScaleSim,
)
from ingest.ble import BleBackend, BleCollector, BleStats, device_id_for
from ingest.ble.session import BATTERY_LEVEL, RACP, racp_report_all, racp_report_from
from ingest.buffered_sink import Envelope
from ingest.gatt import decode
from vitalproof.raw import RawRecord
from vitalproof.schema import CONTENT_TYPE_JSON, Quality, SampleBatch, Transport
from vitalproof.settings import Settings

Record = tuple[bytes, dict[str, bytes]]


async def consume(
    settings: Settings, topic: str, expect: int, timeout_s: float = 30
) -> list[Record]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Record] = []
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while len(out) < expect and loop.time() < end:
            got = await consumer.getmany(timeout_ms=500)
            for msgs in got.values():
                out.extend((m.value or b"", dict(m.headers)) for m in msgs)
        # a little longer: anything beyond `expect` would be a duplicate or stray record
        got = await consumer.getmany(timeout_ms=500)
        for msgs in got.values():
            out.extend((m.value or b"", dict(m.headers)) for m in msgs)
    finally:
        await consumer.stop()
    return out


def collector(
    settings: Settings, sims: list[SimPeripheral], tmp: Path, **kw: object
) -> BleCollector:
    air = SimBleBackend(sims)
    return BleCollector(
        settings,
        backend=BleBackend(air.scanner, air.client),
        buffer_dir=tmp / "buf",
        reconnect_backoff_s=(0.05, 0.5),
        **kw,  # type: ignore[arg-type]
    )


def sent_good(sims: list[SimPeripheral]) -> int:
    return sum(1 for p in sims for s in p.sent if not s.malformed)


def test_all_profiles_flow_into_vitals_raw(kafka_topics: Settings, tmp_path: Path) -> None:
    s = kafka_topics
    sims: list[SimPeripheral] = [
        HeartRateSim("C0:00:00:00:00:01"),
        PulseOximeterSim("C0:00:00:00:00:02"),
        ThermometerSim("C0:00:00:00:00:03"),
        BloodPressureSim("C0:00:00:00:00:04"),
        WeightScaleSim("C0:00:00:00:00:05"),
        GlucoseMeterSim("C0:00:00:00:00:06", records=6),
        # Not on the allow-list: must never be connected.
        HeartRateSim("C0:00:00:00:00:99"),
    ]
    allow = {p.address.lower(): f"dev-{p.address[-2:]}" for p in sims[:-1]}

    def enough(st: BleStats) -> bool:
        return st.racp_responses >= 1 and all(len(p.sent) >= 8 for p in sims[:5])

    c = collector(s, sims, tmp_path, allow_list=allow)
    stats = asyncio.run(c.run(until=enough, duration_s=30))
    assert enough(stats), stats
    assert sims[-1].connections == 0 and "C0:00:00:00:00:99" not in c.devices
    assert stats.decode_errors == 0 and len(c.buffer) == 0

    # Device Information and Battery were read at connect.
    info = c.devices["C0:00:00:00:00:06"]
    assert info.model == "GlucoseMeterSim" and info.serial and info.firmware == "1.4.2"
    assert info.battery_level == 87 and info.device_id == "dev-06"

    # Everything the peripherals notified (+ one battery reading each) reached vitals.raw.
    with_readings = [x for p in sims[:-1] for x in p.sent if decode(x.uuid, x.data).samples]
    expected = len(with_readings) + 6
    records = asyncio.run(consume(s, s.kafka.topic_raw, expected))
    assert len(records) == expected == stats.produced

    by_source: dict[str, list[SampleBatch]] = {}
    for value, headers in records:
        raw = RawRecord.from_kafka(value, headers)
        assert raw.transport is Transport.BLE and raw.content_type == CONTENT_TYPE_JSON
        assert raw.gateway_id == s.gateway.id and raw.device_id.startswith("dev-")
        batch = SampleBatch.from_json(raw.payload, device_id=raw.device_id)
        by_source.setdefault(raw.source[4:8], []).append(batch)

    def metrics(src: str) -> set[str]:
        return {m for b in by_source[src] for m in b.metric}

    assert metrics("2a37") == {"heart_rate", "rr_interval"}
    assert metrics("2a5f") == {"spo2", "pulse_rate"}
    assert metrics("2a1c") == {"body_temperature"}
    assert metrics("2a35") >= {"systolic_bp", "diastolic_bp", "mean_arterial_pressure"}
    assert metrics("2a9d") == {"body_weight", "bmi", "body_height"}
    assert metrics("2a18") == {"blood_glucose"}
    assert metrics("2a19") == {"battery_level"}

    # Values match the bytes sent over the air, in order, per characteristic.
    for p in sims[:-1]:
        dev = allow[p.address.lower()]
        for uuid in {x.uuid for x in p.sent}:
            want = [
                smp.value for x in p.sent if x.uuid == uuid for smp in decode(uuid, x.data).samples
            ]
            got = [v for b in by_source.get(uuid[4:8], []) if b.device_id == dev for v in b.value]
            assert len(got) == len(want) and all(
                math.isclose(a, b) for a, b in zip(got, want, strict=True)
            ), (dev, uuid)

    # Device time: characteristic timestamps when present, else receive time + flag.
    hr = by_source["2a37"][0]
    assert all(q & Quality.ESTIMATED_TIME for q in hr.quality)
    temp = by_source["2a1c"][0]
    assert not temp.quality[0] & Quality.ESTIMATED_TIME
    assert temp.device_time_us[0] % 1_000_000 == 0  # whole seconds from the GSS Date Time
    # Glucose: seq is the meter's own Sequence Number, all six records via RACP.
    glucose = by_source["2a18"]
    assert sorted(sq for b in glucose for sq in b.seq) == list(range(6))
    assert sims[5].racp_requests == [racp_report_all()]
    # Per-device seq counters never repeat.
    hr_seqs = [sq for b in by_source["2a37"] for sq in b.seq]
    assert len(hr_seqs) == len(set(hr_seqs))


def test_malformed_bytes_go_to_the_dlq_and_collection_continues(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    s = kafka_topics
    hr = HeartRateSim("C1:00:00:00:00:01", malformed_every=4)
    c = collector(s, [hr], tmp_path)
    stats = asyncio.run(c.run(until=lambda st: st.decode_errors >= 3 and st.readings >= 20))
    bad = [x for x in hr.sent if x.malformed]
    assert stats.decode_errors == len(bad) >= 3
    dlq = asyncio.run(consume(s, s.kafka.topic_dlq, len(bad)))
    assert len(dlq) == len(bad) == stats.produced_dlq
    assert [v for v, _ in dlq] == [x.data for x in bad]  # original bytes, in order
    _, h = dlq[0]
    assert h["dlq-stage"] == b"ble" and h["transport"] == b"ble"
    assert h["device-id"] == device_id_for(hr.address).encode()
    assert h["source"] == b"00002a37-0000-1000-8000-00805f9b34fb"
    assert b"truncated" in h["dlq-reason"] and h["gateway-id"] == s.gateway.id.encode()
    assert int(h["received-us"]) > 0
    # Collection went on after the bad values: good notifications after the first bad one.
    first_bad = hr.sent.index(bad[0])
    assert any(not x.malformed for x in hr.sent[first_bad + 1 :])
    raw = asyncio.run(consume(s, s.kafka.topic_raw, sent_good([hr]) + 1))
    assert len(raw) == sent_good([hr]) + 1


def test_link_drop_reconnects_and_glucose_fetches_only_new_records(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    s = kafka_topics
    bp = BloodPressureSim("C2:00:00:00:00:01", drop_every=5, refuse_connects=1)
    gl = GlucoseMeterSim("C2:00:00:00:00:02", records=3, new_record_every=0)
    c = collector(s, [bp, gl], tmp_path)

    def enough(st: BleStats) -> bool:
        return bp.link_drops >= 2 and bp.connections >= 3 and st.racp_responses >= 1

    stats = asyncio.run(c.run(until=enough, duration_s=30))
    assert enough(stats)
    assert stats.disconnects >= 2 and c.devices[bp.address].connects >= 3
    # Reconnect: the meter is dropped and found again; only records after the last
    # buffered one are requested.
    gl.store_record()
    gl.store_record()
    gl.drop_link()
    c2 = collector(s, [bp, gl], tmp_path)
    asyncio.run(c2.run(until=lambda st: st.racp_responses >= 1, duration_s=30))
    assert gl.racp_requests == [racp_report_all(), racp_report_from(3)]
    records = asyncio.run(consume(s, s.kafka.topic_raw, c.stats.produced + c2.stats.produced))
    assert len(records) == c.stats.produced + c2.stats.produced
    glucose = [
        sq for v, h in records if h["source"][4:8] == b"2a18" for sq in SampleBatch.from_json(v).seq
    ]
    assert sorted(glucose) == [0, 1, 2, 3, 4]
    assert RACP not in {h["source"].decode() for _, h in records}


def test_kafka_unreachable_buffers_on_disk_then_drains_in_order(
    kafka_topics: Settings, tmp_path: Path
) -> None:
    s = kafka_topics
    dead = s.evolve(kafka={"bootstrap": "127.0.0.1:9"})
    hr = HeartRateSim("C3:00:00:00:00:01", malformed_every=5)
    c = collector(dead, [hr], tmp_path)
    stats = asyncio.run(c.run(until=lambda st: st.buffered >= 30, duration_s=30))
    assert stats.buffered >= 30 and stats.produced == 0 and not c.kafka_ready.is_set()
    held = len(c.buffer)
    assert held == stats.buffered and stats.evicted == 0
    order = [r.payload for r in c.buffer.peek(max_records=10_000)]

    # A new gateway process on the same buffer dir, Kafka back: drains everything, in order.
    c2 = collector(s, [], tmp_path)
    assert len(c2.buffer) == held
    stats2 = asyncio.run(c2.run(until=lambda st: len(c2.buffer) == 0, duration_s=30))
    assert len(c2.buffer) == 0 and stats2.produced + stats2.produced_dlq == held
    raw = asyncio.run(consume(s, s.kafka.topic_raw, stats2.produced))
    dlq = asyncio.run(consume(s, s.kafka.topic_dlq, stats2.produced_dlq))
    assert len(raw) + len(dlq) == held
    sent_raw = [
        Envelope.decode(p).value for p in order if Envelope.decode(p).topic == s.kafka.topic_raw
    ]
    assert [v for v, _ in raw] == sent_raw  # one device = one partition: FIFO preserved
    assert [v for v, _ in dlq] == [x.data for x in hr.sent if x.malformed]
    battery = [v for v, h in raw if h["source"] == BATTERY_LEVEL.encode()]
    assert len(battery) == 1


def test_bound_evicts_oldest_and_counts(
    kafka_topics: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = kafka_topics
    dead = s.evolve(kafka={"bootstrap": "127.0.0.1:9"})
    hr = HeartRateSim("C4:00:00:00:00:01")
    c = collector(dead, [hr], tmp_path, buffer_max_records=10, buffer_max_bytes=None)
    with caplog.at_level(logging.WARNING, logger="ingest.buffer"):
        stats = asyncio.run(c.run(until=lambda st: st.buffered >= 25, duration_s=30))
    assert any("evicted" in r.getMessage() for r in caplog.records)
    assert len(c.buffer) == 10
    assert stats.evicted == stats.buffered - 10 >= 15
    assert c.buffer.evicted == stats.evicted
    newest = [r.index for r in c.buffer.peek()]
    assert newest == list(range(stats.buffered - 10, stats.buffered))
    c2 = collector(s, [], tmp_path, buffer_max_records=10, buffer_max_bytes=None)
    assert c2.buffer.evicted == stats.evicted  # the loss count is durable too
    stats2 = asyncio.run(c2.run(until=lambda st: len(c2.buffer) == 0, duration_s=30))
    assert stats2.produced == 10
