"""clinic.audit: the hash-chained audit log. A tampered, deleted or reordered record is found
and named; the chain is checkable from exported JSON alone; the FHIR form validates; the
Merkle head is anchored through the batches' log and anchor job on the embedded chain."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anchor.chain import Chain
from anchor.job import AnchorJob
from anchor.log import MerkleLog
from clinic.audit import (
    GENESIS_HASH,
    ROLES,
    AuditAction,
    AuditEntry,
    AuditError,
    AuditLog,
    AuditRecord,
    CheckpointSource,
    Outcome,
    check_against_log,
    check_records,
    disclosure_proof,
    to_fhir_audit_event,
    to_fhir_bundle,
    verify_chain,
    verify_disclosure_proof,
)
from clinic.audit.log import prefix_roots
from vitalproof.settings import ChainSettings, PathSettings, Settings
from vitalproof_verify import merkle
from vitalproof_verify.leaves import log_leaf_hash
from vitalproof_verify.onchain import check_anchor_on_chain

T0 = 1_800_000_000.0


def _clock() -> Iterator[float]:
    return (T0 + i * 0.001 for i in itertools.count())


def entry(i: int, **over: Any) -> AuditEntry:
    fields: dict[str, Any] = dict(
        actor=f"Practitioner/dr-{i % 3}",
        role="clinician",
        patient_id=f"p-{i % 4}",
        action=AuditAction.READ,
        what=f"Observation?patient=p-{i % 4}&date=ge2027-01-0{1 + i % 9}",
        purpose="TREAT",
        outcome=Outcome.ALLOWED,
        reason=f"consent c-{i}",
        count=i + 1,
    )
    return AuditEntry(**(fields | over))


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    ticks = _clock()
    with AuditLog(tmp_path / "clinic" / "audit.sqlite3", clock=lambda: next(ticks)) as log:
        yield log


def filled(log: AuditLog, n: int = 6) -> list[AuditRecord]:
    return log.append_many([entry(i) for i in range(n)])


def tamper(path: Path, sql: str, *args: Any) -> None:
    """What an operator with the file can do: drop the append-only triggers and edit."""
    db = sqlite3.connect(path)
    try:
        db.execute("DROP TRIGGER IF EXISTS records_no_update")
        db.execute("DROP TRIGGER IF EXISTS records_no_delete")
        db.execute(sql, args)
        db.commit()
    finally:
        db.close()


# -- the chain ----------------------------------------------------------------------------


def test_append_chains_from_the_genesis_and_verifies(audit: AuditLog) -> None:
    first = audit.append(
        actor="Practitioner/dr-a",
        role="clinician",
        patient_id="p-1",
        action=AuditAction.READ,
        what="Observation?patient=p-1",
        purpose="TREAT",
        outcome=Outcome.ALLOWED,
        reason="consent c-1",
        count=12,
    )
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert first.time_us == int(T0 * 1_000_000)
    rest = filled(audit, 5)
    assert [r.seq for r in rest] == [2, 3, 4, 5, 6]
    assert rest[0].prev_hash == first.hash
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rest))
    assert audit.verify() == 6 == audit.size == len(audit)
    assert audit.records() == [first, *rest]
    assert audit.record(3) == rest[1]


def test_canonical_bytes_are_the_documented_json(audit: AuditLog) -> None:
    rec = audit.append(
        actor="Patient/p-1",
        role="patient",
        patient_id=None,
        action="subscribe",
        what="stream s-12",
        purpose=None,
        outcome="refused",
        reason="no grant",
    )
    assert rec.canonical_bytes() == (
        b'{"action":"subscribe","actor":"Patient/p-1","count":0,"outcome":"refused",'
        b'"patient_id":null,"prev_hash":"' + GENESIS_HASH.encode() + b'","purpose":null,'
        b'"reason":"no grant","role":"patient","seq":1,"time_us":1800000000000000,"v":1,'
        b'"what":"stream s-12"}'
    )
    import hashlib

    assert rec.hash == hashlib.sha256(rec.canonical_bytes()).hexdigest()


def test_records_filter_by_patient_actor_since_and_limit(audit: AuditLog) -> None:
    recs = filled(audit, 12)
    assert audit.records(patient_id="p-1") == [r for r in recs if r.patient_id == "p-1"]
    assert audit.records(actor="Practitioner/dr-2") == [
        r for r in recs if r.actor == "Practitioner/dr-2"
    ]
    assert audit.records(since_seq=10) == recs[10:]
    both = [r for r in recs if r.patient_id == "p-0" and r.actor == "Practitioner/dr-0"]
    assert both and audit.records(patient_id="p-0", actor="Practitioner/dr-0") == both
    assert audit.records(limit=3, since_seq=2) == recs[2:5]


@pytest.mark.parametrize(
    "bad",
    [
        {"role": "admin"},
        {"actor": ""},
        {"what": ""},
        {"reason": ""},
        {"count": -1},
        {"count": True},
        {"patient_id": ""},
        {"action": "delete"},
        {"outcome": "maybe"},
        {"outcome": Outcome.REFUSED, "count": 3},
        {"what": "x" * 5000},
    ],
)
def test_invalid_entries_are_refused_and_nothing_is_written(
    audit: AuditLog, bad: dict[str, Any]
) -> None:
    with pytest.raises(AuditError):
        audit.append_many([entry(0), entry(1, **bad)])
    assert audit.size == 0


def test_the_table_refuses_update_and_delete(audit: AuditLog) -> None:
    filled(audit, 3)
    db = sqlite3.connect(audit.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE records SET count = 0 WHERE seq = 2")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM records WHERE seq = 3")
    finally:
        db.close()
    assert audit.verify() == 3


# -- tampering ----------------------------------------------------------------------------

TAMPERS: dict[str, Any] = {
    "seq": 1003,
    "time_us": 1,
    "actor": "Practitioner/dr-x",
    "role": "operator",
    "patient_id": None,
    "action": "stream",
    "what": "Observation?patient=p-9",
    "purpose": "BTG",
    "outcome": "refused",
    "reason": "nothing to see",
    "count": 0,
    "prev_hash": "ab" * 32,
    "hash": "cd" * 32,
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_editing_any_field_of_a_record_is_found_and_named(audit: AuditLog, field: str) -> None:
    filled(audit, 6)
    tamper(audit.path, f"UPDATE records SET {field} = ? WHERE seq = 3", TAMPERS[field])
    with pytest.raises(AuditError) as err:
        audit.verify()
    assert err.value.seq == 3, err.value
    assert str(err.value).startswith("audit record 3: ")


@pytest.mark.parametrize("field", ["role", "action", "outcome"])
def test_an_invalid_value_written_into_the_table_is_named_too(audit: AuditLog, field: str) -> None:
    filled(audit, 4)
    tamper(audit.path, f"UPDATE records SET {field} = 'bogus' WHERE seq = 2")
    with pytest.raises(AuditError) as err:
        audit.verify()
    assert err.value.seq == 2


def test_a_rehashed_edit_breaks_the_next_link(audit: AuditLog) -> None:
    """The attacker recomputes the edited record's hash: its successor no longer links."""
    recs = filled(audit, 6)
    forged = AuditRecord.seal(
        entry(2, count=0, outcome=Outcome.REFUSED),
        seq=3,
        time_us=recs[2].time_us,
        prev_hash=recs[2].prev_hash,
    )
    tamper(
        audit.path,
        "UPDATE records SET count = ?, outcome = ?, hash = ? WHERE seq = 3",
        forged.count,
        forged.outcome.value,
        forged.hash,
    )
    with pytest.raises(AuditError, match="prev_hash") as err:
        audit.verify()
    assert err.value.seq == 4


