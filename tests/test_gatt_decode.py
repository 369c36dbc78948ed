"""UUID normalization, dispatch, JSON output, the CLI helper, and fuzzing of decode()."""

from __future__ import annotations

import contextlib
import json
import math
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_sims import gatt_encode as enc
from ingest.gatt import GattError, ble_decode_cli, decode, normalize_uuid, to_json
from ingest.gatt.decode import SUPPORTED, parse_hex
from ingest.gatt.parsers import HeartRateMeasurement
from vitalproof.wire.ieee11073 import Special

HR = "00002a37-0000-1000-8000-00805f9b34fb"


@pytest.mark.parametrize(
    "spelling",
    ["2a37", "2A37", "0x2A37", "0x2a37", " 2a37\n", "00002a37", HR, HR.upper()],
)
def test_normalize_uuid(spelling: str) -> None:
    assert normalize_uuid(spelling) == HR


@pytest.mark.parametrize(
    "bad", ["", "2a3", "2a37x", "zz37", "0x", "2a37-0000", "00002a37-0000-1000-8000-00805f9b34f"]
)
def test_normalize_uuid_invalid(bad: str) -> None:
    with pytest.raises(GattError) as ei:
        normalize_uuid(bad)
    assert ei.value.problem == "invalid uuid"


@pytest.mark.parametrize("unknown", ["2a00", "0x180d", "12345678-1234-5678-1234-567812345678"])
def test_normalize_uuid_unknown(unknown: str) -> None:
    with pytest.raises(GattError) as ei:
        normalize_uuid(unknown)
    assert ei.value.problem == "unknown characteristic"
    assert "2a37" in str(ei.value)


def test_supported_covers_the_brief() -> None:
    shorts = {u[4:8] for u in SUPPORTED}
    assert shorts == {"2a37", "2a5e", "2a5f", "2a1c", "2a35", "2a9d", "2a18", "2a34"}


def test_decode_dispatches() -> None:
    r = decode("0x2A37", bytes([0x06, 72]))
    assert isinstance(r, HeartRateMeasurement) and r.heart_rate == 72
    r2 = decode("2a37", bytearray([0, 1]))
    assert isinstance(r2, HeartRateMeasurement) and r2.heart_rate == 1


def test_to_json_shape() -> None:
    data = enc.encode_blood_pressure(
        120.0,
        Special.NAN,
        93.3,
        timestamp=datetime(2024, 3, 15, 8, 30, 45),
        user_id=3,
        measurement_status=0b001101,
    )
    doc = to_json(decode("2a35", data))
    assert doc["characteristic"] == "2a35"
    assert doc["name"] == "Blood Pressure Measurement"
    assert doc["readings"] == [
        {"metric": "systolic_bp", "value": 120.0, "unit": "mm[Hg]", "quality": [],
         "timestamp": "2024-03-15T08:30:45"},
        {"metric": "diastolic_bp", "value": None, "unit": "mm[Hg]", "quality": ["INVALID"],
         "timestamp": "2024-03-15T08:30:45"},
        {"metric": "mean_arterial_pressure", "value": 93.3, "unit": "mm[Hg]", "quality": [],
         "timestamp": "2024-03-15T08:30:45"},
    ]  # fmt: skip
    assert doc["user_id"] == 3 and doc["kpa"] is False
    assert doc["measurement_status"] == {
        "raw": 13,
        "body_movement_detected": True,
        "cuff_too_loose": False,
        "irregular_pulse_detected": True,
        "pulse_rate_range": "exceeds_upper_limit",
        "improper_measurement_position": False,
    }
    json.dumps(doc, allow_nan=False)


