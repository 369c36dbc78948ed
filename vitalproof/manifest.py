"""The batch manifest: what ``vitals.batches`` carries from the batcher to the anchor job.

It is the contract between ``streams`` (which writes it) and ``anchor`` (which reads it), so it
lives in the shared package. It names every file of the batch with its SHA-256, the key ids
that encrypt them, the Kafka offsets the batch covers (which make its id deterministic), and
the RFC 9162 root over the batch's salted reading leaves.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

MANIFEST_SCHEMA_VERSION = 1


class OffsetRange(BaseModel):
    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    first: int
    last: int


class BatchFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the lake root
    patient_id: str
    rows: int
    sha256: str
    key_id: str
    bytes: int


class BatchManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    batch_id: str
    covers: list[OffsetRange]
    patients: list[str]
    rows: int
    first_device_time_us: int
    last_device_time_us: int
    files: list[BatchFile]
    merkle_root: str  # hex, RFC 9162 root over the batch's leaves in leaf order
    leaves_path: str  # relative to the lake root: the leaf hashes, 32 bytes each, in order
    sealed_at_us: int

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def batch_id_for(covers: list[OffsetRange]) -> str:
    """Deterministic from what the batch covers: a replay of the same offsets, same id."""
    material = json.dumps(
        sorted((c.topic, c.partition, c.first, c.last) for c in covers), separators=(",", ":")
    ).encode()
    return "b" + hashlib.sha256(material).hexdigest()[:31]
