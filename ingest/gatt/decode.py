"""UUID normalization, dispatch to the right parser, and the JSON the CLI prints.

Devices, captures and people spell a characteristic UUID many ways ('2a37', '0x2A37',
'00002a37-0000-1000-8000-00805f9b34fb'); everything inside speaks the 128-bit lowercase
form (what bleak reports), so comparisons never depend on spelling.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields, is_dataclass
from datetime import datetime
from enum import Enum, IntFlag
from typing import Any

from ingest.gatt.parsers import PARSERS, GattError, GattResult, GattSample
from vitalproof.schema import Quality
from vitalproof.wire.gatt_numbers import BLUETOOTH_BASE_SUFFIX, full_uuid, short_uuid
from vitalproof.wire.ieee11073 import MderFloat

__all__ = ["SUPPORTED", "ble_decode_cli", "decode", "normalize_uuid", "parse_hex", "to_json"]

#: Full UUID -> characteristic name, for everything :func:`decode` understands.
SUPPORTED: dict[str, str] = {full_uuid(u): cls.NAME for u, (cls, _) in PARSERS.items()}

_FULL_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHORT_RE = re.compile(r"(?:0x)?([0-9a-f]{4}|[0-9a-f]{8})")


def normalize_uuid(uuid: str) -> str:
    """The 128-bit lowercase UUID of a supported characteristic.

    Accepts 16-bit ('2a37', '0x2A37'), 32-bit ('00002a37') and 128-bit forms, any case,
    surrounding whitespace ignored. Raises :class:`GattError` for a malformed UUID and for
    one we have no parser for (better to refuse than to pass bytes through undecoded).
    """
    text = uuid.strip().lower() if isinstance(uuid, str) else ""
    m = _SHORT_RE.fullmatch(text)
    if m:
        full = f"{int(m.group(1), 16):08x}{BLUETOOTH_BASE_SUFFIX}"
    elif _FULL_RE.fullmatch(text):
        full = text
    else:
        raise GattError(repr(uuid), "not a Bluetooth UUID", problem="invalid uuid")
    if full not in SUPPORTED:
        known = ", ".join(sorted(short_uuid(u) for u in SUPPORTED))
        raise GattError(full, f"no parser for this characteristic (supported: {known})",
                        problem="unknown characteristic")  # fmt: skip
    return full


def decode(uuid: str, data: bytes | bytearray | memoryview) -> GattResult:
    """Parse one characteristic value; every failure is a :class:`GattError`."""
    full = normalize_uuid(uuid)
    _, parse = PARSERS[int(full[:8], 16)]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise GattError(full, f"value must be bytes, not {type(data).__name__}")
    return parse(bytes(data))


def parse_hex(uuid: str, hex_str: str) -> bytes:
    """Bytes from hex as people paste it: '10 48 00', '10:48:00', '0x104800', any case.

    A bad digit is reported with the index of the byte it belongs to.
    """
    text = hex_str.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    digits = re.sub(r"[\s:\-]", "", text)
    for i, ch in enumerate(digits):
        if ch not in "0123456789abcdefABCDEF":
            raise GattError(uuid, f"{ch!r} is not a hex digit", offset=i // 2, problem="bad hex")
    if len(digits) % 2:
        raise GattError(
            uuid, "odd number of hex digits (last byte incomplete)",
            offset=len(digits) // 2, problem="bad hex",
        )  # fmt: skip
    return bytes.fromhex(digits)


def _quality_names(q: Quality) -> list[str]:
    return [f.name for f in Quality if f and f in q and f.name]


def _reading(s: GattSample) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "metric": s.metric.value,
        "value": None if math.isnan(s.value) else s.value,
        "unit": s.unit,
        "quality": _quality_names(s.quality),
    }
    if s.timestamp is not None:
        doc["timestamp"] = s.timestamp.isoformat()
    return doc


def _jsonable(v: object) -> Any:
    """Characteristic fields as plain JSON: enums by name, flags as name lists, NaN -> null."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, GattSample):
        return _reading(v)
    if isinstance(v, MderFloat):
        return None if v.is_special else v.value
    if isinstance(v, IntFlag):
        names = [f.name.lower() for f in type(v) if f in v and f.name]
        unknown = int(v) & ~sum(int(f) for f in type(v))
        return names + ([f"0x{unknown:x}"] if unknown else [])
    if isinstance(v, Enum):
        return v.name.lower()
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, int):
        return v
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in fields(v)}
    raise TypeError(f"cannot serialize {type(v).__name__}")


def to_json(result: GattResult) -> dict[str, Any]:
    """``{"characteristic": "2a37", "name": ..., "readings": [...], <fields>}``.

    Readings carry metric, value (null when INVALID), unit, quality flag names and, when
    the device sent one, an ISO-8601 timestamp without zone (device local time).
    """
    doc: dict[str, Any] = {
        "characteristic": f"{result.UUID16:04x}",
        "name": result.NAME,
        "readings": [_reading(s) for s in result.samples],
    }
    for f in fields(result):
        if f.name != "samples":
            doc[f.name] = _jsonable(getattr(result, f.name))
    return doc


def ble_decode_cli(uuid: str, hex_str: str) -> tuple[int, str]:
    """(exit code, text) for ``vitalproof ble decode``: 0 and JSON, or 2 and one error line."""
    try:
        full = normalize_uuid(uuid)
        result = decode(full, parse_hex(full, hex_str))
        return 0, json.dumps(to_json(result), indent=2, allow_nan=False)
    except GattError as e:
        line = " ".join(str(e).split())
        return 2, f"error: {line}"
