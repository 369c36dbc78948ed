"""Batch hashing for vitalproof's seal path (Rust). The pure-Python code is the reference."""

from collections.abc import Iterable

def reading_ids(
    device_id: str, metric: Iterable[str], seq: Iterable[int], device_time_us: Iterable[int]
) -> list[str]: ...
def salts(key: bytes, reading_ids: Iterable[str]) -> list[bytes]: ...
def salted_leaves(salts: Iterable[bytes], canonical: Iterable[bytes]) -> list[bytes]: ...
def canonical_leaves(
    salts: Iterable[bytes],
    device_json: str,
    patient_json: str,
    runs: list[tuple[str, str, int, int]],
    device_time_us: Iterable[int],
    quality: Iterable[int],
    reading_id: Iterable[str],
    seq: Iterable[int],
    value: Iterable[float | None],
) -> list[bytes]: ...
def merkle_root(leaves: Iterable[bytes]) -> bytes: ...
def merkle_levels(leaves: Iterable[bytes]) -> list[bytes]: ...
