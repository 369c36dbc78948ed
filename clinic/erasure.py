"""Erasing a patient (issue 10, item 6; "Patient keys" in docs/invariants.md).

Nothing sealed is rewritten: the lake's files, the batches' manifests (which hold each
patient's subtree root, the upper level of the batch tree) and the anchor log stay byte for
byte, which is why every other patient's proof bundles still verify against the same anchors:
their paths need the erased patient's subtree root, never their leaves. What goes is what
links those bytes to the patient: their keys and salts, destroyed by the keystore
(crypto-shredding), so their files no longer decrypt and their leaves can no longer be
recomputed from a guessed reading. The lake and the manifests name the patient only by
pseudonym, and the keystore's record of whose pseudonym it is goes with the keys: after the
erasure no listing can name them. Around that, the erasure stops everything that
still flows: no new data is accepted from their devices, no clinician may see them any more,
and the audit log records who erased them and why.

The keys are per home (``<home>/keys``), the lake per namespace (``<lake>/<namespace>``, the
lake ``<home>/lake`` or ``VITALPROOF_LAKE``'s folder or S3 prefix):
one erasure destroys the patient's keys for every namespace of the home, so the files counted
unreadable are those of every namespace.

Unknown or already erased, both refused (:class:`UnknownPatient`, :class:`AlreadyErased`):

* *unknown*: nothing in the home has ever held anything of the patient: no key, no tombstone,
  no lake file, no grant, no device, no erasure record. Most likely a typo.
* *already erased*: an erasure record of the patient is in the audit log and nothing is left
  to destroy (no live key generation, no active grant, no active device). If something came
  back since (a new device, new data under a new key generation, a new grant) the patient is
  erased again; if an earlier erasure was interrupted before its audit record, the rerun
  finishes it and records it. So a rerun is always safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clinic.audit import AuditAction, AuditEntry, AuditRecord, Outcome
from clinic.consent import ConsentConflict, ConsentStatus, iso_from_us
from clinic.patients import Stores, lake_counts, stores
from streams.lake.errors import LakeError
from streams.lake.keystore import LocalKeystore
from streams.lake.layout import _check_name, patient_dir
from streams.lake.storage import open_lake_base
from vitalproof.errors import RegistryError, VitalproofError
from vitalproof.registry import ID_RULE, DeviceStatus, is_valid_id
from vitalproof.settings import Settings

__all__ = [
    "AlreadyErased",
    "ErasureError",
    "ErasurePlan",
    "ErasureReport",
    "InvalidPatientId",
    "UnknownPatient",
    "erase_patient",
    "plan_erasure",
]

#: The role of every erasure record: erasing is an operator's act.
ROLE = "operator"


class ErasureError(VitalproofError):
    """A patient cannot be erased (the message says why, in one line)."""


class InvalidPatientId(ErasureError):
    """Not a patient id at all (malformed input: the CLI exits 2)."""


class UnknownPatient(ErasureError):
    """The home has never held anything of this patient."""


class AlreadyErased(ErasureError):
    """The patient was erased and nothing of theirs is left to destroy."""


@dataclass(frozen=True, slots=True)
class ErasurePlan:
    """What erasing a patient would do now (:func:`plan_erasure`; nothing changed yet)."""

    patient_id: str
    has_keys: bool  # a live key generation exists: it will be destroyed
    files: dict[str, int]  # namespace -> the patient's lake files (any batch) there
    readings: int  # in sealed batches, all namespaces (from the manifests)
    grants: list[str]  # active grants, to be revoked
    devices: list[str]  # active devices, to be retired
    previous: AuditRecord | None = None  # the last erasure record of the patient, if any

    @property
    def file_count(self) -> int:
        return sum(self.files.values())

    def describe(self) -> str:
        """One paragraph for a confirmation prompt."""
        keys = "destroys their keys and salts" if self.has_keys else "finds no live key"
        where = ", ".join(f"{n} in {ns}" for ns, n in sorted(self.files.items())) or "none"
        again = ""
        if self.previous is not None:
            again = f" (erased before at {iso_from_us(self.previous.time_us)})"
        return (
            f"erasing patient {self.patient_id}{again} {keys}: {self.file_count} lake files "
            f"({where}; {self.readings} readings) become unreadable for good; revokes "
            f"{len(self.grants)} grants, retires {len(self.devices)} devices"
        )


@dataclass(frozen=True, slots=True)
class ErasureReport:
    """What :func:`erase_patient` did."""

    patient_id: str
    keys_destroyed: bool  # False: there was no live key (erased before, or never had data)
    files_unreadable: int  # the patient's lake files, every namespace of the home
    files_by_namespace: dict[str, int]
    readings_unreadable: int
    grants_revoked: list[str] = field(default_factory=list)
    devices_retired: list[str] = field(default_factory=list)
    audit_seq: int = 0
    erased_at_us: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id,
            "keys_destroyed": self.keys_destroyed,
            "files_unreadable": self.files_unreadable,
            "files_by_namespace": dict(sorted(self.files_by_namespace.items())),
            "readings_unreadable": self.readings_unreadable,
            "grants_revoked": list(self.grants_revoked),
            "devices_retired": list(self.devices_retired),
            "audit_seq": self.audit_seq,
            "erased_at": iso_from_us(self.erased_at_us),
        }


def _check_id(patient_id: str) -> None:
    if not is_valid_id(patient_id):
        raise InvalidPatientId(f"{patient_id!r} is not a patient id ({ID_RULE})")


def _files(
    settings: Settings, patient_id: str, ks: LocalKeystore | None
) -> tuple[dict[str, int], int]:
    """The patient's lake files per namespace of the home (on disk, sealed or not: all of
    them become unreadable), and their readings in sealed batches (the manifests). Both
    name the patient by pseudonym: without a keystore nothing of theirs was sealed here."""
    files: dict[str, int] = {}
    readings = 0
    base = open_lake_base(settings)  # <home>/lake, or the s3:// prefix of VITALPROOF_LAKE
    if ks is None:
        return files, readings
    try:
        _check_name(patient_id, "patient id")
        h = ks.pseudonym(patient_id)
        folder = patient_dir(h)
    except LakeError:  # not a name the lake can hold: the patient has no files
        return files, readings
    for namespace in base.folders():
        root = base.child(namespace)
        n = len(root.files(folder))
        if n:
            files[namespace] = n
        counts = lake_counts(root).get(h)
        readings += 0 if counts is None else counts.readings
    return files, readings


def _plan(settings: Settings, patient_id: str, s: Stores) -> ErasurePlan:
    ks = s.keystore
    files, readings = _files(settings, patient_id, ks)
    has_keys = ks is not None and ks.has_keys(patient_id)
    grants = s.consent.grants(patient_id=patient_id) if s.consent else []
    devices = [d for d in s.registry.list() if d.patient_id == patient_id] if s.registry else []
    previous = None
    if s.audit is not None:
        erasures = [
            r
            for r in s.audit.records(patient_id=patient_id)
            if r.action is AuditAction.ERASURE and r.outcome is Outcome.ALLOWED
        ]
        previous = erasures[-1] if erasures else None
    plan = ErasurePlan(
        patient_id=patient_id,
        has_keys=has_keys,
        files=files,
        readings=readings,
        grants=[g.grant_id for g in grants if g.status is ConsentStatus.ACTIVE],
        devices=[d.device_id for d in devices if d.status is DeviceStatus.ACTIVE],
        previous=previous,
    )
    left = plan.has_keys or plan.grants or plan.devices
    if not left and previous is not None:
        raise AlreadyErased(
            f"patient {patient_id} was already erased at {iso_from_us(previous.time_us)} "
            f"(audit record {previous.seq}); nothing of theirs is left to destroy"
        )
    erased_keys = ks is not None and ks.is_erased(patient_id)
    if not (left or files or grants or devices or erased_keys):
        raise UnknownPatient(
            f"unknown patient {patient_id!r}: no keys, lake files, grants or devices in "
            f"{settings.paths.home}"
        )
    return plan


def plan_erasure(settings: Settings, patient_id: str) -> ErasurePlan:
    """What :func:`erase_patient` would do now, changing nothing and creating no store.

    Raises :class:`InvalidPatientId`, :class:`UnknownPatient` or :class:`AlreadyErased`
    exactly when :func:`erase_patient` would.
    """
    _check_id(patient_id)
    with stores(settings) as s:
        return _plan(settings, patient_id, s)


def erase_patient(settings: Settings, patient_id: str, *, actor: str, reason: str) -> ErasureReport:
    """Erase one patient: stop their intake, end every disclosure, destroy their keys, record it.

    In this order, so that a crash at any point leaves a state a rerun finishes (see the
    module docstring on reruns), and nothing new of theirs is accepted or sealed while the
    keys go:

    1. **Retire their devices** in the registry: normalization rejects readings of a retired
       device from its next registry refresh, so no new data of theirs is accepted. (The CLI
       also removes the devices' logins from the local broker, as ``devices retire`` does;
       another deployment's broker is its own business.)
    2. **Revoke every active consent grant** of theirs (a new, inactive version each; the
       history stays). Revoking *is* how their live streams end: the running clinician
       service notices any change of the consent store within
       :data:`clinic.live.RECHECK_S` (0.5 s, :meth:`clinic.live.Hub.consent_changed`), closes
       the subscriptions that named only this patient with the reason, and refuses their
       readings on every other stream and their history from then on.
    3. **Destroy their keys and salts** (:meth:`streams.lake.keystore.LocalKeystore.erase`):
       every key generation and the salt key, a tombstone left so a key id is never reused.
       Their files no longer decrypt (``LakeKeyUnavailable`` caused by ``KeyErased``),
       their bundles cannot be exported, their leaf salts cannot be recomputed.
    4. **Append the audit record** (action ``erasure``, role ``operator``, ``reason``): the
       audit log keeps it, and the patient's earlier records, which link to nothing now.

    ``actor`` and ``reason`` are checked before anything is changed. Raises
    :class:`InvalidPatientId`, :class:`UnknownPatient`, :class:`AlreadyErased`.

    What this does not reach, by design or for now: readings already accepted before step 1
    and still in Kafka are sealed after it under a *new* key generation (the keystore opens
    one rather than fail the sealer), so erase again once the pipeline has drained (the
    rerun sees the live key and destroys it); Kafka's topics (``vitals.raw``,
    ``vitals.clean``, the DLQ) hold plaintext readings until their retention expires; the
    batch manifests keep the pseudonymous patient id and row counts (they are sealed
    records); the local keystore's caveat (copy-on-write filesystems, SSD wear levelling and
    backups may keep old key blocks) applies, see :mod:`streams.lake.keystore`.
    """
    _check_id(patient_id)
    entry = AuditEntry(  # validates actor and reason before anything is destroyed
        actor=actor,
        role=ROLE,
        patient_id=patient_id,
        action=AuditAction.ERASURE,
        what=f"patient {patient_id}",
        purpose=None,
        outcome=Outcome.ALLOWED,
        reason=reason,
        count=0,
    )
    with stores(settings, create=True) as s:
        assert s.consent is not None and s.audit is not None  # create=True opens both
        plan = _plan(settings, patient_id, s)
        retired = []
        for device_id in plan.devices:
            assert s.registry is not None  # the plan found the devices there
            try:
                s.registry.retire(device_id)
                retired.append(device_id)
            except RegistryError:  # retired meanwhile by someone else
                pass
        revoked = []
        for grant_id in plan.grants:
            try:
                s.consent.revoke(grant_id, actor=actor)
                revoked.append(grant_id)
            except ConsentConflict:  # revoked meanwhile by someone else
                pass
        destroyed = False
        if s.keystore is not None and s.keystore.has_keys(patient_id):
            s.keystore.erase(patient_id)
            destroyed = True
        (record,) = s.audit.append_many([entry])
    return ErasureReport(
        patient_id=patient_id,
        keys_destroyed=destroyed,
        files_unreadable=plan.file_count,
        files_by_namespace=plan.files,
        readings_unreadable=plan.readings,
        grants_revoked=revoked,
        devices_retired=retired,
        audit_seq=record.seq,
        erased_at_us=record.time_us,
    )
