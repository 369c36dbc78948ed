"""Reading the lake back: listing, decrypting, filtering by time and metric, counting.

A batch is sealed once its manifest exists: readers that must not see the files of a batch
whose sealer died before its manifest pass ``batches=sealed_batch_ids(root)``. Compaction
(:mod:`streams.lake.compact`) merges files; which files a reader sees then follows from the
committed compaction records (:mod:`streams.lake.records`): never both a merged file and its
inputs, never neither. A reader lists the records, the files, then the records again, and
starts over if a compaction committed meanwhile; a file deleted between the listing and its
reading (its compaction committed later) makes the reader start over too. A file whose
patient key is erased, unknown or does not unwrap raises
:class:`~streams.lake.errors.LakeKeyUnavailable` naming the file: that is how an erased
patient's data looks from here ("Patient keys" in docs/invariants.md).

Folders name patients by pseudonym (:mod:`streams.lake.layout`): a reader of one patient
computes it with ``kms.pseudonym``; a listing of every patient maps pseudonyms back with
``kms.patient_of`` (None for an erased patient, whose id the lake then no longer reveals).

DuckDB cannot read these files directly: its Parquet encryption takes a raw footer key, not a
KMS, so it cannot unwrap data keys through our keystore. Decrypt with :func:`read_patient`
(pyarrow) and query the Arrow table with DuckDB.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from streams.lake.crypto import _KMS_CONFIG, _crypto, _key_id_from_ref
from streams.lake.errors import LakeError, LakeKeyUnavailable
from streams.lake.keystore import KeyErased, KeystoreError, Kms
from streams.lake.layout import (
    BATCHES_DIR,
    COMPACTED_PREFIX,
    LEGACY_PATIENT_PREFIX,
    _check_name,
    old_layout_error,
    patient_dir,
    pseudonym_of,
)
from streams.lake.records import CompactionState, load_state, record_names
from streams.lake.storage import LakeRoot, _files, _open_for_reading, resolve_fs
from streams.lake.table import ID_SOURCE_COLUMNS, SCHEMA, _upgrade, derive_reading_ids, hex_ids

__all__ = [
    "LakeFileVanished",
    "lake_stats",
    "list_patient_files",
    "merged_reading_ids",
    "read_patient",
    "read_reading_ids",
    "sealed_batch_ids",
]

_US_PER_DAY = 86_400_000_000
T = TypeVar("T")

#: How often a reader starts over because a compaction committed under it (each retry means
#: another compaction committed within one read: with one compactor, 2-3 is already rare).
_ATTEMPTS = 8


class LakeFileVanished(LakeError):
    """A listed file was gone when opened: a compaction deleted it (the reader starts over)."""


def _date_of_us(us: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=us // _US_PER_DAY)).isoformat()


def _to_us(t: dt.datetime | int | None) -> int | None:
    if t is None or isinstance(t, int):
        return t
    if t.tzinfo is None:
        raise LakeError("start/end must be timezone-aware datetimes or microseconds since epoch")
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def sealed_batch_ids(root: str | Path | LakeRoot, *, fs: pafs.FileSystem | None = None) -> set[str]:
    """Batches whose manifest exists: the sealer's commit point.

    A worker killed after writing a batch's files but before its manifest leaves files that
    belong to no sealed batch; after restart the same records are sealed again under another
    batch id. Readers pass these ids as ``batches=`` so that such orphans stay invisible.
    """
    fs, base = resolve_fs(root, fs)
    sel = pafs.FileSelector(f"{base}/{BATCHES_DIR}", allow_not_found=True)
    return {
        i.base_name.removesuffix(".json")
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File and i.base_name.endswith(".json")
    }


def _pseudonym(kms: Kms, patient_id: str) -> str:
    """The patient's folder name; the id is checked first, for the same error as ever."""
    _check_name(patient_id, "patient id")
    return kms.pseudonym(patient_id)