def test_deleting_a_record_is_found(audit: AuditLog) -> None:
    filled(audit, 6)
    tamper(audit.path, "DELETE FROM records WHERE seq = 4")
    with pytest.raises(AuditError, match="missing") as err:
        audit.verify()
    assert err.value.seq == 4


def test_deleting_the_first_record_is_found(audit: AuditLog) -> None:
    filled(audit, 3)
    tamper(audit.path, "DELETE FROM records WHERE seq = 1")
    with pytest.raises(AuditError) as err:
        audit.verify()
    assert err.value.seq == 1


def test_reordering_records_is_found(audit: AuditLog) -> None:
    """Swap records 3 and 4 (renumbered, so the sequence still looks complete)."""
    filled(audit, 6)
    tamper(audit.path, "UPDATE records SET seq = -3 WHERE seq = 3")
    tamper(audit.path, "UPDATE records SET seq = 3 WHERE seq = 4")
    tamper(audit.path, "UPDATE records SET seq = 4 WHERE seq = -3")
    with pytest.raises(AuditError) as err:
        audit.verify()
    assert err.value.seq == 3


def test_a_truncated_tail_is_found_by_the_checkpoint(audit: AuditLog) -> None:
    """Cutting the last records leaves a valid chain; the checkpoint (and the anchored log
    entry, below) is what notices."""
    filled(audit, 6)
    tamper(audit.path, "DELETE FROM records WHERE seq = 6")
    assert audit.verify() == 5  # undetectable without a checkpoint: why they are anchored
    filled(audit, 1)
    assert audit.checkpoint() is not None
    tamper(audit.path, "DELETE FROM records WHERE seq = 6")
    with pytest.raises(AuditError, match="removed") as err:
        audit.verify()
    assert err.value.seq == 6


