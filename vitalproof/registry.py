"""The device registry: which device belongs to which (pseudonymous) patient.

A small SQLite file in the state folder: enrollment is rare and local to one gateway site,
while lookups are hot, so normalization keeps an in-memory copy and refreshes it when the file
changes. MQTT credentials are generated here at enrollment and returned once; only the
broker's password file keeps (a hash of) them.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vitalproof.errors import RegistryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    patient_id  TEXT NOT NULL,
    status      TEXT NOT NULL,
    enrolled_us INTEGER NOT NULL,
    retired_us  INTEGER
);
"""


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    patient_id: str
    status: DeviceStatus
    enrolled_us: int
    retired_us: int | None = None


@dataclass(frozen=True, slots=True)
class Enrollment:
    device: Device
    mqtt_password: str  # shown once; the broker keeps only a PBKDF2 hash


#: What :func:`is_valid_id` accepts, in words for error messages.
ID_RULE = "1-64 letters, digits, '-', '_', '.'"


def is_valid_id(value: str) -> bool:
    """A device, patient (or consent grant) id: it ends up in MQTT topics and ACL patterns,
    so no wildcards, separators or spaces."""
    return 0 < len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)


def _valid_id(kind: str, value: str) -> str:
    if not is_valid_id(value):
        raise RegistryError(f"invalid {kind} {value!r}: use {ID_RULE}")
    return value


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)
        self._cache: dict[str, Device] = {}
        self._cache_mtime: float = -1.0

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            yield db

    def enroll(
        self, device_id: str, patient_id: str, *, enrolled_us: int | None = None
    ) -> Enrollment:
        """Enroll ``device_id`` for ``patient_id``, from now or from ``enrolled_us``.

        Normalization flags readings timed before the enrollment (BEFORE_ENROLLMENT), so the
        time must precede the data a device is trusted for. ``enrolled_us`` back-dates it
        for a device whose readings are known to be the patient's from then on (a record
        imported late, a benchmark replaying hours of synthetic readings); not in the future.
        """
        _valid_id("device id", device_id)
        _valid_id("patient id", patient_id)
        now = time.time_ns() // 1000
        at = now if enrolled_us is None else enrolled_us
        if at > now:
            raise RegistryError(f"enrollment time of {device_id} is in the future")
        with self._db() as db:
            row = db.execute(
                "SELECT status FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is not None and row[0] == DeviceStatus.ACTIVE:
                raise RegistryError(f"device {device_id} is already enrolled")
            db.execute(
                "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, NULL)",
                (device_id, patient_id, DeviceStatus.ACTIVE.value, at),
            )
        device = Device(device_id, patient_id, DeviceStatus.ACTIVE, at)
        return Enrollment(device, secrets.token_urlsafe(18))

    def retire(self, device_id: str) -> Device:
        now = time.time_ns() // 1000
        with self._db() as db:
            cur = db.execute(
                "UPDATE devices SET status = ?, retired_us = ? WHERE device_id = ? AND status = ?",
                (DeviceStatus.RETIRED.value, now, device_id, DeviceStatus.ACTIVE.value),
            )
            if cur.rowcount == 0:
                raise RegistryError(f"device {device_id} is not enrolled or already retired")
        device = self.get(device_id)
        assert device is not None
        return device

    def get(self, device_id: str) -> Device | None:
        with self._db() as db:
            row = db.execute(
                "SELECT device_id, patient_id, status, enrolled_us, retired_us "
                "FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return _device(row) if row else None

    def list(self) -> list[Device]:
        with self._db() as db:
            rows = db.execute(
                "SELECT device_id, patient_id, status, enrolled_us, retired_us "
                "FROM devices ORDER BY device_id"
            ).fetchall()
        return [_device(r) for r in rows]

    def lookup(self, device_id: str) -> Device | None:
        """Hot-path lookup from a cached copy, reloaded when the file changed."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = -1.0
        if mtime != self._cache_mtime or device_id not in self._cache:
            self._cache = {d.device_id: d for d in self.list()}
            self._cache_mtime = mtime
        return self._cache.get(device_id)


def _device(row: tuple[str, str, str, int, int | None]) -> Device:
    return Device(row[0], row[1], DeviceStatus(row[2]), row[3], row[4])