def test_to_json_flags_and_nested_samples() -> None:
    data = enc.encode_plx_continuous(
        97.0, 60.0, fast=(96.0, 61.0), device_sensor_status=(1 << 11) | (1 << 20)
    )
    doc = to_json(decode("2a5f", data))
    assert doc["readings"][0]["quality"] == ["NO_SENSOR_CONTACT"]
    assert doc["fast"]["spo2"] == {
        "metric": "spo2", "value": 96.0, "unit": "%", "quality": ["NO_SENSOR_CONTACT"]
    }  # fmt: skip
    assert doc["slow"] is None
    assert doc["device_sensor_status"] == ["sensor_unconnected_to_user", "0x100000"]


def test_cli_success() -> None:
    code, text = ble_decode_cli("2a37", "16 48 00 04 02 04")
    assert code == 0
    doc = json.loads(text)
    assert doc["characteristic"] == "2a37"
    assert [r["metric"] for r in doc["readings"]] == ["heart_rate", "rr_interval", "rr_interval"]
    assert doc["sensor_contact"] == "detected"


@pytest.mark.parametrize(
    ("uuid", "hex_str", "line"),
    [
        ("2a37", "11 48 00", "error: 2a37: truncated at byte 3: RR interval needs 2 bytes, got 0"),
        ("2a37", "10:48:00", "error: 2a37: truncated at byte 2: RR interval needs 2 bytes, got 1"),
        ("2a37", "", "error: 2a37: truncated at byte 0: Flags needs 1 byte, got 0"),
        ("2a37", "10 4g", "error: 2a37: bad hex at byte 1: 'g' is not a hex digit"),
        ("2a37", "104", "error: 2a37: bad hex at byte 1: odd number of hex digits (last byte "
                        "incomplete)"),
        ("0x2A9D", "00 ff", "error: 2a9d: truncated at byte 1: Weight needs 2 bytes, got 1"),
        ("2a1c", "00 6d 01 00 ff 00", "error: 2a1c: malformed at byte 5: 1 unexpected trailing "
                                      "byte after the last field"),
        ("nope", "00", "error: 'nope': invalid uuid: not a Bluetooth UUID"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line(uuid: str, hex_str: str, line: str) -> None:
    code, text = ble_decode_cli(uuid, hex_str)
    assert (code, text) == (2, line)
    assert "\n" not in text


def test_cli_unknown_uuid_and_newlines_in_input() -> None:
    code, text = ble_decode_cli("2a00", "00")
    assert code == 2 and text.startswith("error: 2a00: unknown characteristic")
    code, text = ble_decode_cli("2a\n37", "00")
    assert code == 2 and "\n" not in text


def test_parse_hex_forms() -> None:
    assert parse_hex(HR, "0x1048") == b"\x10\x48"
    assert parse_hex(HR, " 10-48 0A ") == b"\x10\x48\x0a"


# -- fuzzing: decode never raises anything but GattError, and its JSON always serializes --

UUIDS = sorted(SUPPORTED)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(uuid=st.sampled_from(UUIDS), data=st.binary(max_size=48))
def test_decode_arbitrary_bytes(uuid: str, data: bytes) -> None:
    try:
        r = decode(uuid, data)
    except GattError as e:
        assert e.offset is None or 0 <= e.offset <= len(data)
        assert "\n" not in str(e)
        return
    doc = to_json(r)
    json.dumps(doc, allow_nan=False)
    for s in r.samples:
        assert math.isnan(s.value) == bool(s.quality & 1)


@settings(max_examples=1500)
@given(uuid=st.sampled_from(UUIDS), flags=st.integers(0, 255), rest=st.binary(max_size=40))
def test_decode_any_flags(uuid: str, flags: int, rest: bytes) -> None:
    """Every flags byte with arbitrary fields: reaches fields the plain fuzz rarely does."""
    with contextlib.suppress(GattError):
        json.dumps(to_json(decode(uuid, bytes([flags]) + rest)), allow_nan=False)


@given(uuid=st.text(max_size=40), hex_str=st.text(max_size=40))
def test_cli_never_raises(uuid: str, hex_str: str) -> None:
    code, text = ble_decode_cli(uuid, hex_str)
    assert code in (0, 2)
    if code == 2:
        assert text.startswith("error: ") and "\n" not in text
