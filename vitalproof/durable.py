"""Durable writes: a file is either whole or absent, and its name survives a crash.

Every state file of the pipeline (manifests, leaf files, the ledger's marks, keystore
files, the disk buffer's cursor, BLE session state, the anchor log's new files, sealed
Parquet files) is written through these few functions, so "fsync the data, rename, fsync
the folder" is written once. Why the folder too: ``rename`` is atomic, but the new name is
only durable once the directory entry itself is on disk (ext4 and xfs both need it).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["fsync_dir", "publish_new", "write_atomic", "write_new"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the folder's entries (a new, renamed or removed name) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _write_synced(tmp: Path, data: bytes, mode: int) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the folder.

    A reader (or a restart after a crash) sees the old file or the new one, never a part.
    ``mode`` is the new file's permission bits (0o600 for secrets: set at creation, so the
    data is never readable by others, not even for a moment).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(final)
    try:
        _write_synced(tmp, data, mode)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def publish_new(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> bool:
    """Create ``path`` with ``data`` unless it exists; ``True`` if this call created it.

    Temp file, fsync, then hard-link into place: atomic, and it never clobbers an existing
    file (``link`` fails if the name exists, so of two writers racing on one name both end up
    with the first file; ``rename`` would let the second replace it). On filesystems without
    hard links it falls back to rename after an existence check.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(final)
    try:
        _write_synced(tmp, data, mode)
        try:
            os.link(tmp, final)
            created = True
        except FileExistsError:
            created = False
        except OSError:  # no hard links here
            if final.exists():
                created = False
            else:
                os.replace(tmp, final)
                created = True
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return created


def write_new(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` exclusively (``O_EXCL``), write and fsync it, fsync the folder;
    ``False`` (nothing written) if it exists. For a file that must be made once, such as a
    master key: unlike :func:`publish_new` the data never sits in a temp file."""
    final = Path(path)
    try:
        _write_synced(final, data, mode)
    except FileExistsError:
        return False
    fsync_dir(final.parent)
    return True