def _visible_files(
    fs: pafs.FileSystem,
    base: str,
    pseudonym: str | None,
    batches: Collection[str] | None,
    patient_id: str | None = None,
) -> tuple[list[pafs.FileInfo], CompactionState]:
    """The files of one patient (by pseudonym; None: all) a reader sees now, and the records
    it saw. A lake of the old layout raises :func:`old_layout_error` (``patient_id``: the
    id behind ``pseudonym``, to look for its old folder: one stat).

    Records, then files, then records again: if a compaction committed (or a record was
    settled or removed) in between, the listing may mix before and after, so start over.
    """
    folder = base if pseudonym is None else f"{base}/{patient_dir(pseudonym)}"
    for _ in range(_ATTEMPTS):
        state = load_state(fs, base, pseudonym)
        infos = _files(fs, folder)
        if record_names(fs, base, pseudonym) == state.names:
            break
    else:
        raise LakeError(f"{base}: compactions kept committing while listing; try again")
    if pseudonym is None:
        if any(f"/{LEGACY_PATIENT_PREFIX}" in i.path for i in infos):
            raise old_layout_error(base)
    elif patient_id is not None:
        old = fs.get_file_info(f"{base}/{LEGACY_PATIENT_PREFIX}{patient_id}")
        if old.type != pafs.FileType.NotFound:
            raise old_layout_error(base)
    rel = len(base) + 1
    return [i for i in infos if state.visible(i.path[rel:], batches)], state


def list_patient_files(
    root: str | Path | LakeRoot,
    patient_id: str,
    *,
    kms: Kms,
    fs: pafs.FileSystem | None = None,
    start: dt.datetime | int | None = None,
    end: dt.datetime | int | None = None,
    batches: Collection[str] | None = None,
) -> list[str]:
    """Files of one patient whose date folder overlaps [start, end), without decrypting.

    ``batches``: only files of these batch ids (see :func:`sealed_batch_ids`); None: all.
    Files merged by a committed compaction are listed as its outputs, never as themselves.
    ``kms`` names the patient's folder (:meth:`Kms.pseudonym`); nothing is decrypted.
    """
    fs, base = resolve_fs(root, fs)
    lo, hi = _to_us(start), _to_us(end)
    first = None if lo is None else _date_of_us(lo)
    last = None if hi is None else _date_of_us(hi - 1)
    out = []
    h = _pseudonym(kms, patient_id)
    for info in _visible_files(fs, base, h, batches, patient_id)[0]:
        m = re.search(r"/date=(\d{4}-\d{2}-\d{2})/", info.path)
        date = m.group(1) if m else None
        if date is not None and (
            (first is not None and date < first) or (last is not None and date > last)
        ):
            continue
        out.append(info.path)
    return out


