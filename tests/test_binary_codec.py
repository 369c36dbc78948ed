"""The binary encoding (vitalproof.wire.binary): round trips, equivalence with JSON, hostile
bytes, sizes, and a binary fleet through the real Mosquitto -> collector -> Kafka -> normalize.
"""

from __future__ import annotations

import asyncio
import math
import struct

import pytest
from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sims.fleet import Fleet
from device_sims.physiology import SimDevice
from ingest.mqtt.collector import MqttCollector, MqttCredentials
from streams.normalize import normalize
from vitalproof.devstack import collector_credentials, set_device_credentials
from vitalproof.errors import WireFormatError
from vitalproof.raw import RawRecord
from vitalproof.registry import Registry
from vitalproof.schema import CONTENT_TYPE_JSON, Quality, SampleBatch
from vitalproof.settings import Settings
from vitalproof.units import CANONICAL_UNIT, Metric
from vitalproof.wire import binary
from vitalproof.wire.codecs import decode_samples

T0 = 1_732_200_000_000_000
I64 = st.integers(-(2**62), 2**62)
UNITS = st.sampled_from(["", "mmol/L", "[degF]", "kPa", "weird unit µ", "{beats}/min"])


@st.composite
def series_batches(draw: st.DrawFn, *, nan_flags_invalid: bool = True) -> SampleBatch:
    """A device batch already grouped by (metric, unit), as both decoders return it."""
    b = SampleBatch(
        device_id=draw(st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) < 256)),
        tz_offset_min=draw(st.none() | st.integers(-720, 840)),
    )
    keys = draw(
        st.lists(st.tuples(st.sampled_from(list(Metric)), UNITS), min_size=1, max_size=5).map(
            lambda ks: list(dict.fromkeys(ks))
        )
    )
    for metric, unit in keys:
        unit = unit or CANONICAL_UNIT[metric]
        n = draw(st.integers(1, 40))
        regular = draw(st.booleans())
        t0, s0 = draw(I64), draw(st.integers(-(2**40), 2**40))
        if regular:
            period, step = draw(st.integers(0, 10**6)), draw(st.integers(-3, 3))
            times = [t0 + i * period for i in range(n)]
            seqs = [s0 + i * step for i in range(n)]
        else:
            dts = draw(st.lists(st.integers(-(10**9), 10**9), min_size=n - 1, max_size=n - 1))
            dss = draw(st.lists(st.integers(-1000, 1000), min_size=n - 1, max_size=n - 1))
            times, seqs = [t0], [s0]
            for dt, ds in zip(dts, dss, strict=True):
                times.append(times[-1] + dt)
                seqs.append(seqs[-1] + ds)
        values = draw(
            st.lists(
                st.floats(allow_infinity=False, width=draw(st.sampled_from([32, 64]))),
                min_size=n,
                max_size=n,
            )
        )
        quality = draw(st.lists(st.integers(0, 127), min_size=n, max_size=n))
        for t, s, v, q in zip(times, seqs, values, quality, strict=True):
            if math.isnan(v) and nan_flags_invalid:
                q |= Quality.INVALID  # what both decoders say about a value that is no number
            b.add(metric.value, unit, t, s, v, q)
    return b


def same(a: SampleBatch, b: SampleBatch) -> bool:
    """Equal, NaN equal to NaN (dataclass equality compares NaN unequal)."""
    if [math.isnan(v) for v in a.value] != [math.isnan(v) for v in b.value]:
        return False
    nan_free = [0.0 if math.isnan(v) else v for v in a.value]
    other = [0.0 if math.isnan(v) else v for v in b.value]
    return (
        a.device_id == b.device_id
        and a.tz_offset_min == b.tz_offset_min
        and (a.metric, a.unit, a.device_time_us, a.seq, a.quality)
        == (b.metric, b.unit, b.device_time_us, b.seq, b.quality)
        and [struct.pack("<d", v) for v in nan_free] == [struct.pack("<d", v) for v in other]
    )


@given(series_batches())
@settings(max_examples=150, deadline=None)
def test_round_trip(batch: SampleBatch) -> None:
    for with_device in (True, False):
        data = binary.encode(batch, with_device=with_device)
        assert same(binary.decode(data, device_id=batch.device_id), batch)
    assert same(binary.decode(binary.encode(batch)), batch)  # the id from the payload


