"""Compaction: each patient-day's many small sealed files merged into few, encrypted afresh.

Why: every seal writes one encrypted file per (batch, patient, UTC date), and such a file
costs ~5-7 KB whatever it holds, so at a seal window of seconds the lake is mostly footers.
Merged, a patient-day is one file (up to :data:`MAX_FILE_ROWS` rows; more rows, more files),
sorted as the sealer sorts (metric, device_time), with every row's ``batch_id`` and
``leaf_index`` kept: proofs find a reading's batch and leaf from its row, so a bundle
exported before compaction exports byte for byte the same after it.

One compaction of one patient-day, in this order (crash points in brackets):

1. read the inputs, the visible files of sealed batches (and earlier outputs that are not
   full), decrypting them; files whose key is erased stay as they are;
2. write the outputs ``compacted-<id>-<n>.parquet`` beside them, encrypted under the newest
   key generation the inputs used (never a new one: data of an erased patient must not come
   back under a fresh key; if that key is erased meanwhile, wrapping fails and nothing is
   committed) [``compact_before_output``, ``compact_mid_output``, ``compact_after_output``];
3. **commit**: write the record ``_compactions/patient=<h>/<id>.json`` naming inputs and
   outputs, atomically (:mod:`streams.lake.records` says what readers make of it)
   [``compact_after_commit``];
4. delete the inputs [``compact_mid_delete``, ``compact_after_delete``], then settle the record
   (rewrite it without them) and drop records whose outputs were merged again
   [``compact_after_settle``].

Before the commit, readers see the inputs and ignore the outputs; from the commit on, the
outputs and never the inputs. A run killed anywhere is finished or undone by the next one
(:func:`recover`, first thing every run): outputs without a record are deleted, inputs of a
committed record are deleted, the record settled. Runs exclude each other through a lock file
(``fcntl.flock``) on a local lake; on an object store run one compactor per lake.

Concurrent sealing needs nothing: a run takes the sealed batch ids *before* listing files, so
a batch sealed meanwhile is simply left for the next run, and sealed files are never
rewritten by the sealer. ``settle_s`` (the ``--watch`` default is 300 s) keeps a run off the
files of the last minutes anyway, so an open day is merged in a few large steps, not one
file at a time.

I/O goes through ``pyarrow.fs`` (:mod:`streams.lake.storage`), so the same code runs against
S3: no data file is ever renamed, and the only atomic step needed is one small object's PUT.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from streams.lake.crypto import _KMS_CONFIG, _crypto, _key_id_from_ref
from streams.lake.errors import LakeError, LakeKeyUnavailable
from streams.lake.keystore import KeystoreError, Kms, parse_key_id
from streams.lake.layout import (
    COMPACTED_PREFIX,
    COMPACTIONS_DIR,
    LEGACY_PATIENT_PREFIX,
    _check_name,
    compacted_path,
    old_layout_error,
    patient_dir,
)
from streams.lake.read import sealed_batch_ids
from streams.lake.records import (
    CompactedFile,
    CompactionRecord,
    CompactionState,
    load_state,
    record_path,
)
from streams.lake.storage import _files, resolve_fs
from streams.lake.table import FILE_SCHEMA, _upgrade, sort_for_file
from streams.lake.write import ROW_GROUP_ROWS, encode_parquet
from vitalproof.crashpoints import crashpoint
from vitalproof.durable import fsync_dir, write_atomic

__all__ = [
    "CRASH_POINTS",
    "MAX_FILE_ROWS",
    "CompactReport",
    "CompactionBusy",
    "compact_lake",
    "recover",
]

#: Rows per compacted file: eight row groups, so a patient-day of 1 Hz vitals with motion
#: bursts (~700k rows) is one file, and a reader of one hour still skips most row groups.
MAX_FILE_ROWS = 8 * ROW_GROUP_ROWS
#: Every step boundary a crash test kills the compactor at (see the module docstring).
CRASH_POINTS = (
    "compact_before_output",
    "compact_mid_output",
    "compact_after_output",
    "compact_after_commit",
    "compact_mid_delete",
    "compact_after_delete",
    "compact_after_settle",
)
_DATE_RE = re.compile(r"/patient=([^/]+)/date=(\d{4}-\d{2}-\d{2})/[^/]+$")


class CompactionBusy(LakeError):
    """Another compaction holds the lake's lock."""


