"""Normalization rules, without Kafka: accept, convert, flag, reject with a reason."""

from __future__ import annotations

import json

from streams.normalize import Rejection, normalize
from vitalproof.raw import RawRecord
from vitalproof.registry import Device, DeviceStatus
from vitalproof.schema import CONTENT_TYPE_JSON, Quality, SampleBatch, Transport

NOW = 1_800_000_000_000_000
DEVICES = {
    "dev-1": Device("dev-1", "pat-1", DeviceStatus.ACTIVE, 0),
    "dev-old": Device("dev-old", "pat-2", DeviceStatus.RETIRED, 0, 1),
}


def raw(payload: dict | bytes, device: str = "dev-1", ctype: str = CONTENT_TYPE_JSON) -> RawRecord:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return RawRecord(device, body, ctype, Transport.MQTT, "gw-1", NOW, f"devices/{device}/vitals")


def series(metric: str, unit: str, values: list, t0: int = NOW) -> dict:
    n = len(values)
    return {
        "metric": metric,
        "unit": unit,
        "t": [t0 + i for i in range(n)],
        "seq": list(range(n)),
        "v": values,
    }


def test_accepts_and_fills_patient_ids_and_transport():
    out = normalize(
        raw({"schema": 1, "series": [series("heart_rate", "/min", [60, 61])]}), DEVICES.get
    )
    assert isinstance(out, SampleBatch)
    assert out.patient_id == "pat-1" and out.gateway_id == "gw-1"
    assert out.transport is Transport.MQTT and out.receive_time_us == NOW
    assert len(set(out.reading_id)) == 2 and out.quality == [0, 0]


def test_converts_units_and_flags_the_conversion():
    out = normalize(
        raw({"schema": 1, "series": [series("body_temperature", "[degF]", [98.6])]}), DEVICES.get
    )
    assert isinstance(out, SampleBatch)
    assert out.unit == ["Cel"] and abs(out.value[0] - 37.0) < 1e-9
    assert out.quality[0] & Quality.CONVERTED


def test_implausible_and_future_readings_are_flagged_not_dropped():
    doc = {
        "schema": 1,
        "series": [
            series("heart_rate", "/min", [400]),
            series("spo2", "%", [97], t0=NOW + 3600 * 10**6),
        ],
    }
    out = normalize(raw(doc), DEVICES.get)
    assert isinstance(out, SampleBatch) and len(out) == 2
    by_metric = dict(zip(out.metric, out.quality, strict=True))
    assert by_metric["heart_rate"] & Quality.IMPLAUSIBLE
    assert by_metric["spo2"] & Quality.CLOCK_FUTURE


def test_rejections_carry_reason_and_original_bytes():
    cases = {
        "unknown device dev-x": raw({"schema": 1}, device="dev-x"),
        "retired device dev-old": raw({"schema": 1}, device="dev-old"),
        "unsupported content type 'text/plain'": raw(b"hi", ctype="text/plain"),
        "invalid JSON": raw(b"{oops"),
        "unit 'mmol/L' is not valid for heart_rate": raw(
            {"schema": 1, "series": [series("heart_rate", "mmol/L", [1])]}
        ),
    }
    for reason, record in cases.items():
        out = normalize(record, DEVICES.get)
        assert isinstance(out, Rejection), reason
        assert reason in out.reason
        assert out.raw.payload == record.payload