def _read_file(
    fs: pafs.FileSystem,
    path: str,
    kms: Kms,
    patient_id: str | None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Decrypt one file; rows come back with :data:`SCHEMA`'s types (or ``columns`` of it),
    ``reading_id`` recomputed when the file does not store it (lake format 2)."""
    factory, bridge = _crypto(kms)
    props = factory.file_decryption_properties(_KMS_CONFIG, pe.DecryptionConfiguration())
    try:
        with _open_for_reading(fs, path) as f:
            # use_threads=False, and the factory's caches (which hold our Python KMS client)
            # emptied at once: a KMS client left for C++ to release at interpreter exit
            # occasionally aborted the process ("terminate called without an active
            # exception") after all work was done.
            pf = pq.ParquetFile(f, decryption_properties=props)
            stored = pf.schema_arrow.names
            wanted = SCHEMA.names if columns is None else columns
            derive = "reading_id" in wanted and "reading_id" not in stored
            read = [c for c in wanted if c in stored]
            if derive:
                read += [c for c in ID_SOURCE_COLUMNS if c not in read]
            table = pf.read(columns=read, use_threads=False)
    except KeystoreError as e:
        key = bridge.keys_used[-1] if bridge.keys_used else None
        if key is not None and patient_id is not None:
            key = _key_id_from_ref(key, patient_id)
        raise LakeKeyUnavailable(path, key, e) from None
    except (OSError, pa.ArrowException) as e:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise LakeFileVanished(f"{path} was deleted while being read") from None
        raise LakeError(f"cannot read {path}: {e}") from None
    finally:
        factory.remove_cache_entries_for_all_tokens()
    if derive:
        table = table.append_column(
            pa.field("reading_id", pa.binary(16), nullable=False), derive_reading_ids(table)
        )
    schema = pa.schema([SCHEMA.field(c) for c in wanted], metadata=SCHEMA.metadata)
    return _upgrade(table, schema)


def read_reading_ids(
    root: str | Path | LakeRoot,
    path: str,
    kms: Kms,
    patient_id: str | None = None,
    *,
    fs: pafs.FileSystem | None = None,
) -> list[str]:
    """The reading ids (hex) of one file, decrypting only that column (``patient_id``, when
    known, only names the key in errors)."""
    fs, base = resolve_fs(root, fs)
    table = _read_file(fs, f"{base}/{path}", kms, patient_id, columns=["reading_id"])
    return hex_ids(table["reading_id"]).to_pylist()


def _retrying(what: str, attempt: Callable[[], T]) -> T:
    """``attempt()``, started over when a file it listed vanished (a compaction's deletion)."""
    for _ in range(_ATTEMPTS):
        try:
            return attempt()
        except LakeFileVanished:
            continue
    raise LakeError(f"{what}: files kept vanishing under compaction; try again")


def merged_reading_ids(
    root: str | Path | LakeRoot,
    path: str,
    batch_id: str,
    kms: Kms,
    pseudonym: str,
    *,
    cache: dict[str, pa.Table],
    fs: pafs.FileSystem | None = None,
) -> list[str]:
    """The reading ids (hex) of ``batch_id`` in the compacted files that took in the file at
    ``path`` (deleted by the compaction): the sealer's memory of recent ids, reloaded.
    ``pseudonym``: the patient's, as the manifest names them.

    ``cache``: compacted file -> its (reading_id, batch_id) columns, shared by the calls of
    one reload, so each merged file is decrypted once.
    """
    fs, base = resolve_fs(root, fs)
    folder = path.rsplit("/", 1)[0] + "/"
    out: list[str] = []
    for info in _visible_files(fs, base, pseudonym, None)[0]:
        rel = info.path[len(base) + 1 :]
        if not rel.startswith(folder) or not info.base_name.startswith(COMPACTED_PREFIX):
            continue
        if rel not in cache:
            cache[rel] = _read_file(fs, info.path, kms, None, ["reading_id", "batch_id"])
        t = cache[rel]
        hit = t.filter(pc.equal(pc.cast(t["batch_id"], pa.string()), batch_id))
        out.extend(hex_ids(hit["reading_id"]).to_pylist())
    return out


def read_patient(
    root: str | Path | LakeRoot,
    patient_id: str,
    kms: Kms,
    start: dt.datetime | int | None = None,
    end: dt.datetime | int | None = None,
    metrics: Iterable[str] | None = None,
    *,
    fs: pafs.FileSystem | None = None,
    batches: Collection[str] | None = None,
    erased: list[str] | None = None,
) -> pa.Table:
    """One patient's readings with device_time in [start, end), optionally some metrics.

    Decrypts every file in the date folders the range touches; a file whose key is erased or
    unknown raises :class:`LakeKeyUnavailable` naming that file. Returns rows in file order
    (date, file name, metric, time) with the lake's :data:`SCHEMA`.

    ``erased``: when given, a file whose key was *erased* (:class:`KeyErased`) is skipped and
    its path appended here instead: for readers over many patients (proof export) that must
    go on serving everyone else after one patient's erasure. Unknown keys and keys that do
    not unwrap still raise: those mean a wrong or damaged keystore, not an erasure.
    """
    fs, base = resolve_fs(root, fs)
    lo, hi = _to_us(start), _to_us(end)
    wanted = None if metrics is None else pa.array(sorted(set(metrics)), pa.string())

    def attempt() -> pa.Table:
        skipped: list[str] = []
        parts = []
        for path in list_patient_files(
            base, patient_id, kms=kms, fs=fs, start=lo, end=hi, batches=batches
        ):
            try:
                t = _read_file(fs, path, kms, patient_id)
            except LakeKeyUnavailable as e:
                if erased is None or not isinstance(e.cause, KeyErased):
                    raise
                skipped.append(path)
                continue
            mask = None
            if lo is not None or hi is not None:
                ts = pc.cast(t["device_time"], pa.int64())
                if lo is not None:
                    mask = pc.greater_equal(ts, lo)
                if hi is not None:
                    upper = pc.less(ts, hi)
                    mask = upper if mask is None else pc.and_(mask, upper)
            if wanted is not None:
                m = pc.is_in(pc.cast(t["metric"], pa.string()), value_set=wanted)
                mask = m if mask is None else pc.and_(mask, m)
            if mask is not None:
                t = t.filter(mask)
            parts.append(t)
        if erased is not None:
            erased.extend(skipped)
        if not parts:
            return SCHEMA.empty_table()
        return pa.concat_tables(parts)

    return _retrying(f"reading patient {patient_id}", attempt)


def lake_stats(
    root: str | Path | LakeRoot,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
    batches: Collection[str] | None = None,
) -> dict[str, int]:
    """Counts for operators and tests: readings, distinct ids, duplicates, batches, bytes.

    Files that cannot be decrypted (erased patients) are counted in ``unreadable_files`` and
    ``bytes_on_disk`` but not in the reading counts. A compacted file holds many batches: its
    ``batch_id`` column says which.
    """
    fs, base = resolve_fs(root, fs)

    def attempt() -> dict[str, int]:
        infos, _ = _visible_files(fs, base, None, batches)
        readings = unreadable = 0
        ids: list[pa.Array] = []
        batch_ids: set[str] = set()
        patients: set[str] = set()
        for info in infos:
            patients.add(pseudonym_of(info.path) or "?")
            merged = info.base_name.startswith(COMPACTED_PREFIX)
            if not merged:
                batch_ids.add(info.base_name.removesuffix(".parquet"))
            cols = ["reading_id", "batch_id"] if merged else ["reading_id"]
            try:
                t = _read_file(fs, info.path, kms, None, columns=cols)
            except LakeKeyUnavailable:
                unreadable += 1
                continue
            if merged:
                batch_ids.update(pc.unique(pc.cast(t["batch_id"], pa.string())).to_pylist())
            readings += t.num_rows
            ids.extend(t["reading_id"].chunks)
        distinct = len(pc.unique(pa.concat_arrays(ids))) if ids else 0
        return {
            "readings": readings,
            "distinct_reading_ids": distinct,
            "duplicates": readings - distinct,
            "batches": len(batch_ids),
            "patients": len(patients),
            "files": len(infos),
            "unreadable_files": unreadable,
            "bytes_on_disk": sum(i.size or 0 for i in infos),
        }

    return _retrying(f"counting {base}", attempt)


def patient_summaries(
    root: str | Path | LakeRoot,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
    batches: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Per patient: readings and the first and last device time (µs), sorted by id; the
    files of an erased patient count as ``unreadable_files`` instead. ``patient_id`` comes
    from the keystore (:meth:`Kms.patient_of`): None for an erased patient, whose row then
    shows only their ``pseudonym`` (sorted last)."""
    fs, base = resolve_fs(root, fs)

    def attempt() -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for info in _visible_files(fs, base, None, batches)[0]:
            h = pseudonym_of(info.path) or "?"
            row = out.get(h)
            if row is None:
                row = out[h] = {
                    "patient_id": kms.patient_of(h), "pseudonym": h, "readings": 0,
                    "first_us": None, "last_us": None, "unreadable_files": 0,
                }  # fmt: skip
            patient = row["patient_id"]
            try:
                t = _read_file(fs, info.path, kms, patient, columns=["device_time"])
            except LakeKeyUnavailable:
                row["unreadable_files"] += 1
                continue
            if t.num_rows == 0:
                continue
            ts = pc.cast(t["device_time"], pa.int64())
            lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
            row["readings"] += t.num_rows
            row["first_us"] = lo if row["first_us"] is None else min(row["first_us"], lo)
            row["last_us"] = hi if row["last_us"] is None else max(row["last_us"], hi)
        return sorted(
            out.values(), key=lambda r: (r["patient_id"] is None, r["patient_id"] or r["pseudonym"])
        )

    return _retrying(f"summing up {base}", attempt)