def rewrite_from(path: Path, seq: int) -> None:
    """The careful attacker: zero the counts from ``seq`` on and recompute every hash after
    it, so the chain itself verifies again."""
    with AuditLog(path, readonly=True) as audit:
        recs = audit.records()
    prev = recs[seq - 2].hash if seq > 1 else GENESIS_HASH
    for r in recs[seq - 1 :]:
        fake = AuditRecord.seal(
            AuditEntry(
                actor=r.actor,
                role=r.role,
                patient_id=r.patient_id,
                action=r.action,
                what=r.what,
                purpose=r.purpose,
                outcome=Outcome.REFUSED,
                reason=r.reason,
                count=0,
            ),
            seq=r.seq,
            time_us=r.time_us,
            prev_hash=prev,
        )
        tamper(
            path,
            "UPDATE records SET count = 0, outcome = 'refused', prev_hash = ?, hash = ? "
            "WHERE seq = ?",
            fake.prev_hash,
            fake.hash,
            r.seq,
        )
        prev = fake.hash


def test_a_rewritten_history_is_found_by_the_checkpoint(tmp_path: Path) -> None:
    """Rewrite records 2.. consistently (every hash recomputed): the chain verifies, the
    checkpoint's root does not."""
    path = tmp_path / "a.sqlite3"
    with AuditLog(path) as audit:
        filled(audit, 5)
        audit.checkpoint()
    rewrite_from(path, 2)
    with AuditLog(path) as audit:
        with pytest.raises(AuditError, match="checkpoint audit-5"):
            audit.verify()
        with pytest.raises(AuditError, match="checkpoint audit-5"):
            audit.checkpoint()
    tamper(path, "DELETE FROM checkpoints")
    with AuditLog(path) as audit:
        assert audit.verify() == 5  # a consistent forgery: only an outside root can tell


def test_checkpoint_refuses_a_broken_tail(audit: AuditLog) -> None:
    filled(audit, 4)
    assert audit.checkpoint() == audit.checkpoint()  # the same head twice: one checkpoint
    filled(audit, 3)
    tamper(audit.path, "UPDATE records SET what = 'x' WHERE seq = 6")
    with pytest.raises(AuditError) as err:
        audit.checkpoint()
    assert err.value.seq == 6
    assert [c.batch_size for c in audit.checkpoints()] == [4]


# -- property: random histories ---------------------------------------------------------