@given(series_batches())
@settings(max_examples=150, deadline=None)
def test_binary_and_json_decode_alike(batch: SampleBatch) -> None:
    via_json = decode_samples(CONTENT_TYPE_JSON, batch.to_json(), batch.device_id)
    via_bin = decode_samples(binary.CONTENT_TYPE_BINARY, binary.encode(batch), batch.device_id)
    assert same(via_json, via_bin)


@given(series_batches(nan_flags_invalid=False))
@settings(max_examples=100, deadline=None)
def test_nan_is_flagged_invalid_like_json(batch: SampleBatch) -> None:
    via_json = SampleBatch.from_json(batch.to_json(), device_id=batch.device_id)
    assert same(binary.decode(binary.encode(batch)), via_json)


def test_forced_float32_is_lossy_but_decodes_as_float32() -> None:
    b = SampleBatch("d")
    b.add("accel_x", "m/s2", T0, 0, 9.812)
    out = binary.decode(binary.encode(b, float32=True))
    assert out.value == [struct.unpack("<f", struct.pack("<f", 9.812))[0]]
    assert binary.decode(binary.encode(b)).value == [9.812]  # auto: float64, exact


def test_mixed_sample_order_groups_like_json() -> None:
    """Samples interleaved by time come back grouped by series, exactly as from JSON."""
    batch = SimDevice("dev-1", 3, "dense", T0, accel_hz=50).tick(T0 + 3_000_000)
    assert batch is not None
    via_json = SampleBatch.from_json(batch.to_json(), device_id="dev-1")
    assert same(binary.decode(binary.encode(batch, with_device=False), device_id="dev-1"), via_json)


@given(st.binary(max_size=300))
@settings(max_examples=1000, deadline=None)
def test_arbitrary_bytes_raise_only_wire_format_error(data: bytes) -> None:
    for payload in (data, b"VP\x01" + data, b"VP\x01\x00" + data, b"VP\x01\x02\x3c\x00" + data):
        try:
            binary.decode(payload, device_id="dev-1")
        except WireFormatError as e:
            assert e.offset is not None and 0 <= e.offset <= len(payload)


@given(series_batches())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_truncation_raises_with_offset(batch: SampleBatch) -> None:
    data = binary.encode(batch)
    for cut in range(len(data)):
        with pytest.raises(WireFormatError) as info:
            binary.decode(data[:cut])
        assert info.value.offset is not None and 0 <= info.value.offset <= cut


def test_every_truncation_of_a_sim_payload_raises() -> None:
    batch = SimDevice("dev-1", 1, "adult", T0, accel_hz=50).tick(T0 + 1_000_000)
    assert batch is not None
    data = binary.encode(batch)
    for cut in range(len(data)):
        with pytest.raises(WireFormatError, match="at byte"):
            binary.decode(data[:cut])
    with pytest.raises(WireFormatError, match="trailing"):
        binary.decode(data + b"\x00")


def encoded_one(metric_code: int = 1, flags: int = 0, unit: int = 0) -> bytes:
    return (
        b"VP\x01\x00\x01"
        + bytes([metric_code, flags, unit, 1])
        + struct.pack("<q", T0)
        + (b"\x00\x00\x00" + struct.pack("<f", 72.0))
    )


@pytest.mark.parametrize(
    ("payload", "reason", "offset"),
    [
        (b"XP\x01\x00\x01", "bad magic", 0),
        (b"VP\x02\x00\x01", "unsupported binary version 2", 2),
        (b"VP\x01\x80\x01", "unknown header flags", 3),
        (b"VP\x01\x00\x00", "series missing", 4),
        (encoded_one(metric_code=0), "unknown metric code 0", 5),
        (encoded_one(metric_code=200), "unknown metric code 200", 5),
        (encoded_one(flags=0x40), "unknown series flags", 6),
        (encoded_one(unit=99), "unknown unit code 99", 7),
        (b"VP\x01\x01\x05dev-2\x01", "names device 'dev-2'", 4),
        (b"VP\x01\x00\x01\x01\x00\x00\xff\xff\xff\xff\x0f", "claims", 8),
    ],
)
def test_malformed_payloads_name_reason_and_offset(
    payload: bytes, reason: str, offset: int
) -> None:
    assert binary.decode(encoded_one(), device_id="dev-1").value == [72.0]
    with pytest.raises(WireFormatError, match=reason) as info:
        binary.decode(payload, device_id="dev-1")
    assert info.value.offset == offset


def test_device_id_needed_from_topic_or_payload() -> None:
    with pytest.raises(WireFormatError, match="device_id missing"):
        binary.decode(encoded_one())


