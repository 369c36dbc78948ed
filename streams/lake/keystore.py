"""Per-patient keys: the KMS interface the lake encrypts through, and a local default.

"Patient keys" (docs/invariants.md): every Parquet file is encrypted under data keys wrapped
by a key that belongs to exactly one patient, and every Merkle leaf is salted by a key that
belongs to exactly one patient. Erasing a patient destroys both, which makes that patient's
files unreadable and their leaves unlinkable (crypto-shredding), while nobody else's data
changes.

Key hierarchy of :class:`LocalKeystore`::

    master key (32 random bytes, file ``master.key``, mode 0600)
      └─ AES key wrap (RFC 3394) ─▶ per patient, per version: KEK (32 bytes)
      │                                └─ AES-GCM ─▶ Parquet data keys (in the files' footers)
      └─ AES key wrap (RFC 3394) ─▶ per patient: salt key (32 bytes)
                                       └─ HMAC-SHA256(salt key, reading id) = leaf salt

Why these primitives:

* KEKs and salt keys are wrapped with **AES-KW** (RFC 3394): it is the standard for wrapping
  keys with keys, deterministic and needs no nonce bookkeeping; each wrapped blob sits in a
  JSON field whose name already says what it is, so associated data would add nothing.
* Data keys are wrapped with **AES-256-GCM** as ``nonce(12) || ciphertext+tag`` with the key's
  canonical reference as associated data. Parquet asks the KMS to wrap a fresh data key for
  every file, so there are many of them; GCM's associated data binds each wrapped data key to
  the exact (patient, version) that wrapped it, so a footer whose key metadata was edited to
  point at another key fails authentication instead of decrypting with the wrong key.
  Random 96-bit nonces are safe far beyond 2^32 wraps per KEK, and KEKs rotate well before.

Key ids are ``patient:<patient_id>:v<n>``: readable in logs, APIs and diagnostics. They are
*not* written into Parquet files because they contain the patient id; files carry
:meth:`Kms.key_ref` instead: ``kref:<h>:v<n>`` with ``h`` an HMAC of the patient id under the
master key. Both forms are accepted by :meth:`Kms.wrap` and :meth:`Kms.unwrap`.

That ``h`` is the patient's **pseudonym** (:meth:`Kms.pseudonym`): the lake's folders
(``patient=<h>/``), the manifests and the compaction records name patients by it, never by
id (docs/architecture.md, "Lake layout"). The way back, for listings, is
:meth:`Kms.patient_of`: each patient's key file keeps their id AES-GCM-encrypted under a key
derived from the master key (associated data: ``h``), so erasing the patient, which shreds
that file, also destroys the only readable link from pseudonym to id. The HMAC key makes the
pseudonym useless for enumeration without the keystore: guessing ids needs ``master.key``.

Files on disk (``keys_dir``, mode 0700): ``master.key``; ``<h>.json`` with the patient's
wrapped KEKs per version, wrapped salt key and encrypted id; ``<h>.tomb.json`` once the
patient has been erased (the highest erased version and when). Names are the HMAC ``h``, never
the patient id, so a listing of the folder reveals neither ids nor a cheap way to enumerate
them.

Caveat of local crypto-shredding: erasure overwrites the key file with random bytes before
unlinking it, but copy-on-write filesystems, SSD wear levelling and backups may keep the old
blocks; whoever also holds ``master.key`` could then unwrap them. A production deployment
puts KEKs in a real KMS/HSM (implement :class:`Kms`) where destruction is a guarantee.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from vitalproof import hashing
from vitalproof.durable import fsync_dir, write_atomic, write_new
from vitalproof.errors import VitalproofError

__all__ = [
    "InsecureKeyFile",
    "KeyErased",
    "KeyUnwrapFailed",
    "KeystoreCorrupt",
    "KeystoreError",
    "Kms",
    "LocalKeystore",
    "UnknownKey",
    "format_key_id",
    "parse_key_id",
]

MASTER_KEY_FILE = "master.key"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_FILE_FORMAT = 1
_KEY_ID_RE = re.compile(r"^patient:(?P<patient>.+):v(?P<version>[1-9][0-9]*)$")
_KEY_REF_RE = re.compile(r"^kref:(?P<h>[0-9a-f]{32}):v(?P<version>[1-9][0-9]*)$")


# -- errors ----------------------------------------------------------------------------------


class KeystoreError(VitalproofError):
    """Base of every keystore failure."""


class InsecureKeyFile(KeystoreError):
    """A key file is readable or writable by others than its owner; we refuse to use it."""

    def __init__(self, path: Path, mode: int) -> None:
        super().__init__(f"{path} has permissions {stat.filemode(mode)} ({mode & 0o777:o})")
        self.path = path
        self.mode = mode

    def diagnostics(self) -> str:
        return (
            f"{self}: a key file must be readable by its owner only. Anyone else who could "
            f"read it could decrypt every patient's data. If nobody else had access, fix it "
            f"with `chmod 600 {self.path}`; if you are not sure, treat the key as compromised "
            f"and rotate."
        )


class UnknownKey(KeystoreError):
    """The keystore has never held the requested key (wrong keystore folder?)."""

    def __init__(self, key: str, keys_dir: Path | None = None) -> None:
        super().__init__(f"unknown key {key}")
        self.key = key
        self.keys_dir = keys_dir

    def diagnostics(self) -> str:
        where = f" in {self.keys_dir}" if self.keys_dir else ""
        return (
            f"{self}: no such key{where}. The data was encrypted by another keystore "
            f"(check VITALPROOF_HOME / keys_dir) or the keystore was lost or replaced."
        )


class KeyErased(KeystoreError):
    """The key was destroyed by :meth:`Kms.erase`: the data it protected is gone for good."""

    def __init__(self, key: str, erased_at: float | None = None) -> None:
        super().__init__(f"key {key} was erased")
        self.key = key
        self.erased_at = erased_at

    def diagnostics(self) -> str:
        when = ""
        if self.erased_at is not None:
            when = " on " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.erased_at))
        return (
            f"{self}{when}: the patient was erased and their keys destroyed, so data and "
            f"leaf salts under this key can no longer be recovered. This is intended."
        )


class KeyUnwrapFailed(KeystoreError):
    """A wrapped key did not authenticate: corrupted, tampered with, or another key's."""

    def diagnostics(self) -> str:
        return (
            f"{self}: the wrapped key failed authentication. The file holding it was "
            f"modified or corrupted, or it belongs to a different key or keystore."
        )


