"""What every request of the service needs, built once at start."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from clinic.audit import AuditLog
from clinic.auth import DevIssuer, TokenValidator
from clinic.consent_store import ConsentStore
from streams import lake
from streams.lake.keystore import MASTER_KEY_FILE, LocalKeystore
from vitalproof.settings import Settings


def clinic_dir(settings: Settings) -> Path:
    """The service's state (issuer key, consent, audit) beside the lake's, per home."""
    return settings.paths.home / "clinic"


@dataclass
class ServiceContext:
    settings: Settings
    consent: ConsentStore
    audit: AuditLog
    validator: TokenValidator
    issuer: DevIssuer | None = None
    clock: Callable[[], float] = field(default=time.time)
    # Small caches of derived state, each keyed inside by what it was derived from.
    memo: dict[str, object] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, *, dev_issuer: bool = True) -> ServiceContext:
        folder = clinic_dir(settings)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        issuer = DevIssuer(folder) if dev_issuer else None
        if issuer is None:
            raise NotImplementedError("only the development issuer is wired so far")
        return cls(
            settings=settings,
            consent=ConsentStore(settings.paths.consent_path),
            audit=AuditLog(settings.paths.audit_path),
            validator=issuer.validator(),
            issuer=issuer,
        )

    def close(self) -> None:
        self.consent.close()
        self.audit.close()

    def now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    def read_patient(
        self, patient_id: str, start_us: int | None, end_us: int | None, metrics: list[str] | None
    ) -> pa.Table:
        """Sealed readings of one patient (only batches with a manifest), decrypted."""
        keys = self.settings.paths.keys_dir
        if not (keys / MASTER_KEY_FILE).exists():
            return lake.SCHEMA.empty_table()
        root = lake.open_lake(self.settings)  # a folder or S3; a missing one lists empty
        sealed = lake.sealed_batch_ids(root)
        # Files of an erased patient are skipped (their key is gone), not an error.
        return lake.read_patient(
            root,
            patient_id,
            LocalKeystore(keys),
            start_us,
            end_us,
            metrics,
            batches=sealed,
            erased=[],
        )
