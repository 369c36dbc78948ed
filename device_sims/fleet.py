"""A fleet of simulated wearables publishing to a real MQTT v5 broker.

Each device is what a real one would be to the broker: its own connection, its own
credential (username = device id), QoS 1 publishes of JSON ``SampleBatch`` payloads to
``devices/<device_id>/vitals`` with the MQTT v5 content type set; the connections are
:mod:`device_sims.links`'. This module is the fleet's schedule: when each device measures
and publishes, the faults laid over what it sends, the ground truth, progress and the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_sims.faults import Drop, FaultInjector, FaultSpec, Send, Storm, parse_fault_spec
from device_sims.links import DeviceLinks, ErrorLog
from device_sims.physiology import Profile, SimDevice
from device_sims.record import GroundTruthWriter, valid_reading_ids
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch
from vitalproof.wire import binary
from vitalproof_verify.leaves import reading_id

TOPIC_FORMAT = "devices/{device_id}/vitals"
#: Payload encodings a fleet can publish, by the name ``Fleet(encoding=...)`` takes.
ENCODINGS = {"json": CONTENT_TYPE_JSON, "binary": binary.CONTENT_TYPE_BINARY}
# Faults that rewrite a payload (they parse and re-serialize JSON).
_JSON_ONLY_FAULTS = ("malformed", "skew", "jump", "reset")


@dataclass(frozen=True, slots=True)
class FleetProgress:
    """A snapshot for progress displays (the CLI renders it with rich)."""

    phase: str  # connecting | running | draining | closing | done
    elapsed_s: float
    devices: int
    connected: int  # devices connected right now
    sent: int
    acked: int
    errors: int
    reconnects: int


@dataclass(slots=True)
class FleetReport:
    devices: int
    connected: int  # devices that connected at least once
    messages_sent: int  # publishes handed to the clients (duplicates, malformed included)
    messages_acked: int  # PUBACKs with a success reason code
    readings_sent: int  # distinct reading ids published
    malformed_sent: int
    duplicates_sent: int
    dropped: int  # messages lost by fault injection (never published)
    storms: int
    reconnects: int
    elapsed_s: float  # of the running phase
    error_count: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, one line each

    @property
    def unacked(self) -> int:
        return self.messages_sent - self.messages_acked

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.unacked == 0


class Fleet:
    """Simulate ``devices`` (``(device_id, password)`` pairs) for ``duration_s`` seconds.

    Every device calls its simulator ``rate_hz`` times a second and publishes what it has
    (a tick with no due samples publishes nothing, so ``rate_hz`` is an upper bound unless
    ``accel_hz >= rate_hz``). ``faults`` is a :class:`FaultSpec` or its string form;
    ``record_path`` receives the ground truth (see :mod:`device_sims.record`).
    ``encoding`` is ``"json"`` (default) or ``"binary"`` (:mod:`vitalproof.wire.binary`, for
    high-rate sensors); the MQTT v5 content type names it. The faults that rewrite payloads
    (malformed, skew, jump, reset) work on JSON only.
    """

    def __init__(
        self,
        devices: Sequence[tuple[str, str]],
        host: str,
        port: int,
        rate_hz: float = 1.0,
        duration_s: float = 10.0,
        faults: FaultSpec | str | None = None,
        record_path: Path | str | None = None,
        accel_hz: int = 0,
        tls: ssl.SSLContext | None = None,
        on_progress: Callable[[FleetProgress], None] | None = None,
        *,
        seed: int = 0,
        profile: str | Profile = "adult",
        connect_concurrency: int = 64,
        connect_timeout_s: float = 10.0,
        ack_timeout_s: float = 30.0,
        keepalive_s: int = 60,
        progress_interval_s: float = 0.5,
        topic_format: str = TOPIC_FORMAT,
        encoding: str = "json",
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        ids = [d for d, _ in devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids must be unique")
        self.devices = list(devices)
        self.host, self.port = host, port
        self.rate_hz, self.duration_s = rate_hz, duration_s
        self.faults = faults if isinstance(faults, FaultSpec) else parse_fault_spec(faults)
        self.record_path = Path(record_path) if record_path is not None else None
        self.accel_hz, self.tls, self.on_progress = accel_hz, tls, on_progress
        self.seed, self.profile = seed, profile
        self.connect_concurrency = max(1, connect_concurrency)
        self.connect_timeout_s, self.ack_timeout_s = connect_timeout_s, ack_timeout_s
        self.keepalive_s, self.progress_interval_s = keepalive_s, progress_interval_s
        self.topic_format = topic_format
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        rewriting = [k for k in _JSON_ONLY_FAULTS if getattr(self.faults, k) > 0]
        if encoding != "json" and rewriting:
            raise ValueError(f"faults {', '.join(rewriting)} need encoding='json'")
        self.encoding = encoding
        self._reset()

    def _reset(self) -> None:
        """A run's state: the devices' connections (not yet open) and every count at zero."""
        self._errors = ErrorLog()
        self._links = DeviceLinks(
            self.devices,
            self.host,
            self.port,
            content_type=ENCODINGS[self.encoding],
            topic_format=self.topic_format,
            errors=self._errors,
            on_ack=self._check_drained,
            tls=self.tls,
            seed=self.seed,
            connect_concurrency=self.connect_concurrency,
            connect_timeout_s=self.connect_timeout_s,
            keepalive_s=self.keepalive_s,
        )
        self._sent = 0
        self._malformed = self._duplicates = self._dropped = self._storms = 0
        self._ids: set[str] = set()
        self._phase = "connecting"
        self._t0 = time.monotonic()
        self._run_started = self._run_ended = self._t0
        self._drained = asyncio.Event()

    # -- public ------------------------------------------------------------------------

    async def run(self) -> FleetReport:
        """Connect, simulate, wait for every PUBACK (bounded), disconnect, report."""
        self._reset()
        links = self._links
        injector = FaultInjector(self.faults, self.seed, [d for d, _ in self.devices])
        writer = GroundTruthWriter(self.record_path) if self.record_path else None
        progress = asyncio.get_running_loop().create_task(self._progress_loop())
        try:
            async with links:  # leaving it DISCONNECTs every device
                try:
                    await links.connect_all()
                    self._phase = "running"
                    self._run_started = time.monotonic()
                    await self._simulate(injector, writer)
                    self._run_ended = time.monotonic()
                    self._phase = "draining"
                    self._check_drained()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._drained.wait(), self.ack_timeout_s)
                    if (unacked := self._sent - links.acked - links.ack_failed) > 0:
                        self._errors.add(
                            f"{unacked} messages not acknowledged within {self.ack_timeout_s:g} s"
                        )
                finally:
                    self._phase = "closing"
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            if writer is not None:
                writer.close()
            self._phase = "done"
            self._report_progress()
        return FleetReport(
            devices=len(self.devices),
            connected=links.ever_connected,
            messages_sent=self._sent,
            messages_acked=links.acked,
            readings_sent=len(self._ids),
            malformed_sent=self._malformed,
            duplicates_sent=self._duplicates,
            dropped=self._dropped,
            storms=self._storms,
            reconnects=links.reconnects,
            elapsed_s=self._run_ended - self._run_started,
            error_count=self._errors.count,
            errors=list(self._errors.first),
        )

    async def _simulate(self, injector: FaultInjector, writer: GroundTruthWriter | None) -> None:
        """Every device ticks ``rate_hz`` times a second for ``duration_s``, publishing
        what it measured through the fault layer."""
        loop = asyncio.get_running_loop()
        start_wall_us = time.time_ns() // 1000
        start = loop.time()
        period = 1.0 / self.rate_hz
        n = max(1, len(self.devices))

        def emit(events: list[Drop | Send | Storm]) -> None:
            for ev in events:
                self._handle(ev, writer)

        async def device_loop(index: int, device_id: str) -> None:
            # Devices power on staggered across one period and each runs duration_s,
            # so the load is spread evenly, at the end as well as at the start.
            offset = period * index / n
            t0 = start + offset
            sim = SimDevice(
                device_id,
                self.seed,
                self.profile,
                start_wall_us + round(offset * 1e6),
                self.accel_hz,
            )
            ticks = max(1, math.ceil(self.duration_s * self.rate_hz - 1e-9))
            end_us = sim.start_time_us + round(self.duration_s * 1e6)
            k = 1
            while k <= ticks:
                due = t0 + min(k * period, self.duration_s)
                await asyncio.sleep(max(0.0, due - loop.time()))
                now = loop.time()
                # Device time stops at duration_s, so the data volume is fixed...
                now_us = min(end_us, start_wall_us + round((now - start) * 1e6))
                batch = sim.tick(now_us)
                if batch is not None and not self._links.refused(device_id):
                    emit(injector.apply(device_id, self._encode(batch)))
                # ...and an overloaded loop skips the slots it already missed (the next
                # tick carries their samples in one batch) instead of spiralling: fewer,
                # larger messages, visible in the report as a lower message rate.
                k = max(k + 1, min(ticks, math.floor((now - t0) / period)))

        await asyncio.gather(*(device_loop(i, d) for i, (d, _) in enumerate(self.devices)))
        emit(injector.flush())

    # -- events from the fault layer ---------------------------------------------------

    def _handle(self, ev: Drop | Send | Storm, writer: GroundTruthWriter | None) -> None:
        if isinstance(ev, Send):
            if not self._links.publish(ev.device_id, ev.payload):
                return  # paho refused it: lost, and recorded as an error
            self._sent += 1
            ids = [] if ev.malformed else self._reading_ids(ev.device_id, ev.payload)
            self._ids.update(ids)
            self._malformed += ev.malformed is not None
            self._duplicates += ev.duplicate
            if writer is not None:
                writer.message(
                    ev.device_id,
                    ev.payload,
                    ids,
                    malformed_reason=ev.malformed,
                    duplicate=ev.duplicate,
                )
        elif isinstance(ev, Drop):
            self._dropped += 1
            if writer is not None:
                writer.drop(ev.device_id, self._reading_ids(ev.device_id, ev.payload))
        else:
            self._storms += 1
            if writer is not None:
                writer.storm(ev.device_ids)
            for device_id in ev.device_ids:
                self._links.cut(device_id)

    def _encode(self, batch: SampleBatch) -> bytes:
        if self.encoding == "binary":
            # The topic names the device; float32 only where lossless, so the values the
            # pipeline decodes are the simulator's, as with JSON.
            return binary.encode(batch, with_device=False)
        return batch.to_json()

    def _reading_ids(self, device_id: str, payload: bytes) -> list[str]:
        if self.encoding == "binary":
            b = binary.decode(payload, device_id=device_id)
            return [
                reading_id(device_id, m, q, t)
                for m, q, t in zip(b.metric, b.seq, b.device_time_us, strict=True)
            ]
        return valid_reading_ids(device_id, payload)

    # -- housekeeping ------------------------------------------------------------------

    def _check_drained(self) -> None:
        links = self._links
        if self._phase == "draining" and links.acked + links.ack_failed >= self._sent:
            self._drained.set()

    async def _progress_loop(self) -> None:
        while True:
            self._report_progress()
            await asyncio.sleep(self.progress_interval_s)

    def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        self.on_progress(
            FleetProgress(
                phase=self._phase,
                elapsed_s=time.monotonic() - self._t0,
                devices=len(self.devices),
                connected=self._links.connected_now,
                sent=self._sent,
                acked=self._links.acked,
                errors=self._errors.count,
                reconnects=self._links.reconnects,
            )
        )