class KeystoreCorrupt(KeystoreError):
    """A keystore file cannot be parsed."""


# -- key ids ---------------------------------------------------------------------------------


def format_key_id(patient_id: str, version: int) -> str:
    return f"patient:{patient_id}:v{version}"


def parse_key_id(key_id: str) -> tuple[str, int]:
    """``patient:<id>:v<n>`` -> (id, n). Patient ids may contain ``:``; the version is last."""
    m = _KEY_ID_RE.match(key_id)
    if m is None:
        raise UnknownKey(key_id)
    return m["patient"], int(m["version"])


# -- the interface ---------------------------------------------------------------------------


@runtime_checkable
class Kms(Protocol):
    """What the lake and the batcher need from a key management service.

    ``key`` arguments of :meth:`wrap`/:meth:`unwrap` are a key id (``patient:<p>:v<n>``) or
    its :meth:`key_ref`; implementations must accept both.
    """

    def wrap(self, key: str, plaintext: bytes) -> bytes:
        """Encrypt a data key under the patient key ``key``."""
        ...

    def unwrap(self, key: str, wrapped: bytes) -> bytes:
        """Decrypt what :meth:`wrap` returned; raise KeyErased / UnknownKey / KeyUnwrapFailed."""
        ...

    def current_key_id(self, patient_id: str) -> str:
        """The key new files of this patient are written under; creates it when needed."""
        ...

    def key_ref(self, key_id: str) -> str:
        """An opaque, stable name of ``key_id`` that reveals no patient id (stored in files)."""
        ...

    def salt_key(self, patient_id: str) -> bytes:
        """The patient's HMAC key for leaf salts (see :meth:`salts`)."""
        ...

    def salts(self, patient_id: str, reading_ids: Sequence[str]) -> list[bytes]:
        """HMAC-SHA256(salt key, reading id) per reading id, in order."""
        ...

    def erase(self, patient_id: str) -> None:
        """Destroy every key of the patient (crypto-shredding), and :meth:`patient_of`'s
        record of their id with them."""
        ...

    def pseudonym(self, patient_id: str) -> str:
        """The name the lake stores the patient under: a keyed hash of the id, stable for
        the keystore's life, revealing nothing without its key (a safe path segment)."""
        ...

    def patient_of(self, pseudonym: str) -> str | None:
        """The patient id behind :meth:`pseudonym`; None when the keystore holds no live
        record of it (erased, or never this keystore's). Never creates anything."""
        ...

    def rotate(self, patient_id: str) -> str:
        """Start a new key version for new writes; old versions stay for reading."""
        ...