@dataclass(slots=True)
class CompactReport:
    """What one run did (``lake compact --json`` prints it)."""

    groups: int = 0  # patient-days merged
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    unreadable_files: int = 0  # left as they are: their key is erased or unknown
    recovered: dict[str, int] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, object]:
        return {
            "groups": self.groups,
            "files_in": self.files_in,
            "files_out": self.files_out,
            "rows": self.rows,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "unreadable_files": self.unreadable_files,
            "recovered": dict(self.recovered),
        }


# -- I/O through pyarrow.fs ---------------------------------------------------------------


def _local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _put_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """A small file published whole or not at all: temp + fsync + rename locally, one PUT
    (atomic on close) on an object store."""
    if _local(fs):
        write_atomic(path, data)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _write_output(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """An output file, written in place: until its record exists nobody reads it, so a
    half-written one (a crash mid-write) is harmless and deleted by the next run."""
    half = len(data) // 2
    with fs.open_output_stream(path) as f:
        f.write(data[:half])
        f.flush()
        crashpoint("compact_mid_output")
        f.write(data[half:])
    if _local(fs):  # the record may only name a file that is on disk
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _delete(fs: pafs.FileSystem, path: str) -> bool:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def _lock(fs: pafs.FileSystem, base: str) -> Iterator[None]:
    """One compactor at a time on a local lake (``flock``, released when the process dies)."""
    if not _local(fs):
        yield
        return
    folder = Path(base) / COMPACTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionBusy(f"another compaction is running on {base}") from None
        yield
    finally:
        os.close(fd)


# -- recovery -----------------------------------------------------------------------------


def _finish(
    fs: pafs.FileSystem, base: str, record: CompactionRecord, state: CompactionState
) -> int:
    """Delete a committed record's inputs, settle it, drop the records it superseded."""
    deleted = 0
    for i, rel in enumerate(record.inputs):
        deleted += _delete(fs, f"{base}/{rel}")
        if i == 0:
            crashpoint("compact_mid_delete")
    if _local(fs) and record.inputs:
        for folder in sorted({rel.rsplit("/", 1)[0] for rel in record.inputs}):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(f"{base}/{folder}")
    crashpoint("compact_after_delete")
    if record.inputs:
        settled = record.model_copy(update={"inputs": []})
        _put_atomic(fs, f"{base}/{record_path(record.patient, record.compaction_id)}",
                    settled.to_json_bytes())  # fmt: skip
    gone = set(record.inputs)
    for other in state.records:
        if (
            other.compaction_id != record.compaction_id
            and other.outputs
            and all(o.path in gone for o in other.outputs)
        ):
            _delete(fs, f"{base}/{record_path(other.patient, other.compaction_id)}")
    crashpoint("compact_after_settle")
    return deleted


def recover(root: str | Path, *, fs: pafs.FileSystem | None = None) -> dict[str, int]:
    """Finish or undo what a killed run left (call it holding the lock: :func:`compact_lake` does).

    * inputs of a committed record still on disk: deleted, and the record settled;
    * a record whose outputs are all gone (merged again, then deleted): deleted;
    * outputs no record names (a run killed before its commit): deleted;
    * temp files of a record write that never finished: deleted.
    """
    fs, base = resolve_fs(root, fs)
    out = {"inputs_deleted": 0, "records_settled": 0, "records_dropped": 0, "orphans_deleted": 0}
    state = load_state(fs, base)
    for record in state.records:
        if record.inputs:
            out["inputs_deleted"] += _finish(fs, base, record, state)
            out["records_settled"] += 1
    state = load_state(fs, base)
    present = {i.path[len(base) + 1 :] for i in _files(fs, base)}
    for record in state.records:
        if record.outputs and not any(o.path in present for o in record.outputs):
            _delete(fs, f"{base}/{record_path(record.patient, record.compaction_id)}")
            out["records_dropped"] += 1
    for rel in sorted(present):
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(COMPACTED_PREFIX) and rel not in state.outputs:
            out["orphans_deleted"] += _delete(fs, f"{base}/{rel}")
    sel = pafs.FileSelector(f"{base}/{COMPACTIONS_DIR}", recursive=True, allow_not_found=True)
    for info in fs.get_file_info(sel):
        if info.type == pafs.FileType.File and info.base_name.endswith(".tmp"):
            _delete(fs, info.path)
    return {k: v for k, v in out.items() if v}


# -- one patient-day ----------------------------------------------------------------------


def _read_inputs(
    fs: pafs.FileSystem, base: str, kms: Kms, patient_id: str | None, paths: list[str]
) -> tuple[list[pa.Table], list[str], list[str], int]:
    """Decrypt ``paths`` (stored columns only: reading ids stay derived).

    One crypto factory for the group, its caches emptied at the end (the same care as
    :func:`streams.lake.read._read_file`, amortized over the files of one patient-day).
    Returns the tables, the paths read, the key ids they were under, and how many files
    could not be decrypted (skipped).
    """
    factory, bridge = _crypto(kms)
    props = factory.file_decryption_properties(_KMS_CONFIG, pe.DecryptionConfiguration())
    tables: list[pa.Table] = []
    read: list[str] = []
    unreadable = 0
    try:
        for rel in paths:
            try:
                with fs.open_input_file(f"{base}/{rel}") as f:
                    pf = pq.ParquetFile(f, decryption_properties=props)
                    stored = [c for c in pf.schema_arrow.names if c in FILE_SCHEMA.names]
                    t = pf.read(columns=stored, use_threads=False)
            except KeystoreError:
                unreadable += 1
                continue
            except (OSError, pa.ArrowException) as e:
                raise LakeError(f"cannot read {base}/{rel}: {e}") from None
            tables.append(t)
            read.append(rel)
    finally:
        factory.remove_cache_entries_for_all_tokens()
    keys = sorted(
        {r if patient_id is None else _key_id_from_ref(r, patient_id) for r in bridge.keys_used}
    )
    # one cast per kind of file, not per file (a third of the reading time at 2 s windows)
    kinds: dict[tuple[str, ...], list[pa.Table]] = {}
    for t in tables:
        kinds.setdefault(tuple(t.schema.names), []).append(t)
    merged = [_upgrade(pa.concat_tables(group), FILE_SCHEMA) for group in kinds.values()]
    return merged, read, keys, unreadable


def _newest_key(keys: list[str], patient_id: str | None, pseudonym: str) -> str:
    """The newest key generation among the inputs'; never a generation they did not use."""
    if patient_id is None:  # readable files, yet the keystore has no record of the id
        raise LakeError(f"patient {pseudonym}: the keystore does not know whose files these are")
    versions = []
    for k in keys:
        try:
            p, v = parse_key_id(k)
        except KeystoreError:
            continue
        if p == patient_id:
            versions.append((v, k))
    if not versions:
        raise LakeError(f"patient {patient_id}: no key generation found in the inputs")
    return max(versions)[1]


def _merge(tables: list[pa.Table]) -> pa.Table:
    """One table of all the inputs' rows, sorted as every lake file is."""
    table = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
    return sort_for_file(table)


def _compact_group(
    fs: pafs.FileSystem,
    base: str,
    kms: Kms,
    pseudonym: str,
    date: str,
    inputs: list[str],
    state: CompactionState,
    report: CompactReport,
    max_rows: int,
) -> None:
    crashpoint("compact_before_output")
    patient_id = kms.patient_of(pseudonym)  # None once erased: then nothing decrypts anyway
    tables, read, keys, unreadable = _read_inputs(fs, base, kms, patient_id, inputs)
    report.unreadable_files += unreadable
    if len(read) < 2:
        return
    bytes_in = sum(i.size or 0 for i in fs.get_file_info([f"{base}/{r}" for r in read]))
    key_id = _newest_key(keys, patient_id, pseudonym)
    key_ref = kms.key_ref(key_id)  # what the record stores: it names no patient
    table = _merge(tables)
    cid = f"{time.time_ns() // 1000:x}{secrets.token_hex(4)}"
    outputs: list[CompactedFile] = []
    for n, start in enumerate(range(0, table.num_rows, max_rows)):
        part = table.slice(start, max_rows)
        try:
            data = encode_parquet(part, kms=kms, key_id=key_id, presorted=True)
        except KeystoreError as e:  # erased while we merged: commit nothing
            for o in outputs:
                _delete(fs, f"{base}/{o.path}")
            raise LakeKeyUnavailable(f"{base}/{patient_dir(pseudonym)}", key_id, e) from None
        rel = compacted_path(pseudonym, date, cid, n)
        _write_output(fs, f"{base}/{rel}", data)
        outputs.append(
            CompactedFile(
                path=rel,
                rows=part.num_rows,
                sha256=hashlib.sha256(data).hexdigest(),
                key_id=key_ref,
                bytes=len(data),
            )
        )
    if _local(fs):
        fsync_dir(f"{base}/{outputs[0].path.rsplit('/', 1)[0]}")
    crashpoint("compact_after_output")
    record = CompactionRecord(
        compaction_id=cid,
        patient=pseudonym,
        date=date,
        created_at_us=time.time_ns() // 1000,
        rows=table.num_rows,
        inputs=read,
        outputs=outputs,
    )
    _put_atomic(fs, f"{base}/{record_path(pseudonym, cid)}", record.to_json_bytes())
    crashpoint("compact_after_commit")
    _finish(fs, base, record, state)
    report.groups += 1
    report.files_in += len(read)
    report.files_out += len(outputs)
    report.rows += table.num_rows
    report.bytes_in += bytes_in
    report.bytes_out += sum(o.bytes for o in outputs)


def compact_lake(
    root: str | Path,
    kms: Kms,
    *,
    fs: pafs.FileSystem | None = None,
    patient_id: str | None = None,
    before: str | None = None,
    settle_s: float = 0.0,
    max_rows: int = MAX_FILE_ROWS,
    now: float | None = None,
) -> CompactReport:
    """Merge every patient-day (one patient's, with ``patient_id``) that has two or more
    mergeable files.

    ``before``: only days before this UTC date (``YYYY-MM-DD``); ``settle_s``: only files
    written at least that many seconds ago. Mergeable: files of sealed batches and earlier
    outputs holding fewer than ``max_rows`` rows. Raises :class:`CompactionBusy` when another
    run holds the lock.
    """
    if max_rows < 1:
        raise LakeError(f"max_rows must be >= 1, not {max_rows}")
    fs, base = resolve_fs(root, fs)
    t0 = time.perf_counter()
    report = CompactReport()
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return report  # no lake (yet): nothing to merge, and no folder made for it
    with _lock(fs, base):
        report.recovered = recover(base, fs=fs)
        sealed = sealed_batch_ids(base, fs=fs)  # before listing: later batches wait
        state = load_state(fs, base)  # under the lock nobody else commits
        full = {o.path for r in state.records for o in r.outputs if o.rows >= max_rows}
        if patient_id is None:
            folder = base
        else:
            _check_name(patient_id, "patient id")
            folder = f"{base}/{patient_dir(kms.pseudonym(patient_id))}"
            old = fs.get_file_info(f"{base}/{LEGACY_PATIENT_PREFIX}{patient_id}")
            if old.type != pafs.FileType.NotFound:
                raise old_layout_error(base)
        cutoff_ns = int(((time.time() if now is None else now) - settle_s) * 1e9)
        groups: dict[tuple[str, str], list[str]] = {}
        infos = _files(fs, folder)
        if any(f"/{LEGACY_PATIENT_PREFIX}" in i.path for i in infos):
            raise old_layout_error(base)
        for info in infos:
            rel = info.path[len(base) + 1 :]
            m = _DATE_RE.search(info.path)
            if m is None or not state.visible(rel, sealed) or rel in full:
                continue
            if before is not None and m.group(2) >= before:
                continue
            if settle_s and (info.mtime_ns or 0) > cutoff_ns:
                continue
            groups.setdefault((m.group(1), m.group(2)), []).append(rel)
        for (pseudonym, date), inputs in sorted(groups.items()):
            if len(inputs) >= 2:
                _compact_group(fs, base, kms, pseudonym, date, inputs, state, report, max_rows)
    report.seconds = time.perf_counter() - t0
    return report