def test_metric_codes_are_stable() -> None:
    """Codes are on the wire: this table may only ever grow."""
    assert binary.METRIC_CODES[Metric.HEART_RATE] == 1
    assert binary.METRIC_CODES[Metric.ACCEL_X] == 18
    assert binary.METRIC_CODES[Metric.PPG] == 21
    assert binary.METRIC_CODES[Metric.BATTERY_LEVEL] == 22
    assert sorted(binary.METRIC_CODES.values()) == list(range(1, len(Metric) + 1))


def test_encoder_refuses_what_the_format_cannot_carry() -> None:
    b = SampleBatch("d")
    with pytest.raises(ValueError, match="empty"):
        binary.encode(b)
    b.add("heart_rate", "/min", T0, 0, math.inf)
    with pytest.raises(ValueError, match="infinite"):
        binary.encode(b)
    b.value = [60.0]
    b.patient_id = "p-1"
    with pytest.raises(ValueError, match="device payloads only"):
        binary.encode(b)


def test_sizes_50hz_accel_one_second() -> None:
    """150 accelerometer samples (one second at 50 Hz, three axes): binary vs JSON bytes."""
    b = SampleBatch("watch-001", tz_offset_min=60)
    for i in range(50):
        for axis, v in (("accel_x", 0.12), ("accel_y", -0.3), ("accel_z", 9.81)):
            b.add(axis, "m/s2", T0 + i * 20_000, 3 * i, v + i / 64)
    json_bytes = len(b.to_json())
    f64 = len(binary.encode(b, with_device=False))
    f32 = len(binary.encode(b, with_device=False, float32=True))
    assert f32 < f64 < json_bytes / 3.5
    assert f32 < json_bytes / 7
    # Header 4 + tz 2 + series count 1; per series: metric, flags, unit, count (1 each),
    # t0 8, period 3, seq start 1, step 1, then only the values.
    assert f32 == 4 + 2 + 1 + 3 * (4 + 8 + 3 + 1 + 1 + 50 * 4) == 658


def enroll(settings: Settings, n: int) -> list[tuple[str, str]]:
    registry = Registry(settings.paths.registry_path)
    creds = [(f"bin-{i}", registry.enroll(f"bin-{i}", f"pat-{i}").mqtt_password) for i in range(n)]
    set_device_credentials(settings, dict(creds))
    return creds


@pytest.mark.integration
def test_binary_fleet_through_collector_normalizes(kafka_topics: Settings) -> None:
    """Binary payloads with 50 Hz accel: Mosquitto -> collector -> vitals.raw -> normalize."""
    settings = kafka_topics
    creds = enroll(settings, 4)
    registry = Registry(settings.paths.registry_path)

    async def go() -> tuple[int, list[RawRecord]]:
        user, password = collector_credentials(settings)
        collector = MqttCollector(settings, MqttCredentials(user, password))
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop=stop))
        await asyncio.wait_for(collector.subscribed.wait(), 30)
        fleet = Fleet(
            creds,
            settings.mqtt.host,
            settings.mqtt.port,
            rate_hz=2,
            duration_s=3,
            accel_hz=50,
            encoding="binary",
            seed=7,
        )
        report = await fleet.run()
        assert report.ok, report.errors
        # The collector's ack count has no event to wait on: poll it.
        while collector.stats.acked < report.messages_sent:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        stop.set()
        await task
        consumer = AIOKafkaConsumer(
            settings.kafka.topic_raw,
            bootstrap_servers=settings.kafka.bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        raws: list[RawRecord] = []
        try:
            while len(raws) < report.messages_sent:
                got = await consumer.getmany(timeout_ms=5000)
                if not got:
                    break
                for records in got.values():
                    raws.extend(RawRecord.from_kafka(r.value or b"", r.headers) for r in records)
        finally:
            await consumer.stop()
        return report.readings_sent, raws

    readings_sent, raws = asyncio.run(asyncio.wait_for(go(), 120))
    assert raws and all(r.content_type == binary.CONTENT_TYPE_BINARY for r in raws)
    ids: set[str] = set()
    accel = 0
    for raw in raws:
        out = normalize(raw, registry.lookup)
        assert isinstance(out, SampleBatch), out
        assert out.patient_id == f"pat-{raw.device_id.split('-')[1]}"
        ids.update(out.reading_id)
        accel += out.metric.count("accel_x")
        # What normalization got is exactly what the simulator generated for that device.
        assert all(q & Quality.INVALID == 0 for q in out.quality)
    assert len(ids) == readings_sent
    assert accel >= 4 * 3 * 50  # 3 s of 50 Hz per device