entries = st.builds(
    AuditEntry,
    actor=st.sampled_from(["Practitioner/dr-a", "Practitioner/dr-b", "Patient/p-1", "ops"]),
    role=st.sampled_from(sorted(ROLES)),
    patient_id=st.one_of(st.none(), st.sampled_from(["p-1", "p-2", "pätient-3"])),
    action=st.sampled_from(list(AuditAction)),
    what=st.text(min_size=1, max_size=40),
    purpose=st.one_of(st.none(), st.sampled_from(["TREAT", "BTG", "HRESCH", "PATRQT"])),
    outcome=st.just(Outcome.ALLOWED),
    reason=st.text(min_size=1, max_size=30),
    count=st.integers(min_value=0, max_value=10**6),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(entries, min_size=1, max_size=5), min_size=1, max_size=8),
    data=st.data(),
)
def test_random_histories_verify_export_and_any_edit_is_named(
    batches: list[list[AuditEntry]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "audit.sqlite3"
        with AuditLog(path) as audit:
            stored: list[AuditRecord] = []
            for batch in batches:
                if len(batch) == 1:
                    b = batch[0]
                    stored.append(
                        audit.append(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)})
                    )
                else:
                    stored.extend(audit.append_many(batch))
            n = len(stored)
            assert audit.verify() == n
            assert [r.seq for r in stored] == list(range(1, n + 1))
            assert audit.records() == stored
            # the export checks without the database, whole or per patient
            exported = [AuditRecord.from_json_dict(r.to_json_dict()) for r in stored]
            assert exported == stored
            assert verify_chain(exported) == (n, stored[-1].hash)
            assert check_records(exported) == (n, n)
            mine = audit.records(patient_id="p-1")
            assert check_records(mine)[0] == len(mine)
            # the Merkle head is RFC 9162 over the record hashes
            head = audit.head()
            leaves = [merkle.leaf_hash(r.leaf) for r in stored]
            assert head.size == n and head.root == merkle.root(leaves)
            seq = data.draw(st.integers(1, n), label="seq")
            merkle.verify_inclusion(
                leaves[seq - 1], seq - 1, n, audit.inclusion_proof(seq), head.root
            )
            field = data.draw(st.sampled_from(sorted(TAMPERS)), label="field")
            value = TAMPERS[field]
            if getattr(stored[seq - 1], field) == value:
                return  # not an edit
            if field == "seq" and n >= 1:
                value = n + 1000
        tamper(path, f"UPDATE records SET {field} = ? WHERE seq = ?", value, seq)
        with AuditLog(path, readonly=True) as audit, pytest.raises(AuditError) as err:
            audit.verify()
        assert err.value.seq == seq, (field, err.value)
        # and the edited export is caught without the database
        doc = [r.to_json_dict() for r in stored]
        doc[seq - 1][field] = value
        with pytest.raises(AuditError):
            check_records([AuditRecord.from_json_dict(x) for x in doc])


# -- transactions, concurrency, read-only -------------------------------------------------


def test_append_many_is_one_transaction(audit: AuditLog) -> None:
    statements: list[str] = []
    audit._db.set_trace_callback(statements.append)
    recs = audit.append_many([entry(i) for i in range(200)])
    audit._db.set_trace_callback(None)
    assert len(recs) == 200
    assert sum(s.startswith("BEGIN") for s in statements) == 1
    assert sum(s == "COMMIT" for s in statements) == 1
    assert len({r.time_us for r in recs}) == 1  # one delivery batch, one time
    assert audit.append_many([]) == []


def test_append_many_is_all_or_nothing(audit: AuditLog) -> None:
    filled(audit, 2)
    db = sqlite3.connect(audit.path)
    db.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON records WHEN NEW.seq = 7 "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    db.commit()
    with pytest.raises(AuditError, match="disk on fire"):
        audit.append_many([entry(i) for i in range(10)])
    assert audit.size == 2
    db.execute("DROP TRIGGER fail")
    db.commit()
    db.close()
    assert [r.seq for r in filled(audit, 3)] == [3, 4, 5]
    assert audit.verify() == 5


def test_writers_in_parallel_keep_one_chain(tmp_path: Path) -> None:
    """Two connections (as two processes would have) appending at once: SQLite's write lock
    makes each append read the latest hash, so the chain has no fork and no gap."""
    path = tmp_path / "audit.sqlite3"
    AuditLog(path).close()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with AuditLog(path) as log:
                for i in range(40):
                    log.append_many([entry(k * 100 + i), entry(k * 100 + i + 50)])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with AuditLog(path, readonly=True) as log:
        assert log.verify() == 240


