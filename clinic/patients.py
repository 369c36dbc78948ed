"""What a home holds about each patient: lake files and readings, devices, grants, key state.

For operators (``vitalproof patients list``) and for :mod:`clinic.erasure`, which must say
what an erasure is about to make unreadable before it does. Counted from the batch manifests
(the sealer's commit point, which name every file's patient and row count), not by
decrypting: a listing is cheap and works the same for an erased patient. Manifests name
patients by pseudonym; the keystore maps them back (``Kms.patient_of``), except for an
erased patient, whose id went with their keys: their line shows only the pseudonym.

Every store is opened only if it exists: looking never creates a keystore, a registry, a
consent file or an audit log (the same rule as ``lake read``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clinic.audit import AuditLog
from clinic.consent import ConsentStatus
from clinic.consent_store import ConsentStore
from streams.lake.keystore import MASTER_KEY_FILE, LocalKeystore
from streams.lake.layout import BATCHES_DIR
from streams.lake.storage import LakeRoot, open_lake
from streams.ledger import read_manifests
from vitalproof.registry import DeviceStatus, Registry
from vitalproof.settings import Settings

__all__ = ["LakeCounts", "PatientSummary", "Stores", "lake_counts", "list_patients", "stores"]


@dataclass(slots=True)
class LakeCounts:
    """One patient's share of one lake, from its manifests (sealed batches only)."""

    files: int = 0
    readings: int = 0
    batches: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class PatientSummary:
    """A line of ``patients list``."""

    patient_id: str | None  # None: erased (the keystore no longer knows whose data it was)
    pseudonym: str  # the patient's name in the lake and its manifests
    files: int
    readings: int
    batches: int
    bytes: int
    active_devices: int
    active_grants: int
    erased: bool  # keys destroyed and no new key generation opened since

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def lake_counts(root: Path | LakeRoot) -> dict[str, LakeCounts]:
    """Patient pseudonym -> their files, readings, batches and bytes in the lake at ``root``
    (a folder or :func:`streams.lake.storage.open_lake`'s root)."""
    out: dict[str, LakeCounts] = {}
    folder = root / BATCHES_DIR if isinstance(root, Path) else root.child(BATCHES_DIR)
    if isinstance(folder, Path) and not folder.is_dir():
        return out
    for manifest in read_manifests(folder):
        seen: set[str] = set()
        for f in manifest.files:
            c = out.setdefault(f.patient, LakeCounts())
            c.files += 1
            c.readings += f.rows
            c.bytes += f.bytes
            if f.patient not in seen:
                seen.add(f.patient)
                c.batches += 1
    return out


@dataclass(slots=True)
class Stores:
    """The home's stores that exist (None: never created, so it holds nothing)."""

    keystore: LocalKeystore | None
    registry: Registry | None
    consent: ConsentStore | None
    audit: AuditLog | None


@contextmanager
def stores(settings: Settings, *, create: bool = False) -> Iterator[Stores]:
    """Open the home's keystore, registry, consent store and audit log.

    ``create=False``: only those that exist (reading must not create them); ``create=True``:
    the consent store and the audit log are opened (created) too, for a command that writes.
    The keystore and the registry are never created here: what does not exist holds no keys
    and no devices.
    """
    paths = settings.paths
    with ExitStack() as stack:
        keystore = (
            LocalKeystore(paths.keys_dir) if (paths.keys_dir / MASTER_KEY_FILE).exists() else None
        )
        registry = Registry(paths.registry_path) if paths.registry_path.exists() else None
        consent = None
        if create or paths.consent_path.exists():
            consent = stack.enter_context(ConsentStore(paths.consent_path))
        audit = None
        if create or paths.audit_path.exists():
            audit = stack.enter_context(AuditLog(paths.audit_path, readonly=not create))
        yield Stores(keystore, registry, consent, audit)


def list_patients(settings: Settings) -> list[PatientSummary]:
    """Every patient with sealed data in this namespace's lake (``settings.lake_dir``)."""
    counts = lake_counts(open_lake(settings))
    with stores(settings) as s:
        devices: dict[str, int] = {}
        for d in s.registry.list() if s.registry else ():
            if d.status is DeviceStatus.ACTIVE:
                devices[d.patient_id] = devices.get(d.patient_id, 0) + 1
        grants: dict[str, int] = {}
        for g in s.consent.grants() if s.consent else ():
            if g.status is ConsentStatus.ACTIVE:
                grants[g.patient_id] = grants.get(g.patient_id, 0) + 1
        ks = s.keystore
        out = []
        for h, c in counts.items():
            p = None if ks is None else ks.patient_of(h)
            out.append(
                PatientSummary(
                    patient_id=p,
                    pseudonym=h,
                    files=c.files,
                    readings=c.readings,
                    batches=c.batches,
                    bytes=c.bytes,
                    active_devices=0 if p is None else devices.get(p, 0),
                    active_grants=0 if p is None else grants.get(p, 0),
                    erased=ks is not None and ks.pseudonym_erased(h),
                )
            )
        return sorted(out, key=lambda r: (r.patient_id is None, r.patient_id or r.pseudonym))
