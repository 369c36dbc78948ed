"""The demo's clinicians: two of them, with different grants, watch the fleet live through
`vitalproof serve`, and afterwards every reading each received is checked against what
their consent covers among what was sealed (nothing missing, nothing more).

Dr A holds heart rate and SpO2 of the first half of the patients; Dr B every vital sign of
the other half. Both subscribe to "every patient who consented to me" over WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vitalproof.cli import processes
from vitalproof.settings import Settings

ACTOR = "Operator/demo"
log = logging.getLogger(__name__)


@dataclass
class Clinician:
    subject: str
    patients: frozenset[str]
    metrics: frozenset[str] | None  # None: all vital signs
    token: str = ""
    subscription: str = ""
    received: set[str] = field(default_factory=set)
    events: int = 0
    reconnects: int = 0
    device_events: int = 0


@dataclass
class ClinicCounts:
    subscribers: int = 0
    readings_delivered: int = 0
    deliveries_refused: int = 0
    audit_records: int = 0
    deliveries_unexpected: int = 0  # received but not covered by consent (must be 0)
    deliveries_missing: int = 0  # covered and sealed but never received (must be 0)
    problems: list[str] = field(default_factory=list)  # what was missed, where and when


class DemoClinic:
    def __init__(self, rs: Settings, patients: list[str]) -> None:
        half = len(patients) // 2 or 1
        self.rs = rs
        self.clinicians = [
            Clinician(
                "Practitioner/demo-dr-a",
                frozenset(patients[:half]),
                frozenset({"heart_rate", "spo2"}),
            ),
            Clinician("Practitioner/demo-dr-b", frozenset(patients[half:]), None),
        ]
        self.url = ""
        self._proc: processes.Child | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, port: int | None = None) -> None:
        from clinic.audit import AuditLog
        from clinic.auth import DevIssuer
        from clinic.consent import ALL_VITALS
        from clinic.consent_audit import record_consent_change
        from clinic.consent_store import ConsentStore
        from clinic.service.context import clinic_dir
        from vitalproof.devstack.procs import free_ports

        rs = self.rs
        with ConsentStore(rs.paths.consent_path) as store, AuditLog(rs.paths.audit_path) as audit:
            for c in self.clinicians:
                for patient in sorted(c.patients):
                    g = store.grant(
                        patient_id=patient,
                        grantee=c.subject,
                        metrics=c.metrics or frozenset({ALL_VITALS}),
                        purpose="TREAT",
                        actor=ACTOR,
                    )
                    record_consent_change(
                        audit, actor=ACTOR, role="operator", grant=g, change="granted"
                    )
        issuer = DevIssuer(clinic_dir(rs))
        for c in self.clinicians:
            c.token = issuer.issue(c.subject, "clinician", ["user/Observation.rs"], ttl_s=3600)
        if port is None:
            (port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self._proc = processes.start(
            rs,
            "serve",
            "--port",
            str(port),
            log=rs.paths.home / "logs" / f"serve-{rs.namespace}.log",
        )
        deadline = time.monotonic() + 60
        while (await asyncio.to_thread(self._status)).get("fanout") != "ready":
            if self._proc.poll() is not None:
                raise RuntimeError(f"vitalproof serve exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the clinician service's fan-out did not get ready in 60 s")
            await asyncio.sleep(0.3)
        for c in self.clinicians:
            body = await asyncio.to_thread(
                self._post, "/fhir/Subscription", c.token, {"patients": None, "metrics": None}
            )
            c.subscription = str(body["id"])
            self._tasks.append(asyncio.create_task(self._watch(c)))

    def _describe_missing(
        self, c: Clinician, missing: set[str], sealed: pa.Table, ids: pa.Array
    ) -> str:
        """Which of the covered readings never reached ``c``: where they were in vitals.clean
        and when they were received, against the whole run, so a miss at the start (the
        fan-out not yet reading), in the middle (a lost connection) or at the end (the
        fan-out behind) can be told apart."""
        rows = sealed.filter(pc.is_in(ids, value_set=pa.array(sorted(missing))))
        rx = pc.cast(sealed["receive_time"], pa.int64())
        t0 = pc.min(rx).as_py() or 0
        mrx = pc.cast(rows["receive_time"], pa.int64())
        where = sorted(
            {(p, o) for p, o in zip(
                rows["clean_partition"].to_pylist(), rows["clean_offset"].to_pylist(), strict=True
            )},
            key=lambda po: (po[0] is None, po),
        )  # fmt: skip
        return (
            f"{c.subject} missed {len(missing)} covered readings (of {len(c.received)} "
            f"received, {c.reconnects} reconnects), received by the collector "
            f"{(pc.min(mrx).as_py() - t0) / 1e6:.1f}-{(pc.max(mrx).as_py() - t0) / 1e6:.1f} s "
            f"into the run (which lasted {(pc.max(rx).as_py() - t0) / 1e6:.1f} s), "
            f"vitals.clean partition/offset {where[:6]}{' ...' if len(where) > 6 else ''}"
        )

    def _status(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + "/status", timeout=2) as r:
                result: dict[str, Any] = json.load(r)
                return result
        except OSError:
            return {}

    def _post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            result: dict[str, Any] = json.load(r)
            return result

    async def _watch(self, c: Clinician) -> None:
        """Follow ``c``'s subscription as a client should: a connection that ends (the
        service restarting, a ping missed on a loaded machine) is opened again from the last
        event number received, so the service replays exactly what was missed."""
        import websockets

        ws_url = self.url.replace("http", "ws", 1)
        while True:
            uri = f"{ws_url}/stream/ws/{c.subscription}?access_token={c.token}&since={c.events}"
            try:
                async with websockets.connect(uri, max_size=None) as ws:
                    async for text in ws:
                        msg = json.loads(text)
                        for entry in msg["entry"][1:]:
                            resource = entry["resource"]
                            if "reading_id" in resource:
                                c.received.add(resource["reading_id"])
                            else:  # a device event (gap, reset, clock jump) of a patient
                                c.device_events += 1
                            c.events = max(c.events, int(resource["n"]))
            except (websockets.ConnectionClosed, OSError) as e:
                log.info("%s: stream ended (%s); again from event %d", c.subject, e, c.events)
            c.reconnects += 1
            await asyncio.sleep(0.5)

    async def finish(self, sealed: pa.Table, *, keep_serving: bool = False) -> ClinicCounts:
        """Wait until every sealed reading a clinician's consent covers has reached them, or
        until deliveries stop growing for 15 s (the fan-out is a separate consumer and may be
        behind the sealer on a loaded machine), then check them against consent and stop."""
        from clinic.audit import AuditLog
        from streams import lake

        counts = ClinicCounts(subscribers=len(self.clinicians))
        ids = lake.hex_ids(sealed["reading_id"])
        metric = pc.cast(sealed["metric"], pa.string())
        patient = pc.cast(sealed["patient_id"], pa.string())
        covered: list[set[str]] = []
        for c in self.clinicians:
            mask = pc.is_in(patient, value_set=pa.array(sorted(c.patients)))
            if c.metrics is not None:
                mask = pc.and_(mask, pc.is_in(metric, value_set=pa.array(sorted(c.metrics))))
            covered.append(set(ids.filter(mask).to_pylist()))
        last, stalled_at = -1, time.monotonic() + 15
        while time.monotonic() < stalled_at:
            if all(cov <= c.received for c, cov in zip(self.clinicians, covered, strict=True)):
                break
            now = sum(len(c.received) for c in self.clinicians)
            if now != last:
                last, stalled_at = now, time.monotonic() + 15
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)  # anything not covered would arrive with the covered ones
        for c, task in zip(self.clinicians, self._tasks, strict=True):
            if task.done() and task.exception() is not None:
                counts.problems.append(f"{c.subject}'s stream reader failed: {task.exception()!r}")
        status = await asyncio.to_thread(self._status)
        for c, cov in zip(self.clinicians, covered, strict=True):
            counts.deliveries_unexpected += len(c.received - cov)
            counts.deliveries_missing += len(cov - c.received)
            if cov - c.received:
                counts.problems.append(self._describe_missing(c, cov - c.received, sealed, ids))
        counts.readings_delivered = int(status.get("readings_delivered", 0))
        counts.deliveries_refused = int(status.get("deliveries_refused", 0))
        await self.close(keep_serving=keep_serving)
        with AuditLog(self.rs.paths.audit_path) as audit:
            counts.audit_records = audit.size
        return counts

    async def close(self, *, keep_serving: bool = False) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if not keep_serving:
            self.stop_service()

    def sign_in_links(self, patients: list[str], ttl_s: float = 8 * 3600) -> list[tuple[str, str]]:
        """(who, link) for each clinician, two patients and an operator: the dashboard with
        a development token in the link's fragment (which no server log sees)."""
        from clinic.auth import DevIssuer
        from clinic.service.context import clinic_dir

        issuer = DevIssuer(clinic_dir(self.rs))
        links = []
        for c in self.clinicians:
            shares = "every vital sign" if c.metrics is None else ", ".join(sorted(c.metrics))
            token = issuer.issue(
                c.subject, "clinician", ["user/Observation.rs", "user/Consent.rs"], ttl_s=ttl_s
            )
            links.append((f"{c.subject} ({len(c.patients)} patients: {shares})", token))
        for patient in patients:
            token = issuer.issue(
                f"Patient/{patient}", "patient", ["patient/*.cruds"], patient=patient, ttl_s=ttl_s
            )
            links.append((f"Patient/{patient}", token))
        links.append(("Organization/demo-ops (operator)", issuer.issue(
            "Organization/demo-ops", "operator", ["system/*.rs"], ttl_s=ttl_s
        )))  # fmt: skip
        return [(who, f"{self.url}/ui/#token={token}") for who, token in links]

    def stop_service(self) -> None:
        """Stop `vitalproof serve` (idempotent: the demo's cleanup calls it on any exit)."""
        if self._proc is not None:
            processes.stop(self._proc)
            self._proc = None
