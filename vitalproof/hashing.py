"""The seal path's bulk hashes, bound once to the Rust extension or to the Python reference.

Reading ids, leaf salts, salted leaves and the batch root cost the worker about 2.4 µs per
sample in Python, one hash call each; the extension (native/, module ``vitalproof_native``)
does them over whole columns with the GIL released, in about 1 µs (native/README.md). It is
an accelerator, never a definition: the definitions are the proof kit's
(:mod:`vitalproof_verify.leaves`, :mod:`vitalproof_verify.merkle`), this module's
:class:`Reference` computes them column-wise in Python, and tests/test_native.py holds the
three byte-identical.

Which one runs is decided here, once: at import the extension is used when it can be
imported (its absence is said once, as a warning, since everything still works, only
slower), and :func:`configure` rebinds it for a process whose settings ask for the reference
(``VITALPROOF_NATIVE=0``, for A/B benchmarks). Callers use the functions below and
never ask again. The native backend hands the rare inputs only Python spells the same way
(a bool among the ints, an int beyond 64 bits, ids needing JSON escapes) to the reference.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from vitalproof_verify.errors import MerkleError
from vitalproof_verify.leaves import SALT_SIZE
from vitalproof_verify.merkle import LEAF_PREFIX
from vitalproof_verify.merkle import root as reference_root

if TYPE_CHECKING:
    from vitalproof.schema import SampleBatch

__all__ = [
    "Backend",
    "Native",
    "Reference",
    "backend",
    "canonical_leaves",
    "configure",
    "extension",
    "merkle_root",
    "reading_id_digests",
    "reading_ids",
    "salted_leaves",
    "salts",
]

log = logging.getLogger(__name__)
MODULE = "vitalproof_native"


class Backend(Protocol):
    """What the seal path hashes, column by column."""

    name: str

    def reading_ids(
        self, device_id: str, metrics: Sequence[str], seqs: Sequence[int], times: Sequence[int]
    ) -> list[str]: ...

    def salts(self, salt_key: bytes, reading_ids: Sequence[str]) -> list[bytes]: ...

    def salted_leaves(self, salts: Sequence[bytes], canonical: Sequence[bytes]) -> list[bytes]: ...

    def canonical_leaves(self, salts: Sequence[bytes], batch: SampleBatch) -> list[bytes]: ...

    def merkle_root(self, leaves: Sequence[bytes]) -> bytes: ...


def _check_salts(salts: Sequence[bytes], readings: int) -> None:
    """One salt per reading, each of SALT_SIZE bytes (one C-level pass over the lengths)."""
    if len(salts) != readings:
        raise ValueError(f"{len(salts)} salts for {readings} readings")
    if salts and set(map(len, salts)) != {SALT_SIZE}:
        raise MerkleError(f"salts must be {SALT_SIZE} bytes")


class Reference:
    """The definitions of :mod:`vitalproof_verify.leaves`, computed column-wise in Python."""

    name = "reference"

    def reading_ids(
        self, device_id: str, metrics: Sequence[str], seqs: Sequence[int], times: Sequence[int]
    ) -> list[str]:
        """:func:`~vitalproof_verify.leaves.reading_id` of every sample, the same bytes
        hashed; the device and metric part of the material is formatted once per run of
        equal metrics, not once per sample."""
        from vitalproof.schema import runs_of

        blake2b = hashlib.blake2b
        out: list[str] = []
        for metric, start, stop in runs_of(metrics):
            prefix = f"{device_id}\x1f{metric}\x1f"
            out.extend(
                [
                    blake2b(f"{prefix}{s}\x1f{t}".encode(), digest_size=16).hexdigest()
                    for s, t in zip(seqs[start:stop], times[start:stop], strict=True)
                ]
            )
        return out

    def salts(self, salt_key: bytes, reading_ids: Sequence[str]) -> list[bytes]:
        """HMAC-SHA256(salt_key, reading_id) for each id (RFC 2104), with the inner and
        outer SHA-256 states keyed once: per id that is two state copies and two digests,
        without an hmac object per reading. tests/test_keystore.py checks it equals
        ``hmac.new(...).digest()``."""
        key = salt_key if len(salt_key) <= 64 else hashlib.sha256(salt_key).digest()
        key = key.ljust(64, b"\0")
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        out: list[bytes] = []
        append = out.append
        for rid in reading_ids:
            i = inner.copy()
            i.update(rid.encode())
            o = outer.copy()
            o.update(i.digest())
            append(o.digest())
        return out

    def salted_leaves(self, salts: Sequence[bytes], canonical: Sequence[bytes]) -> list[bytes]:
        """``leaf_hash_salted(salt, bytes)`` of each pair, equal to it, at half the cost: the
        salt length is checked once for the whole list and the prefixed SHA-256 context is
        copied inline (at hundreds of thousands of leaves per second the call per leaf is
        what costs). tests/test_fast_paths.py checks the equality."""
        _check_salts(salts, len(canonical))
        ctx = hashlib.sha256(LEAF_PREFIX)
        out: list[bytes] = []
        append = out.append
        for salt, data in zip(salts, canonical, strict=True):
            h = ctx.copy()
            h.update(salt)
            h.update(data)
            append(h.digest())
        return out

    def canonical_leaves(self, salts: Sequence[bytes], batch: SampleBatch) -> list[bytes]:
        """The salted leaf of every reading of a normalized ``batch``, in order."""
        _check_salts(salts, len(batch))
        return self.salted_leaves(salts, batch.canonical_bytes_per_sample())

    def merkle_root(self, leaves: Sequence[bytes]) -> bytes:
        return reference_root(leaves)


class Native:
    """The extension's column-wise functions; inputs it refuses go to the reference."""

    name = "native"

    def __init__(self, ext: ModuleType, reference: Reference) -> None:
        self._ext = ext
        self._ref = reference

    def reading_ids(
        self, device_id: str, metrics: Sequence[str], seqs: Sequence[int], times: Sequence[int]
    ) -> list[str]:
        try:
            return list(self._ext.reading_ids(device_id, metrics, seqs, times))
        except (TypeError, OverflowError):  # a bool, an int beyond 64 bits: Python's spelling
            return self._ref.reading_ids(device_id, metrics, seqs, times)

    def salts(self, salt_key: bytes, reading_ids: Sequence[str]) -> list[bytes]:
        try:
            return list(self._ext.salts(salt_key, reading_ids))
        except TypeError:  # not bytes and str: the reference accepts what hashlib does
            return self._ref.salts(salt_key, reading_ids)

    def salted_leaves(self, salts: Sequence[bytes], canonical: Sequence[bytes]) -> list[bytes]:
        _check_salts(salts, len(canonical))
        try:
            return list(self._ext.salted_leaves(salts, canonical))
        except TypeError:  # bytes-likes other than bytes: the reference takes any buffer
            return self._ref.salted_leaves(salts, canonical)

    def canonical_leaves(self, salts: Sequence[bytes], batch: SampleBatch) -> list[bytes]:
        """The canonical documents built and hashed in one native call: they never become
        Python objects (a quarter of the sealer's CPU and ~50 MB per 200,000 readings)."""
        _check_salts(salts, len(batch))
        device, patient, runs = batch.canonical_parts()
        try:
            return list(
                self._ext.canonical_leaves(
                    salts,
                    device,
                    patient,
                    runs,
                    batch.device_time_us,
                    batch.quality,
                    batch.reading_id,
                    batch.seq,
                    batch.value,
                )
            )
        except TypeError:  # ids needing JSON escapes, ints beyond 64 bits
            return self._ref.canonical_leaves(salts, batch)

    def merkle_root(self, leaves: Sequence[bytes]) -> bytes:
        """The same RFC 9162 root; every leaf here is a 32-byte hash."""
        return bytes(self._ext.merkle_root(leaves))


