"""Parquet modular encryption of lake files, through the :class:`~streams.lake.keystore.Kms`.

Encryption: Parquet modular encryption (``pyarrow.parquet.encryption``), encrypted footer,
every column and the footer under the patient's current key (``uniform_encryption=True``, the
same as mapping every column to the footer key). Parquet generates a random data key per
file and asks our :class:`KmsBridge` to wrap it with the patient key (single wrapping: the
local keystore is in process, so the KMS round trips double wrapping saves are free, and
single wrapping means there is no cached intermediate key that could outlive an erasure).
The footer stores :meth:`Kms.key_ref` (an opaque HMAC reference), not the key id, because
the key id contains the patient id and files must not.

The keys themselves (wrapping, rotation, erasure) are the keystore's business
(:mod:`streams.lake.keystore`); this module only connects Parquet to it.
"""

from __future__ import annotations

import base64
import contextlib

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from streams.lake.keystore import Kms

__all__ = ["KmsBridge", "encryption_properties"]


class KmsBridge(pe.KmsClient):
    """Parquet's KmsClient, backed by our :class:`Kms`; remembers the keys it was asked for.

    Errors raised here reach the caller of pyarrow unchanged; ``keys_used`` lets the lake
    name the key in its own error.
    """

    def __init__(self, kms: Kms) -> None:
        super().__init__()
        self.kms = kms
        self.keys_used: list[str] = []

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
        self.keys_used.append(master_key_identifier)
        return base64.b64encode(self.kms.wrap(master_key_identifier, key_bytes))

    def unwrap_key(self, wrapped_key: str | bytes, master_key_identifier: str) -> bytes:
        self.keys_used.append(master_key_identifier)
        return self.kms.unwrap(master_key_identifier, base64.b64decode(wrapped_key))


def _crypto(kms: Kms) -> tuple[pe.CryptoFactory, KmsBridge]:
    """A fresh factory per operation: its caches then never outlive an erasure."""
    bridge = KmsBridge(kms)
    return pe.CryptoFactory(lambda _config: bridge), bridge


_KMS_CONFIG = pe.KmsConnectionConfig(kms_instance_id="vitalproof")


def encryption_properties(kms: Kms, key_id: str) -> pe.FileEncryptionProperties:
    """How a new file is encrypted: see the module docstring, under the patient key ``key_id``."""
    factory, _ = _crypto(kms)
    config = pe.EncryptionConfiguration(
        footer_key=kms.key_ref(key_id),
        uniform_encryption=True,
        plaintext_footer=False,
        double_wrapping=False,
        encryption_algorithm="AES_GCM_V1",
    )
    props = factory.file_encryption_properties(_KMS_CONFIG, config)
    factory.remove_cache_entries_for_all_tokens()  # see streams.lake.read._read_file
    return props


def _file_key_id(data: bytes, kms: Kms, patient_id: str) -> str:
    """The key id a sealed file is encrypted under, found by opening its footer."""
    factory, bridge = _crypto(kms)
    props = factory.file_decryption_properties(_KMS_CONFIG, pe.DecryptionConfiguration())
    with contextlib.suppress(Exception):  # an erased key still names itself before failing
        pq.read_metadata(pa.BufferReader(data), decryption_properties=props)
    if not bridge.keys_used:
        return ""
    return _key_id_from_ref(bridge.keys_used[0], patient_id)


def _key_id_from_ref(ref: str, patient_id: str) -> str:
    version = ref.rsplit(":v", 1)[-1]
    return f"patient:{patient_id}:v{version}" if version.isdigit() else ref
