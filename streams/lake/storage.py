"""Where the lake's files live: a local folder or an object store, through ``pyarrow.fs``.

Every reader and writer takes a root that is a local path, a URI (``s3://bucket/lake``) or a
:class:`LakeRoot` (a filesystem and a path in it, what :func:`open_lake` builds from the
settings, credentials included), optionally with a ready filesystem, and works on
"/"-separated paths below it.

Publishing is atomic on both: a local file is written to a temp file, fsync'd and renamed
(:mod:`vitalproof.durable`); an S3 object appears whole when its PUT (or multipart upload)
completes, or not at all, so there is nothing to rename. What S3 lacks is an atomic
"create unless it exists": :meth:`LakeRoot.publish_new` checks, then writes. Two writers of
one batch would both write the same rows under the same name; the sealer keeps whichever
file it finds (``streams.lake.write``), and no two sealers seal one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from streams.lake.errors import LakeError
from vitalproof.durable import publish_new, write_atomic

if TYPE_CHECKING:
    from vitalproof.settings import LakeSettings, Settings

__all__ = [
    "LakeRoot",
    "as_root",
    "open_lake",
    "open_lake_base",
    "open_uri",
    "resolve_fs",
    "s3_filesystem",
]


@dataclass(frozen=True)
class LakeRoot:
    """A lake root: a filesystem and the root's path in it ("/"-separated, no trailing /).

    The helpers take paths relative to the root, so callers never join paths themselves and
    the same code runs on a folder and on a bucket.
    """

    fs: pafs.FileSystem
    base: str
    uri: str  # how messages name it: the folder, or s3://bucket/prefix

    def __str__(self) -> str:
        return self.uri

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """The full path of ``rel`` in :attr:`fs`."""
        return f"{self.base}/{rel}" if rel else self.base

    def child(self, rel: str) -> LakeRoot:
        """The root of a folder below this one (a namespace, ``_batches``)."""
        return LakeRoot(self.fs, self.path(rel), f"{self.uri}/{rel}")

    def read(self, rel: str) -> bytes | None:
        """The bytes of ``rel``, or None when there is no such file (yet)."""
        return _existing(self.fs, self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def names(self, suffix: str, rel: str = "") -> list[str]:
        """Names of the files directly in folder ``rel`` ending in ``suffix``, sorted
        (hidden files, such as a local publish's temp files, skipped)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(
            i.base_name
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.base_name.endswith(suffix)
            and not i.base_name.startswith(".")
        )

    def folders(self, rel: str = "") -> list[str]:
        """Names of the folders directly in ``rel`` (on S3: the common prefixes), sorted."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(
            i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory
        )

    def files(self, rel: str = "", suffix: str = ".parquet") -> list[pafs.FileInfo]:
        """Every file ending in ``suffix`` anywhere below ``rel``, sorted by path."""
        return _files(self.fs, self.path(rel), suffix)

    def mkdir(self, rel: str = "") -> None:
        """Create folder ``rel`` locally; on S3 a prefix needs no creating (nothing done)."""
        if self.local:
            self.fs.create_dir(self.path(rel), recursive=True)

    def write(self, rel: str, data: bytes, *, mode: int = 0o644) -> None:
        """Replace ``rel`` with ``data`` atomically: a reader sees the old bytes or the new."""
        if self.local:
            write_atomic(self.path(rel), data, mode=mode)
        else:
            _put(self.fs, self.path(rel), data)

    def publish_new(self, rel: str, data: bytes, *, mode: int = 0o644) -> bool:
        """Create ``rel`` with ``data`` unless it exists; ``True`` if this call created it."""
        if self.local:
            return publish_new(self.path(rel), data, mode=mode)
        if self.exists(rel):
            return False
        _put(self.fs, self.path(rel), data)
        return True


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One object, written whole: S3 makes it visible only when the upload completes."""
    with fs.open_output_stream(path) as f:
        f.write(data)


def resolve_fs(
    root: str | Path | LakeRoot, fs: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder, a URI such as ``s3://bucket/lake``, or a
    :class:`LakeRoot`."""
    if isinstance(root, LakeRoot):
        return root.fs, root.base
    if fs is not None:
        return fs, str(root).rstrip("/")
    text = str(root)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def as_root(root: str | Path | LakeRoot, fs: pafs.FileSystem | None = None) -> LakeRoot:
    """``root`` as a :class:`LakeRoot` (a local folder or a URI pyarrow resolves alone)."""
    if isinstance(root, LakeRoot):
        return root
    fs, base = resolve_fs(root, fs)
    return LakeRoot(fs, base, str(root) if "://" in str(root) else base)


def s3_filesystem(lake: LakeSettings) -> pafs.S3FileSystem:
    """An S3 client from the settings: endpoint (any S3 server: SeaweedFS, AWS...), region
    and credentials (``None``: AWS's usual environment variables and files)."""
    options: dict[str, object] = {"region": lake.s3_region}
    if lake.s3_endpoint:
        url = urlsplit(lake.s3_endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise LakeError(
                f"VITALPROOF_S3_ENDPOINT {lake.s3_endpoint!r} is not an http(s)://host:port URL"
            )
        options |= {"scheme": url.scheme, "endpoint_override": url.netloc}
    if (lake.s3_access_key is None) != (lake.s3_secret_key is None):
        raise LakeError("VITALPROOF_S3_ACCESS_KEY and VITALPROOF_S3_SECRET_KEY go together")
    if lake.s3_access_key is not None and lake.s3_secret_key is not None:
        options |= {
            "access_key": lake.s3_access_key.get_secret_value(),
            "secret_key": lake.s3_secret_key.get_secret_value(),
        }
    return pafs.S3FileSystem(**options)


def open_uri(lake: LakeSettings, uri: str) -> LakeRoot:
    """The lake at ``uri`` (a folder or ``s3://...``), S3 reached as ``lake`` says."""
    if uri.startswith("s3://"):
        return LakeRoot(s3_filesystem(lake), uri.removeprefix("s3://").rstrip("/"), uri)
    return LakeRoot(pafs.LocalFileSystem(), str(Path(uri).resolve()), uri)


def open_lake(settings: Settings) -> LakeRoot:
    """This namespace's lake (``settings.lake_uri``), on the filesystem the settings name."""
    return open_uri(settings.lake, settings.lake_uri)


def open_lake_base(settings: Settings) -> LakeRoot:
    """The folder or prefix holding every namespace's lake (erasure walks them all)."""
    return open_uri(settings.lake, settings.lake_base)


def _files(fs: pafs.FileSystem, base: str, suffix: str = ".parquet") -> list[pafs.FileInfo]:
    """The files under ``base`` ending in ``suffix``, sorted by path (hidden files skipped)."""
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(
        (
            i
            for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.base_name.endswith(suffix)
            and not i.base_name.startswith(".")
        ),
        key=lambda i: i.path,
    )


def _open_for_reading(fs: pafs.FileSystem, path: str) -> pa.NativeFile:
    """A random-access file: locally the file itself; on S3 the whole object fetched in one
    GET (lake files are small, and Parquet's footer-then-columns reads would each be one)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs.open_input_file(path)
    with fs.open_input_stream(path) as f:
        return pa.BufferReader(f.read())


def _existing(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of ``path``, or None when there is no such file (yet). One request on S3
    (a GET, no HEAD first): proof export reads a manifest and a leaf file per bundle."""
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except FileNotFoundError:
        return None
