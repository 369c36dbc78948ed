"""LocalKeystore: permissions, wrapping, rotation, erasure and leaf salts."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.lake.keystore import (
    InsecureKeyFile,
    KeyErased,
    KeyUnwrapFailed,
    Kms,
    LocalKeystore,
    UnknownKey,
    parse_key_id,
)
from vitalproof.errors import VitalproofError

DATA_KEY = bytes(range(16))


def test_master_key_created_owner_only(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path / "keys")
    assert isinstance(ks, Kms)
    master = tmp_path / "keys" / "master.key"
    assert master.stat().st_mode & 0o777 == 0o600
    assert len(master.read_bytes()) == 32
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o666])
def test_wider_master_key_permissions_refused(tmp_path: Path, mode: int) -> None:
    LocalKeystore(tmp_path)
    os.chmod(tmp_path / "master.key", mode)
    with pytest.raises(InsecureKeyFile) as err:
        LocalKeystore(tmp_path)
    assert isinstance(err.value, VitalproofError)
    assert "chmod 600" in err.value.diagnostics()
    assert "master.key" in err.value.diagnostics()


def test_wider_patient_key_file_permissions_refused(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    key_id = ks.current_key_id("p-1")
    (patient_file,) = [p for p in tmp_path.glob("*.json") if not p.name.endswith(".tomb.json")]
    os.chmod(patient_file, 0o644)
    with pytest.raises(InsecureKeyFile):
        ks.wrap(key_id, DATA_KEY)


def test_key_files_do_not_name_the_patient(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    ks.current_key_id("patient-with-a-name")
    for p in tmp_path.iterdir():
        assert "patient-with-a-name" not in p.name
        if p.is_file():
            assert b"patient-with-a-name" not in p.read_bytes()


def test_wrap_unwrap_round_trip(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    key_id = ks.current_key_id("p-1")
    assert key_id == "patient:p-1:v1"
    assert parse_key_id(key_id) == ("p-1", 1)
    wrapped = ks.wrap(key_id, DATA_KEY)
    assert DATA_KEY not in wrapped
    assert ks.unwrap(key_id, wrapped) == DATA_KEY
    # the opaque reference names the same key
    ref = ks.key_ref(key_id)
    assert "p-1" not in ref
    assert ks.unwrap(ref, wrapped) == DATA_KEY
    assert ks.unwrap(key_id, ks.wrap(ref, DATA_KEY)) == DATA_KEY
    # a second instance over the same folder (another process) reads it too
    assert LocalKeystore(tmp_path).unwrap(key_id, wrapped) == DATA_KEY


def test_wrapped_key_is_bound_to_its_key(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    a, b = ks.current_key_id("p-a"), ks.current_key_id("p-b")
    wrapped = ks.wrap(a, DATA_KEY)
    with pytest.raises(KeyUnwrapFailed):
        ks.unwrap(b, wrapped)
    tampered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(KeyUnwrapFailed):
        ks.unwrap(a, tampered)


def test_unknown_keys(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    with pytest.raises(UnknownKey):
        ks.unwrap("patient:nobody:v1", b"\x00" * 40)
    with pytest.raises(UnknownKey):
        ks.unwrap("not a key id", b"\x00" * 40)
    ks.current_key_id("p-1")
    with pytest.raises(UnknownKey) as err:
        ks.unwrap("patient:p-1:v7", b"\x00" * 40)
    assert str(tmp_path) in err.value.diagnostics()


def test_rotation_keeps_old_versions_readable(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    v1 = ks.current_key_id("p-1")
    old = ks.wrap(v1, DATA_KEY)
    v2 = ks.rotate("p-1")
    assert v2 == "patient:p-1:v2"
    assert ks.current_key_id("p-1") == v2  # new writes use the new version
    assert ks.unwrap(v1, old) == DATA_KEY  # old files stay readable
    new = ks.wrap(v2, b"k" * 16)
    assert ks.unwrap(v2, new) == b"k" * 16
    with pytest.raises(KeyUnwrapFailed):
        ks.unwrap(v1, new)


def test_salts_survive_rotation(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    before = ks.salts("p-1", ["r1"])
    ks.rotate("p-1")
    assert ks.salts("p-1", ["r1"]) == before


def test_erase_destroys_keys_and_salts_only_of_that_patient(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    gone, kept = ks.current_key_id("p-gone"), ks.current_key_id("p-kept")
    ks.rotate("p-gone")
    wrapped_gone, wrapped_kept = ks.wrap(gone, DATA_KEY), ks.wrap(kept, DATA_KEY)
    kept_salts = ks.salts("p-kept", ["r1", "r2"])
    ks.salts("p-gone", ["r1"])
    files_before = {p.name for p in tmp_path.iterdir()}

    ks.erase("p-gone")

    with pytest.raises(KeyErased) as err:
        ks.unwrap(gone, wrapped_gone)
    assert "erased" in err.value.diagnostics()
    with pytest.raises(KeyErased):
        ks.unwrap("patient:p-gone:v2", wrapped_gone)
    with pytest.raises(KeyErased):
        ks.salts("p-gone", ["r1"])
    with pytest.raises(KeyErased):
        ks.salt_key("p-gone")
    with pytest.raises(KeyErased):  # another process sees the erasure too
        LocalKeystore(tmp_path).salts("p-gone", ["r1"])
    assert ks.is_erased("p-gone")
    # the other patient is untouched
    assert ks.unwrap(kept, wrapped_kept) == DATA_KEY
    assert ks.salts("p-kept", ["r1", "r2"]) == kept_salts
    # the key file is gone, a tombstone took its place
    files_after = {p.name for p in tmp_path.iterdir()}
    assert len(files_before - files_after) == 1
    assert any(n.endswith(".tomb.json") for n in files_after - files_before)


def test_write_after_erase_gets_a_new_key(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    old_salts = ks.salts("p-1", ["r1"])
    ks.rotate("p-1")  # v2
    ks.erase("p-1")
    new_id = ks.current_key_id("p-1")
    assert new_id == "patient:p-1:v3"  # never reuses an erased version
    assert not ks.is_erased("p-1")
    wrapped = ks.wrap(new_id, DATA_KEY)
    assert ks.unwrap(new_id, wrapped) == DATA_KEY
    assert ks.salts("p-1", ["r1"]) != old_salts  # a new salt key: old leaves stay unlinkable
    with pytest.raises(KeyErased):
        ks.unwrap("patient:p-1:v1", wrapped)
    ks.erase("p-1")
    with pytest.raises(KeyErased):
        ks.unwrap(new_id, wrapped)


def test_salts_are_hmac_of_reading_id(tmp_path: Path) -> None:
    ks = LocalKeystore(tmp_path)
    ids = ["a" * 32, "b" * 32, "a" * 32]
    salts = ks.salts("p-1", ids)
    key = ks.salt_key("p-1")
    assert salts == [hmac.new(key, i.encode(), hashlib.sha256).digest() for i in ids]
    assert salts[0] == salts[2] and salts[0] != salts[1]
    assert len(salts[0]) == 32


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=10))
def test_salts_deterministic_per_patient_and_differ_across_patients(
    tmp_path_factory: pytest.TempPathFactory, ids: list[str]
) -> None:
    keys = tmp_path_factory.mktemp("keys")
    ks = LocalKeystore(keys)
    first = ks.salts("p-a", ids)
    assert first == ks.salts("p-a", ids)
    assert first == LocalKeystore(keys).salts("p-a", ids)
    other = ks.salts("p-b", ids)
    assert all(x != y for x, y in zip(first, other, strict=True))


@given(st.binary(min_size=0, max_size=100), st.lists(st.text(max_size=40), max_size=20))
def test_salts_equal_the_standard_hmac(key: bytes, ids: list[str]) -> None:
    import hashlib
    import hmac

    from vitalproof.hashing import salts

    want = [hmac.new(key, rid.encode(), hashlib.sha256).digest() for rid in ids]
    assert salts(key, ids) == want


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._@+", min_size=1, max_size=40))
def test_pseudonyms_round_trip_through_the_id_record(tmp_path_factory: pytest.TempPathFactory,
                                                      patient: str) -> None:  # fmt: skip
    """Every id the lake can hold maps to a 32-hex pseudonym (a safe folder name, no trace
    of a longer id) and back; erasure forgets the way back."""
    ks = LocalKeystore(tmp_path_factory.mktemp("keys"))
    ks.current_key_id(patient)
    h = ks.pseudonym(patient)
    assert len(h) == 32 and set(h) <= set("0123456789abcdef")
    assert len(patient) < 8 or patient not in h
    assert ks.patient_of(h) == patient
    ks.erase(patient)
    assert ks.patient_of(h) is None and ks.pseudonym_erased(h)
    assert ks.pseudonym(patient) == h  # the name stays: the files it names stay unreadable


def test_an_id_record_moved_to_another_patient_fails_authentication(tmp_path: Path) -> None:
    """The record's associated data is the pseudonym: copied into another patient's key file
    it does not decrypt, so a listing cannot be made to show one patient's data as another's."""
    import json

    ks = LocalKeystore(tmp_path / "keys")
    ks.current_key_id("p-1")
    ks.current_key_id("p-2")
    h1, h2 = ks.pseudonym("p-1"), ks.pseudonym("p-2")
    one = json.loads((ks.dir / f"{h1}.json").read_bytes())
    two = json.loads((ks.dir / f"{h2}.json").read_bytes())
    two["patient"] = one["patient"]
    (ks.dir / f"{h2}.json").write_text(json.dumps(two))
    with pytest.raises(KeyUnwrapFailed, match="patient id record"):
        LocalKeystore(tmp_path / "keys").patient_of(h2)
