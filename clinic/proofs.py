"""Proof bundles from the lake: find a reading, rebuild its Merkle paths, cite the anchor.

This sits above streams and anchor (it reads the encrypted lake with the patient's key and
the anchor log), which is why it is not in ``anchor``: the *verifier* needs nothing of this.

A batch of tree version 2 keeps only its patients' roots (in the manifest); the reading's
patient's leaves are recomputed here from that patient's decrypted rows of the batch (their
``batch_id``; ``leaf_index`` places each row in the subtree), with salts from the keystore,
and must rebuild the sealed root before any path is built from them. Batches sealed before
(tree version 1) kept every leaf in ``_batches/<batch>.leaves`` and give version-1 bundles.

An erased patient's files ("Patient keys", :mod:`clinic.erasure`) are skipped, not fatal:
everyone else's bundles must still export after one patient's erasure, while that patient's
readings cannot be found any more (and their salts could not be recomputed anyway).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from anchor.bundles import build_bundle, build_bundle_v2
from anchor.errors import AnchorError
from anchor.log import MerkleLog
from streams import lake
from streams.lake.keystore import KeystoreError, LocalKeystore
from streams.lake.layout import BATCHES_DIR, patient_dir
from streams.ledger import read_manifests
from vitalproof.errors import VitalproofError
from vitalproof.hashing import salted_leaves
from vitalproof.manifest import BatchManifest
from vitalproof.settings import Settings
from vitalproof_verify.bundle import AnyBundle, load_bundle
from vitalproof_verify.errors import ProofError
from vitalproof_verify.leaves import canonical_reading_bytes
from vitalproof_verify.merkle import root as merkle_root
from vitalproof_verify.verify import verify_bundle


class ProofExportError(VitalproofError):
    """A bundle cannot be built (unknown reading, batch not anchored yet, key erased)."""


class LakeView:
    """Read-side view of one namespace: manifests, sealed rows, the anchor log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = lake.open_lake(settings)
        self.kms = LocalKeystore(settings.paths.keys_dir)
        #: Files skipped by the last :meth:`table` because their patient's key was erased.
        self.erased_files: list[str] = []

    def manifests(self) -> list[BatchManifest]:
        return read_manifests(self.root.child(BATCHES_DIR))

    def sealed_rows(self) -> int:
        return sum(m.rows for m in self.manifests())

    def pseudonyms(self) -> set[str]:
        """Every patient of the sealed batches, as manifests name them."""
        return {p for m in self.manifests() for p in m.patients}

    def patients(self) -> list[str]:
        """The ids behind :meth:`pseudonyms` that the keystore still knows (not erased)."""
        ids = (self.kms.patient_of(h) for h in self.pseudonyms())
        return sorted(p for p in ids if p is not None)

    def table(self, patients: Iterable[str] | None = None) -> pa.Table:
        """Rows of sealed batches only (files of a batch without a manifest are ignored),
        without the files of erased keys (listed in :attr:`erased_files`)."""
        sealed = lake.sealed_batch_ids(self.root)
        self.erased_files = []
        if patients is None:
            patients = []
            for h in sorted(self.pseudonyms()):
                p = self.kms.patient_of(h)
                if p is None:  # erased: the id is gone, their files stay unreadable
                    self.erased_files += [i.path for i in self.root.files(patient_dir(h))]
                else:
                    patients.append(p)
        parts = [
            lake.read_patient(self.root, p, self.kms, batches=sealed, erased=self.erased_files)
            for p in sorted(patients)
        ]
        return pa.concat_tables(parts) if parts else lake.SCHEMA.empty_table()

    def sealed_reading_ids(self) -> set[str]:
        return set(lake.hex_ids(self.table()["reading_id"]).to_pylist())

    # -- bundles ------------------------------------------------------------------------

    def find(self, reading_id: str) -> dict[str, Any]:
        table = self.table()
        ids = lake.hex_ids(table["reading_id"])
        hit = table.filter(pc.equal(ids, reading_id))
        if hit.num_rows == 0:
            erased = (
                f" (or in one of {len(self.erased_files)} files of erased patients, which "
                "cannot be read any more)"
                if self.erased_files
                else ""
            )
            raise ProofExportError(f"reading {reading_id} is not in the lake {self.root}{erased}")
        row = hit.slice(0, 1).to_pylist()[0]
        row["reading_id"] = reading_id
        return row

    def bundle(self, reading_id: str, row: dict[str, Any] | None = None) -> AnyBundle:
        row = row or self.find(reading_id)
        batch_id = str(row["batch_id"])
        manifest = BatchManifest.model_validate_json(self._file(f"{BATCHES_DIR}/{batch_id}.json"))
        leaf_index = int(row["leaf_index"])
        patient_id = str(row["patient_id"])
        try:
            (salt,) = self.kms.salts(patient_id, [reading_id])
        except KeystoreError as e:  # an erased patient's salt is gone with their keys
            raise ProofExportError(f"reading {reading_id}: {e}") from e
        reading = _reading(row, reading_id)
        log = MerkleLog(self.settings.anchor_dir / "log", readonly=True)
        if log.index_of(batch_id) is None:
            raise ProofExportError(f"batch {batch_id} is not in the anchor log yet")
        try:
            if manifest.leaves_path is not None:  # tree version 1: every leaf kept
                leaves_raw = self._file(manifest.leaves_path)
                leaves = [leaves_raw[i : i + 32] for i in range(0, len(leaves_raw), 32)]
                return build_bundle(
                    reading=reading,
                    salt=salt,
                    batch_id=batch_id,
                    batch=leaves,
                    leaf_index=leaf_index,
                    log=log,
                )
            roots = [bytes.fromhex(r) for r in manifest.patient_roots or []]
            h = self.kms.pseudonym(patient_id)
            if h not in manifest.patients:
                raise ProofExportError(f"batch {batch_id} has no readings of {patient_id}")
            index = manifest.patients.index(h)
            return build_bundle_v2(
                reading=reading,
                salt=salt,
                batch_id=batch_id,
                patient_leaves=self.patient_leaves(manifest, patient_id, roots[index]),
                leaf_index=leaf_index,
                patient_roots=roots,
                patient_index=index,
                batch_size=manifest.rows,
                log=log,
            )
        except AnchorError as e:
            raise ProofExportError(f"reading {reading_id}: {e}") from e

    def patient_leaves(self, manifest: BatchManifest, patient_id: str, root: bytes) -> list[bytes]:
        """The patient's salted leaves of a batch of tree version 2, in subtree order,
        recomputed from their rows; they must rebuild the sealed ``root``.

        Rows are picked by their ``batch_id`` column and each put at its ``leaf_index``,
        which must number them 0..n-1 with n the sealed count. First from the files named
        for the batch (one decryption, the sealer's layout); when those do not hold them all
        (files merged by compaction carry many batches), from every sealed file of the
        patient in the batch's time range.
        """
        where = f"patient {patient_id}'s rows of batch {manifest.batch_id}"
        size = (manifest.patient_sizes or [])[
            manifest.patients.index(self.kms.pseudonym(patient_id))
        ]
        rows = self._batch_rows(manifest, patient_id, {manifest.batch_id})
        if rows.num_rows != size:
            rows = self._batch_rows(manifest, patient_id, lake.sealed_batch_ids(self.root))
        order = rows["leaf_index"].to_pylist()
        if sorted(order) != list(range(size)):
            raise ProofExportError(
                f"{where}: {rows.num_rows} rows with leaf indexes that are not 0..{size - 1}"
                " (a file missing or added?)"
            )
        ids = lake.hex_ids(rows["reading_id"]).to_pylist()
        try:
            salts = self.kms.salts(patient_id, ids)
        except KeystoreError as e:
            raise ProofExportError(f"{where}: {e}") from e
        canonical = [
            canonical_reading_bytes(**_reading(r, rid))
            for r, rid in zip(rows.to_pylist(), ids, strict=True)
        ]
        leaves: list[bytes] = [b""] * size
        for i, leaf in zip(order, salted_leaves(salts, canonical), strict=True):
            leaves[i] = leaf
        if merkle_root(leaves) != root:
            raise ProofExportError(f"{where} do not rebuild the sealed patient root")
        return leaves

    def _batch_rows(self, manifest: BatchManifest, patient_id: str, batches: set[str]) -> pa.Table:
        try:
            rows = lake.read_patient(
                self.root,
                patient_id,
                self.kms,
                manifest.first_device_time_us,
                manifest.last_device_time_us + 1,
                batches=batches,
            )
        except lake.LakeError as e:
            raise ProofExportError(f"patient {patient_id}, batch {manifest.batch_id}: {e}") from e
        return rows.filter(pc.equal(pc.cast(rows["batch_id"], pa.string()), manifest.batch_id))

    def _file(self, rel: str) -> bytes:
        data = self.root.read(rel)
        if data is None:
            raise ProofExportError(f"{rel} is missing from the lake {self.root}")
        return data

    def export_and_verify(self, reading_ids: Sequence[str], w3: Any) -> tuple[int, list[str]]:
        """Export and verify bundles for ``reading_ids`` (the demo's last step)."""
        table = self.table()
        ids = lake.hex_ids(table["reading_id"])
        ok, failures = 0, []
        for rid in reading_ids:
            hit = table.filter(pc.equal(ids, rid)).slice(0, 1).to_pylist()
            try:
                if not hit:
                    raise ProofExportError(f"reading {rid} is not in the lake")
                row = hit[0] | {"reading_id": rid}
                bundle = self.bundle(rid, row)
                verify_bundle(load_bundle(bundle.model_dump_json()), w3)
                ok += 1
            except (ProofError, AnchorError, ProofExportError) as e:
                failures.append(f"{rid}: {e}")
        return ok, failures


def export_bundle(settings: Settings, reading_id: str) -> AnyBundle:
    return LakeView(settings).bundle(reading_id)


def _reading(row: dict[str, Any], reading_id: str) -> dict[str, Any]:
    """A lake row as the fields of :class:`~vitalproof_verify.bundle.Reading`."""
    value = row["value"]
    return {
        "reading_id": reading_id,
        "device_id": str(row["device_id"]),
        "patient_id": str(row["patient_id"]),
        "metric": str(row["metric"]),
        "value": None if value is None or math.isnan(value) else float(value),
        "unit": str(row["unit"]),
        "device_time_us": _us(row["device_time"]),
        "seq": int(row["seq"]),
        "quality": int(row["quality"]),
    }


def _us(t: Any) -> int:
    if isinstance(t, int):
        return t
    # pyarrow gives timezone-aware datetimes for timestamp[us, UTC]
    import datetime as dt

    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