# -- pure helpers ----------------------------------------------------------------------------


def _gcm_wrap(kek: bytes, aad: bytes, plaintext: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, plaintext, aad)


def _gcm_unwrap(kek: bytes, aad: bytes, wrapped: bytes) -> bytes:
    if len(wrapped) < _NONCE_BYTES + 16:
        raise InvalidTag
    return AESGCM(kek).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], aad)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, what: str, path: Path) -> bytes:
    if not isinstance(s, str):
        raise KeystoreCorrupt(f"{path}: {what} is not a base64 string")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError:
        raise KeystoreCorrupt(f"{path}: {what} is not valid base64") from None


@dataclass(frozen=True, slots=True)
class _Ref:
    """A parsed key: the patient's file hash and version (patient id when known)."""

    h: str
    version: int
    patient_id: str | None
    text: str  # what the caller passed, for messages

    @property
    def canonical(self) -> str:
        return f"kref:{self.h}:v{self.version}"


# -- the local keystore ----------------------------------------------------------------------


class LocalKeystore:
    """Keys in a local folder, protected by a master key file (see the module docstring).

    Every operation re-reads the patient's file, so an erasure or rotation done by another
    process takes effect immediately; mutations hold an exclusive ``flock`` on the folder's
    lock file so two workers never provision two different first keys for one patient.
    """

    def __init__(self, keys_dir: Path | str) -> None:
        self.dir = Path(keys_dir)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # path -> ((inode, size, mtime_ns), parsed file, {version: unwrapped KEK})
        self._cache: dict[Path, tuple[tuple[int, int, int], dict[str, Any], dict[int, bytes]]] = {}
        self._master = self._load_or_create_master()
        # AES-GCM key for the patient-id records (not the master itself: that one wraps keys)
        self._id_key = hmac.new(self._master, b"vitalproof/patient-id-record", "sha256").digest()

    # -- master key ------------------------------------------------------------------------

    def _load_or_create_master(self) -> bytes:
        path = self.dir / MASTER_KEY_FILE
        with self._locked():
            write_new(path, secrets.token_bytes(_KEY_BYTES), mode=0o600)
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise InsecureKeyFile(path, st.st_mode)
        data = path.read_bytes()
        if len(data) != _KEY_BYTES:
            raise KeystoreCorrupt(f"{path}: expected {_KEY_BYTES} bytes, found {len(data)}")
        return data

    # -- naming ----------------------------------------------------------------------------

    def _hash(self, patient_id: str) -> str:
        """File name stem of a patient: HMAC under the master key (no enumeration offline)."""
        mac = hmac.new(self._master, b"vitalproof/patient-file\x00" + patient_id.encode(), "sha256")
        return mac.hexdigest()[:32]

    def pseudonym(self, patient_id: str) -> str:
        """The patient's key file stem, which is also their name in the lake (128 bits of
        HMAC-SHA256 under the master key: collisions are out of reach for any fleet)."""
        return self._hash(patient_id)

    def _id_record(self, h: str, patient_id: str) -> str:
        return _b64(_gcm_wrap(self._id_key, b"vitalproof/patient-id\x00" + h.encode(),
                              patient_id.encode()))  # fmt: skip

    def _remember_id(self, h: str, patient_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Add the encrypted id to a key file written before ids were kept (caller may or
        may not hold the lock: the write is under it, and re-checked there)."""
        if "patient" in doc:
            return doc
        with self._locked():
            current = self._load(h)
            if current is None:  # erased meanwhile: never write a key file back
                return doc
            doc = current
            if "patient" not in doc:
                doc = dict(doc, patient=self._id_record(h, patient_id))
                self._write_json(self._key_path(h), doc)
        return doc

    def patient_of(self, pseudonym: str) -> str | None:
        if not re.fullmatch(r"[0-9a-f]{32}", pseudonym):
            return None
        doc = self._load(pseudonym)
        blob = None if doc is None else doc.get("patient")
        if blob is None:
            return None
        path = self._key_path(pseudonym)
        try:
            raw = _gcm_unwrap(self._id_key, b"vitalproof/patient-id\x00" + pseudonym.encode(),
                              _unb64(blob, "patient id", path))  # fmt: skip
        except InvalidTag:
            raise KeyUnwrapFailed(f"{path}: the patient id record does not authenticate") from None
        patient_id = raw.decode()
        if self._hash(patient_id) != pseudonym:
            raise KeystoreCorrupt(f"{path}: the patient id record names another patient")
        return patient_id

    def pseudonym_erased(self, pseudonym: str) -> bool:
        """:meth:`is_erased`, by pseudonym (listings of erased patients know nothing else)."""
        return self._load(pseudonym) is None and self._erased_through(pseudonym)[0] > 0

    def _parse(self, key: str) -> _Ref:
        m = _KEY_ID_RE.match(key)
        if m is not None:
            return _Ref(self._hash(m["patient"]), int(m["version"]), m["patient"], key)
        m = _KEY_REF_RE.match(key)
        if m is not None:
            return _Ref(m["h"], int(m["version"]), None, key)
        raise UnknownKey(key, self.dir)

    def key_ref(self, key_id: str) -> str:
        return self._parse(key_id).canonical

    def _key_path(self, h: str) -> Path:
        return self.dir / f"{h}.json"

    def _tomb_path(self, h: str) -> Path:
        return self.dir / f"{h}.tomb.json"

    # -- state files -----------------------------------------------------------------------

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        """Parse a keystore file, re-validated by stat: a cached parse is reused only while
        the file is the same inode, size and mtime, so another process's rotation (atomic
        replace) or erasure (unlink) is seen on the very next call."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        if st.st_mode & 0o077:
            raise InsecureKeyFile(path, st.st_mode)
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1]
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise KeystoreCorrupt(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != _FILE_FORMAT:
            raise KeystoreCorrupt(f"{path}: unknown keystore file format")
        self._cache[path] = (sig, doc, {})
        return doc

    def _write_json(self, path: Path, doc: dict[str, Any]) -> None:
        write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode(), mode=0o600)

    def _shred(self, path: Path) -> None:
        """Overwrite with random bytes, fsync, unlink (best effort; see module docstring)."""
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, secrets.token_bytes(max(size, 1)))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
        fsync_dir(self.dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _erased_through(self, h: str) -> tuple[int, float | None]:
        tomb = self._read_json(self._tomb_path(h))
        if tomb is None:
            return 0, None
        return int(tomb.get("erased_through", 0)), float(tomb.get("erased_at", 0.0))

    def _new_version_doc(self, doc: dict[str, Any], version: int) -> None:
        doc["keks"][str(version)] = {
            "wrapped": _b64(aes_key_wrap(self._master, secrets.token_bytes(_KEY_BYTES))),
            "created_at": time.time(),
        }
        doc["current"] = version

    def _provision(self, h: str, patient_id: str) -> dict[str, Any]:
        """Create the patient's first key generation (caller holds the lock).

        After an erasure the tombstone stays and versions continue above the erased ones,
        so a key id is never reused: an old file names an erased key, never a new one.
        """
        erased_through, _ = self._erased_through(h)
        doc: dict[str, Any] = {
            "format": _FILE_FORMAT,
            "keks": {},
            "salt_key": _b64(aes_key_wrap(self._master, secrets.token_bytes(_KEY_BYTES))),
            "patient": self._id_record(h, patient_id),
        }
        self._new_version_doc(doc, erased_through + 1)
        self._write_json(self._key_path(h), doc)
        return doc

    def _load(self, h: str) -> dict[str, Any] | None:
        doc = self._read_json(self._key_path(h))
        if doc is not None and not isinstance(doc.get("keks"), dict):
            raise KeystoreCorrupt(f"{self._key_path(h)}: no keks")
        return doc

    def _unwrap_master(self, blob: Any, what: str, path: Path) -> bytes:
        try:
            return aes_key_unwrap(self._master, _unb64(blob, what, path))
        except InvalidUnwrap:
            raise KeyUnwrapFailed(
                f"{path}: {what} does not unwrap under {self.dir / MASTER_KEY_FILE}"
            ) from None

    def _kek(self, ref: _Ref) -> bytes:
        doc = self._load(ref.h)
        entry = None if doc is None else doc["keks"].get(str(ref.version))
        if entry is None:
            erased_through, erased_at = self._erased_through(ref.h)
            if ref.version <= erased_through:
                raise KeyErased(ref.text, erased_at)
            raise UnknownKey(ref.text, self.dir)
        path = self._key_path(ref.h)
        unwrapped = self._cache[path][2]  # filled by _load just now
        kek = unwrapped.get(ref.version)
        if kek is None:
            kek = self._unwrap_master(entry.get("wrapped"), f"KEK v{ref.version}", path)
            unwrapped[ref.version] = kek
        return kek

    # -- the Kms interface -----------------------------------------------------------------

    def wrap(self, key: str, plaintext: bytes) -> bytes:
        ref = self._parse(key)
        return _gcm_wrap(self._kek(ref), ref.canonical.encode(), plaintext)

    def unwrap(self, key: str, wrapped: bytes) -> bytes:
        ref = self._parse(key)
        kek = self._kek(ref)
        try:
            return _gcm_unwrap(kek, ref.canonical.encode(), wrapped)
        except InvalidTag:
            raise KeyUnwrapFailed(f"data key wrapped under {key} does not authenticate") from None

    def current_key_id(self, patient_id: str) -> str:
        """The write path's entry: provisions a first key, or a new generation after erasure."""
        h = self._hash(patient_id)
        doc = self._load(h)
        if doc is None:
            with self._locked():
                doc = self._load(h) or self._provision(h, patient_id)
        doc = self._remember_id(h, patient_id, doc)
        return format_key_id(patient_id, int(doc["current"]))

    def rotate(self, patient_id: str) -> str:
        h = self._hash(patient_id)
        with self._locked():
            doc = self._load(h)
            if doc is None:
                doc = self._provision(h, patient_id)
            else:
                doc.setdefault("patient", self._id_record(h, patient_id))
                self._new_version_doc(doc, max(int(v) for v in doc["keks"]) + 1)
                self._write_json(self._key_path(h), doc)
        return format_key_id(patient_id, int(doc["current"]))

    def salt_key(self, patient_id: str) -> bytes:
        """The patient's salt key; a patient never seen gets one, an erased one raises.

        Unlike :meth:`current_key_id`, this does not open a new generation after an erasure:
        asking for salts of an erased patient almost always means recomputing the salts of
        their old leaves, which must fail loudly (KeyErased) rather than silently return
        different salts. A write after erasure calls current_key_id first, which provisions.
        """
        h = self._hash(patient_id)
        doc = self._load(h)
        if doc is None:
            erased_through, erased_at = self._erased_through(h)
            if erased_through:
                raise KeyErased(f"salt key of patient {patient_id}", erased_at)
            with self._locked():
                doc = self._load(h) or self._provision(h, patient_id)
        doc = self._remember_id(h, patient_id, doc)
        return self._unwrap_master(doc.get("salt_key"), "salt key", self._key_path(h))

    def salts(self, patient_id: str, reading_ids: Sequence[str]) -> list[bytes]:
        return hashing.salts(self.salt_key(patient_id), reading_ids)

    def erase(self, patient_id: str) -> None:
        h = self._hash(patient_id)
        with self._locked():
            doc = self._load(h)
            erased_through, _ = self._erased_through(h)
            if doc is not None:
                erased_through = max([erased_through, *(int(v) for v in doc["keks"])])
            tomb = {
                "format": _FILE_FORMAT,
                "erased_through": erased_through,
                "erased_at": time.time(),
            }
            # Tombstone first: if we crash between the two steps the key file still exists
            # and a retry erases it; the reverse order could lose track of erased versions.
            self._write_json(self._tomb_path(h), tomb)
            self._shred(self._key_path(h))

    def has_keys(self, patient_id: str) -> bool:
        """True when the keystore holds a live key generation of the patient (something an
        erasure would destroy). Never creates one, unlike :meth:`current_key_id`."""
        return self._load(self._hash(patient_id)) is not None

    def is_erased(self, patient_id: str) -> bool:
        """True when the patient was erased and no new generation has been opened since."""
        h = self._hash(patient_id)
        return self._load(h) is None and self._erased_through(h)[0] > 0