def test_readonly_refuses_a_missing_log_and_writes(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        AuditLog(tmp_path / "nope.sqlite3", readonly=True)
    assert not (tmp_path / "nope.sqlite3").exists()
    with AuditLog(tmp_path / "a.sqlite3") as log:
        filled(log, 2)
    with AuditLog(tmp_path / "a.sqlite3", readonly=True) as log:
        assert log.verify() == 2
        with pytest.raises(AuditError, match="read-only"):
            log.append_many([entry(1)])


def test_a_file_that_is_not_an_audit_log_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(AuditError, match="not a usable audit log"):
        AuditLog(tmp_path / "x.sqlite3")
    db = sqlite3.connect(tmp_path / "y.sqlite3")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    db.commit()
    db.close()
    with pytest.raises(AuditError, match="format"):
        AuditLog(tmp_path / "y.sqlite3")


def test_heads_are_consistent_as_the_log_grows(audit: AuditLog) -> None:
    filled(audit, 5)
    old = audit.head()
    filled(audit, 8)
    new = audit.head()
    merkle.verify_consistency(
        old.size, new.size, old.root, new.root, audit.consistency_proof(old.size)
    )
    assert audit.head(5) == old
    assert audit.head(0).root == merkle.EMPTY_ROOT
    assert audit.checkpoint() is not None


def test_prefix_roots_are_the_rfc_roots() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(70)]
    sizes = list(range(71))
    assert prefix_roots(leaves, reversed(sizes)) == {n: merkle.root(leaves[:n]) for n in sizes}
    assert prefix_roots(leaves, [64, 3]) == {
        3: merkle.root(leaves[:3]),
        64: merkle.root(leaves[:64]),
    }


def test_an_empty_log_has_no_checkpoint(audit: AuditLog) -> None:
    assert audit.checkpoint() is None
    assert audit.verify() == 0


# -- FHIR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", list(AuditAction))
@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_record_is_a_valid_fhir_audit_event(
    audit: AuditLog, action: AuditAction, outcome: Outcome
) -> None:
    purpose = "BTG" if action is AuditAction.BREAK_GLASS else "TREAT"
    rec = audit.append(
        actor="Practitioner/dr-a",
        role="clinician",
        patient_id="p-1",
        action=action,
        what="Observation?patient=p-1&date=ge2027-01-01",
        purpose=purpose,
        outcome=outcome,
        reason="consent c-1" if outcome is Outcome.ALLOWED else "no grant covers heart_rate",
        count=7 if outcome is Outcome.ALLOWED else 0,
    )
    doc = to_fhir_audit_event(rec)
    event = AuditEvent.model_validate(doc)
    assert event.outcome == ("0" if outcome is Outcome.ALLOWED else "4")
    assert event.outcomeDesc == rec.reason
    assert event.agent[0].who.reference == "Practitioner/dr-a"
    assert event.agent[0].requestor is True
    assert event.purposeOfEvent[0].coding[0].code == purpose
    assert event.entity[0].what.reference == "Patient/p-1"
    assert {c.code for c in event.subtype} >= {action.value}
    details = {d.type: d.valueString for d in event.entity[1].detail}
    assert details == {
        "count": str(rec.count),
        "seq": str(rec.seq),
        "time_us": str(rec.time_us),
        "prev_hash": rec.prev_hash,
        "hash": rec.hash,
    }
    assert doc["recorded"] == "2027-01-15T08:00:00.000000Z"


def test_fhir_without_patient_or_purpose_and_a_system_actor(audit: AuditLog) -> None:
    rec = audit.append(
        actor="vitalproof-service",
        role="system",
        patient_id=None,
        action=AuditAction.CONSENT,
        what="Consent?status=inactive",
        purpose=None,
        outcome=Outcome.ALLOWED,
        reason="expired grants closed",
    )
    event = AuditEvent.model_validate(to_fhir_audit_event(rec))
    assert event.purposeOfEvent is None
    assert event.agent[0].who.identifier.value == "vitalproof-service"
    assert event.agent[0].requestor is False
    assert len(event.entity) == 1
    bundle = Bundle.model_validate(to_fhir_bundle([rec, *filled(audit, 2)]))
    assert len(bundle.entry) == 3


# -- anchoring ----------------------------------------------------------------------------


def _receipt_fields(r: Any) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d.pop("gas_used")
    return d


