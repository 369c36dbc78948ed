"""The clinician service's fan-out, in process: readings delivered per second to 1,000
subscribers with the consent check on each, and the time from a revocation to the cut.

    .venv/bin/python bench/clinic_bench.py [--subscribers 1000] [--patients 200]
        [--per-clinician 5] [--readings 400000] [--json]

Each clinician holds grants (all vital signs) from ``--per-clinician`` patients and
subscribes to "every patient who consented to me"; readings of every patient are fanned out
as the service's Kafka reader hands them over (clean bundles of 60 readings per device). A
delivery is one reading placed in one subscription (numbered, held for replay) after its
consent check, and noted (per call) with the records it came from, for replay from Kafka.
The revocation figure is the time `Hub.consent_changed` takes to drop the
decisions and close what the revocation emptied; the service runs it every 0.5 s, so the cut
comes at most 0.5 s plus that after the revocation. Not measured here: the network path to a
browser (`tests/test_clinic_live.py` checks it works end to end on the real Kafka).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from clinic.audit import AuditLog
from clinic.auth import Principal, Role, Scope
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.live import Hub, Source
from vitalproof.schema import SampleBatch, Transport

T0 = 1_800_000_000_000_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--per-clinician", type=int, default=5)
    p.add_argument("--readings", type=int, default=400_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run(Path(tmp), args)) if args.json else "", end="")


def run(tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    console = Console(stderr=True)
    store = ConsentStore(tmp / "consent.sqlite3")
    hub = Hub(store, AuditLog(tmp / "audit.sqlite3"))
    scope = (Scope.parse("user/Observation.rs"),)
    with console.status("granting and subscribing"):
        for c in range(args.subscribers):
            who = Principal(f"Practitioner/c{c}", Role.CLINICIAN, scope)
            for k in range(args.per_clinician):
                store.grant(
                    patient_id=f"p{(c * args.per_clinician + k) % args.patients}",
                    grantee=who.subject,
                    metrics=frozenset({ALL_VITALS}),
                    purpose="TREAT",
                    actor="bench",
                )
            hub.subscribe(who, None, None)
    per_batch = 60
    batches = []
    for i in range(args.readings // per_batch):
        patient = f"p{i % args.patients}"
        b = SampleBatch(
            device_id=f"d-{patient}", patient_id=patient, transport=Transport.MQTT,
            receive_time_us=T0,
        )  # fmt: skip
        for j in range(per_batch // 2):
            b.add("heart_rate", "/min", T0 + i * 1000 + j, 2 * (i * 100 + j), 70.0)
            b.add("spo2", "%", T0 + i * 1000 + j, 2 * (i * 100 + j) + 1, 97.0)
        b.fill_reading_ids()
        batches.append(b)
    readings = len(batches) * per_batch
    hub.deliver(batches[:10])  # warm the decision cache as a running service has
    start = time.perf_counter()
    cpu = time.process_time()
    delivered = 0
    for k in range(0, len(batches), 50):  # as the reader hands them over, ~500 records a poll
        # with where they came from, as the reader says (each subscription notes it, for
        # replay from Kafka past what it holds)
        source = Source("vitals.clean", 0, k, k + 49, T0 // 1000)
        delivered += hub.deliver(batches[k : k + 50], source)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    held = max(len(s.held) for s in hub.subscriptions.values())
    segments = max(len(s.segments) for s in hub.subscriptions.values())
    # Revocation to cut: one clinician's grants revoked, then the service's periodic check.
    victim = next(iter(hub.subscriptions.values()))
    for g in store.grants(grantee=victim.principal.subject):
        store.revoke(g.grant_id, actor="bench")
    t = time.perf_counter()
    hub.consent_changed()
    recheck = time.perf_counter() - t
    out = {
        "subscribers": args.subscribers,
        "readings_in": readings,
        "deliveries": delivered,
        "deliveries_per_s": round(delivered / wall),
        "readings_in_per_s": round(readings / wall),
        "cpu_us_per_delivery": round(cpu / max(delivered, 1) * 1e6, 2),
        "max_held_per_subscription": held,
        "max_replay_notes_per_subscription": segments,
        "consent_recheck_ms": round(recheck * 1000, 1),
        "revocation_to_cut_max_ms": round((0.5 + recheck) * 1000, 1),
    }
    table = Table(title="clinician fan-out, in process (consent checked per reading)")
    table.add_column("measure")
    table.add_column("result", justify="right")
    table.add_column("target", justify="right")
    targets = {"deliveries_per_s": ">= 100,000", "revocation_to_cut_max_ms": "<= 1,000"}
    for key, value in out.items():
        table.add_row(key.replace("_", " "), f"{value:,}", targets.get(key, ""))
    console.print(table)
    return out


if __name__ == "__main__":
    main()
