"""Where the lake's files live: a local folder or an object store, through ``pyarrow.fs``.

Every reader and writer takes a root that is a local path or a URI (``s3://bucket/lake``),
optionally with a ready filesystem, and works on "/"-separated paths below it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["resolve_fs"]


def resolve_fs(root: str | Path, fs: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a URI such as ``s3://bucket/lake``."""
    if fs is not None:
        return fs, str(root).rstrip("/")
    text = str(root)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def _files(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    """The Parquet files under ``base``, sorted by path (hidden files skipped)."""
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(
        (
            i
            for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.startswith(".")
        ),
        key=lambda i: i.path,
    )


def _existing(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of ``path``, or None when there is no such file (yet)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return bytes(f.read())