def test_audit_checkpoints_are_anchored_with_the_batches(tmp_path: Path) -> None:
    """Checkpoint source -> anchor job -> embedded chain: the audit head is an entry of the
    anchored log (inclusion proof), each record is in the head, the anchor is on-chain; an
    edit below an anchored checkpoint is caught against the log."""
    settings_ = Settings(paths=PathSettings(home=tmp_path), chain=ChainSettings(kind="embedded"))
    audit_path = settings_.paths.audit_path
    source = CheckpointSource(audit_path)
    assert source() == [] and not audit_path.exists()  # no audit log: nothing, no file

    chain = Chain.embedded()
    job = AnchorJob(settings_, chain, checkpoints=source)
    try:
        with AuditLog(audit_path) as audit:
            recs = filled(audit, 5)
        job.log.append("b-0001", bytes(range(32)), 10)  # a sealed batch, as from a manifest
        receipt = job.anchor_once()
        assert receipt is not None and receipt.tree_size == 2
        check_anchor_on_chain(chain.w3, **_receipt_fields(receipt))

        index = job.log.index_of("audit-5")
        assert index == 1
        with AuditLog(audit_path) as audit:
            head = audit.head()
            assert job.log.entry(index).batch_root == head.root
            proof = job.log.inclusion_proof(index, receipt.tree_size)
            merkle.verify_inclusion(
                log_leaf_hash("audit-5", head.root, 5),
                index,
                receipt.tree_size,
                proof,
                receipt.root,
            )
            # a patient's record: record -> audit head -> anchored log -> chain
            doc = disclosure_proof(audit, job.log, recs[2].seq)
            verify_disclosure_proof(doc)
            assert doc["log"]["root"] == receipt.root.hex()
            assert doc["anchor"]["tx_hash"] == receipt.tx_hash
            bad = {**doc, "record": {**doc["record"], "count": 999}}
            with pytest.raises(AuditError):
                verify_disclosure_proof(bad)
            assert [c.size for c in check_against_log(audit, job.log)] == [5]

        assert job.anchor_once() is None  # nothing new: no entry, no transaction
        with AuditLog(audit_path) as audit:
            filled(audit, 2)
        second = job.anchor_once()
        assert second is not None and second.tree_size == 3
        assert job.log.index_of("audit-7") == 2
        assert chain.head().tree_size == 3
        with AuditLog(audit_path) as audit:
            found = check_against_log(audit, job.log)
            assert [(c.size, c.anchored) for c in found] == [(5, True), (7, True)]
            with pytest.raises(AuditError, match="no anchored checkpoint"):
                filled(audit, 1)
                disclosure_proof(audit, job.log, 8)
    finally:
        job.close()
        source.close()

    pristine = audit_path.read_bytes()  # every connection is closed: no WAL beside it
    # the operator rewrites anchored records consistently and drops the audit checkpoints:
    # the chain verifies, the anchored log does not agree
    rewrite_from(audit_path, 2)
    tamper(audit_path, "DELETE FROM checkpoints")
    with (
        MerkleLog(settings_.anchor_dir / "log", readonly=True) as mlog,
        AuditLog(audit_path, readonly=True) as audit,
    ):
        assert audit.verify() == 8
        with pytest.raises(AuditError, match="audit-5"):
            check_against_log(audit, mlog)
    # or removes the last records, below an anchored checkpoint
    audit_path.write_bytes(pristine)
    tamper(audit_path, "DELETE FROM records WHERE seq > 6")
    tamper(audit_path, "DELETE FROM checkpoints")
    with (
        MerkleLog(settings_.anchor_dir / "log", readonly=True) as mlog,
        AuditLog(audit_path, readonly=True) as audit,
        pytest.raises(AuditError, match="removed"),
    ):
        check_against_log(audit, mlog)


def test_a_broken_audit_log_does_not_stop_the_batches(tmp_path: Path) -> None:
    settings_ = Settings(paths=PathSettings(home=tmp_path), chain=ChainSettings(kind="embedded"))
    with AuditLog(settings_.paths.audit_path) as audit:
        filled(audit, 3)
    tamper(settings_.paths.audit_path, "UPDATE records SET actor = 'x' WHERE seq = 2")
    source = CheckpointSource(settings_.paths.audit_path)
    job = AnchorJob(settings_, Chain.embedded(), checkpoints=source)
    try:
        job.log.append("b-0001", bytes(range(32)), 10)
        receipt = job.anchor_once()
        assert receipt is not None and receipt.tree_size == 1  # the batch, not the audit
        assert job.log.index_of("audit-3") is None
    finally:
        job.close()
        source.close()


def test_fhir_recorded_time_is_exact_to_the_microsecond() -> None:
    rec = AuditRecord.seal(entry(0), seq=1, time_us=1_800_000_000_999_999, prev_hash=GENESIS_HASH)
    assert to_fhir_audit_event(rec)["recorded"] == "2027-01-15T08:00:00.999999Z"