REFERENCE = Reference()


def _load_native() -> Native | None:
    try:
        ext = importlib.import_module(MODULE)
    except ImportError as e:
        log.warning(
            "%s is not importable (%s): hashing falls back to the slower pure-Python "
            "reference (make install builds it)",
            MODULE,
            e,
        )
        return None
    return Native(ext, REFERENCE)


_NATIVE = _load_native()
_active: Backend = _NATIVE if _NATIVE is not None else REFERENCE


def configure(*, native: bool) -> Backend:
    """Bind this process's hashing: the extension if ``native`` and installed, else the
    reference. The CLI calls it once from the settings; tests switch with it."""
    global _active
    _active = _NATIVE if native and _NATIVE is not None else REFERENCE
    if not native:
        log.info("hashing in pure Python (native hashing switched off by the settings)")
    return _active


def backend() -> Backend:
    """The bound backend (``backend().name`` is ``"native"`` or ``"reference"``)."""
    return _active


def extension() -> ModuleType | None:
    """The extension module when it could be imported (bound or not), else ``None``."""
    return _NATIVE._ext if _NATIVE is not None else None


def reading_ids(
    device_id: str, metrics: Sequence[str], seqs: Sequence[int], times: Sequence[int]
) -> list[str]:
    return _active.reading_ids(device_id, metrics, seqs, times)


def salts(salt_key: bytes, reading_ids: Sequence[str]) -> list[bytes]:
    return _active.salts(salt_key, reading_ids)


def salted_leaves(salts: Sequence[bytes], canonical: Sequence[bytes]) -> list[bytes]:
    return _active.salted_leaves(salts, canonical)


def canonical_leaves(salts: Sequence[bytes], batch: SampleBatch) -> list[bytes]:
    return _active.canonical_leaves(salts, batch)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    return _active.merkle_root(leaves)


def reading_id_digests(
    device_ids: Sequence[str],
    metrics: Sequence[str],
    seqs: Sequence[int],
    device_times_us: Sequence[int],
) -> bytes:
    """The raw 16-byte digests of :func:`~vitalproof_verify.leaves.reading_id` for whole
    columns, concatenated: for readers that rebuild ids the lake does not store (one buffer,
    no hex string per row)."""
    blake2b = hashlib.blake2b
    return b"".join(
        [
            blake2b(f"{d}\x1f{m}\x1f{s}\x1f{t}".encode(), digest_size=16).digest()
            for d, m, s, t in zip(device_ids, metrics, seqs, device_times_us, strict=True)
        ]
    )
