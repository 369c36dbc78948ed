"""The batch manifest: what ``vitals.batches`` carries from the batcher to the anchor job.

It is the contract between ``streams`` (which writes it) and ``anchor`` (which reads it), so it
lives in the shared package. It names every file of the batch with its SHA-256, the key ids
that encrypt them, the Kafka offsets the batch covers (which make its id deterministic), and
the batch's Merkle root.

Two tree versions exist (docs/wire-formats.md, "Batch tree"). Version 2 (``patient_roots``
set): the root is the RFC 9162 root over the patients' subtree roots, patients in ``patients``
order (sorted), and the manifest keeps each patient's root and leaf count: that is all the
proof material of the batch, since a patient's leaves are recomputed from their rows when a
proof is built. Version 1 (``leaves_path`` set; batches sealed before version 2): the root is
over every reading's leaf, and the 32-byte leaves are kept in ``_batches/<batch>.leaves``.
The manifest is the commit point of a batch, so the roots are committed with it, atomically.

Patients are named by their pseudonym (``Kms.pseudonym``, a keyed HMAC of the id: the name of
their lake folder), never by id, and files by their key *reference* (``kref:<h>:v<n>``), not
the key id (which contains the patient id): a manifest is plaintext at rest and on
``vitals.batches``. Schema 2 says so; schema 1 manifests (plaintext ids, the first lake
layout) are refused with one clear error.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

MANIFEST_SCHEMA_VERSION = 2


class OffsetRange(BaseModel):
    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    first: int
    last: int


class BatchFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the lake root: patient=<pseudonym>/date=<d>/<batch>.parquet
    rows: int
    sha256: str
    key_id: str  # the key *reference* (kref:<h>:v<n>): names no patient
    bytes: int

    @property
    def patient(self) -> str:
        """The file's patient, by pseudonym: its folder's name (not stored twice: manifests
        are the largest thing beside the lake, docs/benchmarks.md)."""
        folder = self.path.split("/", 1)[0]
        if not folder.startswith("patient="):
            raise ValueError(f"{self.path}: not in a patient=<pseudonym>/ folder")
        return folder.removeprefix("patient=")


class BatchManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: Literal[2] = 2
    batch_id: str
    covers: list[OffsetRange]
    #: Pseudonyms, sorted (code point): the order of the upper tree's leaves.
    patients: list[str]
    rows: int
    first_device_time_us: int
    last_device_time_us: int
    files: list[BatchFile]
    merkle_root: str  # hex; tree 2: RFC 9162 root over patient_roots; tree 1: over the leaves
    sealed_at_us: int
    #: Tree 2: each patient's subtree root (hex), in ``patients`` order, and its leaf count.
    patient_roots: list[str] | None = None
    patient_sizes: list[int] | None = None
    #: Tree 1 only: the leaf hashes, 32 bytes each, in leaf order (relative to the lake root).
    leaves_path: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_schema_1(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schema_version") == 1:
            raise ValueError(
                "a schema 1 manifest (plaintext patient ids: the old lake layout), which this "
                "version does not read; seal into a new lake or namespace"
            )
        return data

    @model_validator(mode="after")
    def _one_tree(self) -> BatchManifest:
        if self.leaves_path is not None:
            if self.patient_roots is not None or self.patient_sizes is not None:
                raise ValueError("a manifest has either leaves_path or patient roots, not both")
            return self
        roots, sizes = self.patient_roots, self.patient_sizes
        if roots is None or sizes is None:
            raise ValueError("a manifest needs patient_roots and patient_sizes (or leaves_path)")
        if not len(roots) == len(sizes) == len(self.patients):
            raise ValueError("patient_roots and patient_sizes need one entry per patient")
        if sum(sizes) != self.rows or min(sizes, default=1) < 1:
            raise ValueError("patient_sizes must be positive and add up to rows")
        return self

    @property
    def tree_version(self) -> int:
        """2 for the two-level tree over per-patient roots, 1 for a tree over every leaf."""
        return 1 if self.leaves_path is not None else 2

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def batch_id_for(covers: list[OffsetRange]) -> str:
    """Deterministic from what the batch covers: a replay of the same offsets, same id."""
    material = json.dumps(
        sorted((c.topic, c.partition, c.first, c.last) for c in covers), separators=(",", ":")
    ).encode()
    return "b" + hashlib.sha256(material).hexdigest()[:31]
