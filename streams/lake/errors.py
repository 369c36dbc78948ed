"""The lake's errors, all under :class:`LakeError`.

A module of their own, without pyarrow, because :mod:`streams.lake.layout` raises
:class:`LakeError` for unsafe names and must stay free of pyarrow (see there).
"""

from __future__ import annotations

from vitalproof.errors import VitalproofError

__all__ = ["LakeError", "LakeKeyUnavailable", "LakeSpansDates"]


class LakeError(VitalproofError):
    """A lake file or path is invalid or cannot be read or written."""


class LakeSpansDates(LakeError):
    """One patient's rows of a batch fall on several UTC dates: they need several files."""

    def __init__(self, batch_id: str, patient_id: str, dates: list[str]) -> None:
        super().__init__(
            f"batch {batch_id} spans {', '.join(dates)} for patient {patient_id}: "
            f"a file holds one date; use write_patient_files"
        )
        self.dates = dates


class LakeKeyUnavailable(LakeError):
    """A file cannot be decrypted because its key is erased, unknown or does not unwrap."""

    def __init__(self, path: str, key: str | None, cause: Exception) -> None:
        super().__init__(f"cannot decrypt {path}: {cause}")
        self.path = path
        self.key = key
        self.cause = cause

    def diagnostics(self) -> str:
        inner = cause.diagnostics() if isinstance(cause := self.cause, VitalproofError) else ""
        return f"cannot decrypt {self.path} (key {self.key or 'unknown'}). {inner}".strip()
