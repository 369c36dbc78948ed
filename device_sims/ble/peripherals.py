"""Simulated BLE health peripherals: GATT tables, advertising, notifications and faults.

Split from the radio (:mod:`device_sims.ble.radio`) because a peripheral is what a test
configures and inspects (what it sent, how often it was connected), while the radio is
plumbing that only bleak talks to.

Peripherals notify spec-exact characteristic values written with :mod:`device_sims.gatt_encode`
from :class:`device_sims.physiology.SimDevice` samples (heart rate and RR, SpO2 and pulse,
blood pressure, temperature); weight and glucose, which the physiology model does not
produce, come from the peripheral's own seeded generator. Simulated device time is
compressed: each emission advances the device clock by ``step_s`` while real time
advances by ``interval_s``.

Fault injection: ``malformed_every`` replaces every n-th notification with a truncated
value; ``drop_link()`` (or ``drop_every``) cuts the link as a radio dropout would (the
peripheral advertises again, the client's disconnected callback fires);
``refuse_connects`` makes the next n connection attempts fail like a busy adapter.

Every value a peripheral sends is kept in ``sent`` (characteristic, bytes, malformed?) so
tests can compare what reached Kafka with what went over the air.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from device_sims import gatt_encode as enc
from device_sims.physiology import SimDevice
from vitalproof.units import Metric
from vitalproof.wire.gatt_numbers import Characteristic as C
from vitalproof.wire.gatt_numbers import Service, full_uuid

if TYPE_CHECKING:  # the radio imports the peripherals; this is only for annotations
    from device_sims.ble.radio import SimBleakClient

US = 1_000_000


_DEVICE_INFORMATION = (C.MANUFACTURER_NAME, C.MODEL_NUMBER, C.SERIAL_NUMBER, C.FIRMWARE_REVISION)


def _u(short: int) -> str:
    return full_uuid(short)


@dataclass(frozen=True, slots=True)
class Sent:
    uuid: str
    data: bytes
    malformed: bool


@dataclass(slots=True)
class _Char:
    uuid: str
    properties: tuple[str, ...]
    value: bytes = b""


class SimPeripheral:
    """A BLE peripheral: GATT table, advertising, notifications, faults.

    Subclasses define ``SERVICE``, their measurement characteristics and
    :meth:`measurements` (the values of one emission).
    """

    SERVICE: int = 0
    MEASUREMENTS: tuple[tuple[int, str], ...] = ()  # (uuid16, "notify" | "indicate")

    def __init__(
        self,
        address: str,
        *,
        name: str | None = None,
        seed: int = 1,
        interval_s: float = 0.05,
        step_s: float = 1.0,
        battery: int = 87,
        malformed_every: int = 0,
        drop_every: int = 0,
        refuse_connects: int = 0,
        start_time_us: int | None = None,
        tz_offset_min: int = 0,
    ) -> None:
        self.address = address.upper()
        self.name = name or f"{type(self).__name__}-{self.address[-5:].replace(':', '')}"
        self.rng = random.Random(f"{seed}/{address}")
        self.interval_s = interval_s
        self.step_s = step_s
        self.malformed_every = malformed_every
        self.drop_every = drop_every
        self.refuse_connects = refuse_connects
        self.start_time_us = time.time_ns() // 1000 if start_time_us is None else start_time_us
        self.device_time_us = self.start_time_us
        self.tz = timedelta(minutes=tz_offset_min)
        self.sim = SimDevice(self.address, seed, profile="dense", start_time_us=self.start_time_us)
        self.sent: list[Sent] = []
        self.connections = 0
        self.link_drops = 0
        self._emitted = 0
        self._client: SimBleakClient | None = None
        self.chars: dict[str, _Char] = {}
        for short, prop in self.MEASUREMENTS:
            self.chars[_u(short)] = _Char(_u(short), (prop,))
        self.chars[_u(C.BATTERY_LEVEL)] = _Char(
            _u(C.BATTERY_LEVEL), ("read", "notify"), bytes([battery])
        )
        serial = f"SN{self.rng.randrange(10**8):08d}"
        for short, text in (
            (C.MANUFACTURER_NAME, "Vitalproof Sim"),
            (C.MODEL_NUMBER, type(self).__name__),
            (C.SERIAL_NUMBER, serial),
            (C.FIRMWARE_REVISION, "1.4.2"),
        ):
            self.chars[_u(short)] = _Char(_u(short), ("read",), text.encode())

    # -- what a subclass provides ------------------------------------------------------

    def measurements(self) -> list[tuple[str, bytes]]:
        """Values for one emission: (characteristic uuid, bytes)."""
        raise NotImplementedError

    def malformed(self, uuid: str, good: bytes) -> bytes:
        """A value that cannot parse: cut to the flags byte plus one (always too short)."""
        return good[:1] + b"\xff" if len(good) > 2 else b""

    def on_write(self, uuid: str, data: bytes) -> None:
        raise BleakError(f"sim {self.address}: {uuid} is not writable")

    # -- device-local time ------------------------------------------------------------

    def local_time(self, t_us: int) -> datetime:
        """Device clock as the naive local Date Time a GATT characteristic carries."""
        return (datetime.fromtimestamp(t_us / US, UTC) + self.tz).replace(tzinfo=None)

    def samples(self, metrics: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
        """Advance the device clock by ``step_s`` and return its samples by metric."""
        self.device_time_us += int(self.step_s * US)
        batch = self.sim.tick(self.device_time_us)
        out: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}
        if batch is not None:
            for m, t, v in zip(batch.metric, batch.device_time_us, batch.value, strict=True):
                if m in out:
                    out[m].append((t, v))
        return out

    # -- the air ----------------------------------------------------------------------

    @property
    def advertising(self) -> bool:
        return self._client is None

    def advertisement(self) -> AdvertisementData:
        return AdvertisementData(
            local_name=self.name,
            manufacturer_data={},
            service_data={},
            service_uuids=[_u(self.SERVICE)],
            tx_power=0,
            rssi=-60 - self.rng.randrange(20),
            platform_data=(),
        )

    def drop_link(self) -> None:
        """Radio dropout: the connection is gone without a disconnect request."""
        client = self._client
        if client is not None:
            self.link_drops += 1
            client._link_lost()

    def _attach(self, client: SimBleakClient) -> None:
        self._client = client
        self.connections += 1

    def _detach(self) -> None:
        self._client = None

    async def run(self, deliver: Callable[[str, bytes], bool]) -> None:
        """Emission loop while connected: notify subscribed characteristics."""
        while True:
            await asyncio.sleep(self.interval_s)
            for uuid, good in self.measurements():
                self._emitted += 1
                bad = bool(self.malformed_every) and self._emitted % self.malformed_every == 0
                data = self.malformed(uuid, good) if bad else good
                if deliver(uuid, data):  # unsubscribed values are lost, as over the air
                    self.sent.append(Sent(uuid, data, bad))
            if self.drop_every and self._emitted >= self.drop_every * (self.link_drops + 1):
                self.drop_link()
                return


class HeartRateSim(SimPeripheral):
    """Heart Rate service 0x180D: Heart Rate Measurement with RR intervals, notified."""

    SERVICE = Service.HEART_RATE
    MEASUREMENTS = ((C.HEART_RATE_MEASUREMENT, "notify"),)

    def measurements(self) -> list[tuple[str, bytes]]:
        s = self.samples((Metric.HEART_RATE.value, Metric.RR_INTERVAL.value))
        hr = s[Metric.HEART_RATE.value]
        if not hr:
            return []
        rr = [enc.rr_from_ms(v) for _, v in s[Metric.RR_INTERVAL.value]][:9]
        return [
            (
                _u(C.HEART_RATE_MEASUREMENT),
                enc.encode_heart_rate(int(hr[-1][1]), contact=True, rr_intervals=rr),
            )
        ]


class PulseOximeterSim(SimPeripheral):
    """Pulse Oximeter 0x1822: continuous (notify) every emission, spot-check (indicate)
    every fifth, with its device time stamp."""

    SERVICE = Service.PULSE_OXIMETER
    MEASUREMENTS = ((C.PLX_CONTINUOUS, "notify"), (C.PLX_SPOT_CHECK, "indicate"))

    def measurements(self) -> list[tuple[str, bytes]]:
        s = self.samples((Metric.SPO2.value, Metric.HEART_RATE.value))
        if not s[Metric.SPO2.value] or not s[Metric.HEART_RATE.value]:
            return []
        (t, spo2), pr = s[Metric.SPO2.value][-1], s[Metric.HEART_RATE.value][-1][1]
        out = [(_u(C.PLX_CONTINUOUS), enc.encode_plx_continuous(spo2, pr))]
        if (t // US) % 5 == 0:
            stamp = self.local_time(t)
            out.append((_u(C.PLX_SPOT_CHECK), enc.encode_plx_spot_check(spo2, pr, timestamp=stamp)))
        return out


class ThermometerSim(SimPeripheral):
    """Health Thermometer 0x1809: Temperature Measurement (indicate), body site, stamped."""

    SERVICE = Service.HEALTH_THERMOMETER
    MEASUREMENTS = ((C.TEMPERATURE_MEASUREMENT, "indicate"),)

    def measurements(self) -> list[tuple[str, bytes]]:
        s = self.samples((Metric.SKIN_TEMPERATURE.value,))
        if not s[Metric.SKIN_TEMPERATURE.value]:
            return []
        t, skin = s[Metric.SKIN_TEMPERATURE.value][-1]
        core = round(36.4 + (skin - 33.5) * 0.2, 1)  # core moves a little with the skin
        value = enc.encode_temperature(core, timestamp=self.local_time(t), temperature_type=2)
        return [(_u(C.TEMPERATURE_MEASUREMENT), value)]


class BloodPressureSim(SimPeripheral):
    """Blood Pressure 0x1810: Blood Pressure Measurement (indicate) with pulse, stamped."""

    SERVICE = Service.BLOOD_PRESSURE
    MEASUREMENTS = ((C.BLOOD_PRESSURE_MEASUREMENT, "indicate"),)

    def measurements(self) -> list[tuple[str, bytes]]:
        keys = (Metric.SYSTOLIC_BP.value, Metric.DIASTOLIC_BP.value, Metric.HEART_RATE.value)
        s = self.samples((*keys, Metric.MEAN_ARTERIAL_PRESSURE.value))
        if not s[Metric.SYSTOLIC_BP.value]:
            return []
        t, sys_ = s[Metric.SYSTOLIC_BP.value][-1]
        dia = s[Metric.DIASTOLIC_BP.value][-1][1]
        mean = round(s[Metric.MEAN_ARTERIAL_PRESSURE.value][-1][1])
        pulse = s[Metric.HEART_RATE.value][-1][1] if s[Metric.HEART_RATE.value] else None
        value = enc.encode_blood_pressure(
            sys_, dia, float(mean), timestamp=self.local_time(t), pulse_rate=pulse
        )
        return [(_u(C.BLOOD_PRESSURE_MEASUREMENT), value)]


class WeightScaleSim(SimPeripheral):
    """Weight Scale 0x181D: Weight Measurement (indicate) in kg with BMI and height."""

    SERVICE = Service.WEIGHT_SCALE
    MEASUREMENTS = ((C.WEIGHT_MEASUREMENT, "indicate"),)
    HEIGHT_M = 1.74

    def measurements(self) -> list[tuple[str, bytes]]:
        self.device_time_us += int(self.step_s * US)
        kg = round(72.0 + self.rng.gauss(0, 0.4), 2)
        bmi = round(kg / self.HEIGHT_M**2, 1)
        value = enc.encode_weight(
            kg, timestamp=self.local_time(self.device_time_us), bmi=bmi, height=self.HEIGHT_M
        )
        return [(_u(C.WEIGHT_MEASUREMENT), value)]


class GlucoseMeterSim(SimPeripheral):
    """Glucose 0x1808: stored records served through the Record Access Control Point.

    Nothing is notified spontaneously: the collector writes "report stored records" to
    RACP 0x2A52 (which must have indications enabled, as the profile requires), the meter
    notifies each record (0x2A18, and 0x2A34 context for every third) and then indicates
    the RACP response. Operators supported: all records (0x01) and greater than or equal
    to a sequence number (0x03 with filter type 0x01). A new record is stored every
    ``new_record_every`` emissions while connected, as if the patient measured.
    """

    SERVICE = Service.GLUCOSE
    MEASUREMENTS = (
        (C.GLUCOSE_MEASUREMENT, "notify"),
        (C.GLUCOSE_CONTEXT, "notify"),
        (C.RACP, "write"),
    )

    def __init__(self, address: str, *, records: int = 5, new_record_every: int = 0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(address, **kwargs)
        self.chars[_u(C.RACP)] = _Char(_u(C.RACP), ("write", "indicate"))
        self.new_record_every = new_record_every
        self.records: list[tuple[int, bytes, bytes | None]] = []  # seq, measurement, context
        self.racp_requests: list[bytes] = []
        for _ in range(records):
            self.store_record()

    def store_record(self) -> int:
        seq = len(self.records)
        self.device_time_us += int(self.step_s * US)
        mg_dl = round(95 + self.rng.gauss(0, 12))
        meas = enc.encode_glucose(
            seq, self.local_time(self.device_time_us), time_offset=0,
            concentration=enc.glucose_mg_dl(mg_dl), context_follows=seq % 3 == 0,
        )  # fmt: skip
        ctx = enc.encode_glucose_context(seq, meal=1) if seq % 3 == 0 else None
        self.records.append((seq, meas, ctx))
        return seq

    def measurements(self) -> list[tuple[str, bytes]]:
        if self.new_record_every and self.rng.randrange(self.new_record_every) == 0:
            seq = self.store_record()
            _, meas, ctx = self.records[seq]
            return [(_u(C.GLUCOSE_MEASUREMENT), meas)] + (
                [(_u(C.GLUCOSE_CONTEXT), ctx)] if ctx else []
            )
        return []

    def on_write(self, uuid: str, data: bytes) -> None:
        if uuid != _u(C.RACP):
            super().on_write(uuid, data)
        client = self._client
        if client is None:
            raise BleakError("not connected")
        if _u(C.RACP) not in client._subscribed:
            # ATT error 0xFD: Client Characteristic Configuration Descriptor Improperly Configured
            raise BleakError("sim: RACP written without indications enabled (ATT error 0xFD)")
        self.racp_requests.append(bytes(data))
        client._spawn(self._report(client, bytes(data)))

    async def _report(self, client: SimBleakClient, req: bytes) -> None:
        op = req[0] if req else 0
        operator = req[1] if len(req) > 1 else 0
        if op != 0x01:
            code, selected = 0x02, []  # op code not supported
        elif operator == 0x01 and len(req) == 2:
            code, selected = 0x01, list(self.records)
        elif operator == 0x03 and len(req) == 5 and req[2] == 0x01:
            (low,) = struct.unpack_from("<H", req, 3)
            selected = [r for r in self.records if r[0] >= low]
            code = 0x01
        else:
            code, selected = 0x04, []  # operator not supported
        if code == 0x01 and not selected:
            code = 0x06  # no records found
        for _seq, meas, ctx in selected:
            await asyncio.sleep(0)
            if client._deliver(_u(C.GLUCOSE_MEASUREMENT), meas):
                self.sent.append(Sent(_u(C.GLUCOSE_MEASUREMENT), meas, False))
            if ctx is not None and client._deliver(_u(C.GLUCOSE_CONTEXT), ctx):
                self.sent.append(Sent(_u(C.GLUCOSE_CONTEXT), ctx, False))
        await asyncio.sleep(0)
        client._deliver(_u(C.RACP), bytes([0x06, 0x00, op, code]))
