"""Consent: the per-reading rule, the append-only store, and FHIR Consent in and out.

The rule is checked against a reference written here independently of ``Grant.covers``
(hypothesis); the store against its raw table (a revocation adds a row and rewrites none);
FHIR by a round trip through ``fhir.resources``' R4B model and by malformed documents whose
error must name the field.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.consent import Consent as ConsentR5
from fhir.resources.R4B.consent import Consent as ConsentR4
from hypothesis import given, settings
from hypothesis import strategies as st

from clinic.consent import (
    ALL_VITALS,
    METRICS,
    ConsentConflict,
    ConsentIndex,
    ConsentStatus,
    Grant,
    InvalidConsent,
    UnknownGrant,
    decide,
    iso_from_us,
)
from clinic.consent_store import ConsentStore
from clinic.fhir_consent import consent_to_fhir, grant_from_fhir
from vitalproof.settings import PathSettings

T0 = 1_796_000_000_000_000  # 2026-11-30T00:53:20Z
HOUR = 3_600_000_000
DR_A, DR_B, ICU = "Practitioner/dr-a", "Practitioner/dr-b", "Organization/icu"


def grant(**kw: Any) -> Grant:
    fields: dict[str, Any] = {
        "grant_id": "g-1",
        "version": 1,
        "patient_id": "p1",
        "grantee": DR_A,
        "metrics": frozenset({"heart_rate"}),
        "purpose": "TREAT",
        "start_us": T0,
        "end_us": T0 + HOUR,
        "status": ConsentStatus.ACTIVE,
        "recorded_us": T0,
        "recorded_by": "test",
    }
    return Grant(**(fields | kw))


# -- the rule -------------------------------------------------------------------------------


def reference_covers(g: Grant, grantee: str, patient: str, metric: str, at: int) -> bool:
    """The rule in words: patient, grantee, metric, period and status all match."""
    if g.status.value != "active":
        return False
    if g.patient_id != patient or g.grantee != grantee:
        return False
    in_period = g.start_us <= at and (g.end_us is None or at < g.end_us)
    names_metric = g.metrics == {"*"} or metric in g.metrics
    return in_period and names_metric


PATIENTS = ["p1", "p2", "p_3"]
GRANTEES = [DR_A, DR_B, ICU]
SOME_METRICS = ["heart_rate", "spo2", "rr_interval", "systolic_bp"]


@st.composite
def grants(draw: st.DrawFn, n: int = 0) -> Grant:
    start = draw(st.integers(T0 - 10 * HOUR, T0 + 10 * HOUR))
    end = draw(st.none() | st.integers(start + 1, start + 20 * HOUR))
    metrics = draw(
        st.just(frozenset({ALL_VITALS}))
        | st.frozensets(st.sampled_from(SOME_METRICS), min_size=1, max_size=3)
    )
    return grant(
        grant_id=f"g-{n}-{draw(st.integers(0, 10**6))}",
        patient_id=draw(st.sampled_from(PATIENTS)),
        grantee=draw(st.sampled_from(GRANTEES)),
        metrics=metrics,
        start_us=start,
        end_us=end,
        status=draw(st.sampled_from(list(ConsentStatus))),
    )


readings = st.tuples(
    st.sampled_from(GRANTEES),
    st.sampled_from(PATIENTS),
    st.sampled_from(SOME_METRICS),
    st.integers(T0 - 12 * HOUR, T0 + 32 * HOUR),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(grants(), max_size=6), st.lists(readings, min_size=1, max_size=10))
def test_covers_iff_every_condition_holds(gs: list[Grant], rs: list[tuple[str, ...]]) -> None:
    gs = [replace(g, grant_id=f"g-{i}") for i, g in enumerate(gs)]
    index = ConsentIndex(gs)
    for grantee, patient, metric, at in rs:
        assert isinstance(at, int)
        for g in gs:
            want = reference_covers(g, grantee, patient, metric, at)
            got = g.covers(grantee=grantee, patient_id=patient, metric=metric, at_us=at)
            assert got == want, (g, grantee, patient, metric, at)
        want_any = any(reference_covers(g, grantee, patient, metric, at) for g in gs)
        d = decide(gs, grantee=grantee, patient_id=patient, metric=metric, at_us=at)
        assert d.allowed == want_any
        assert index.allowed(grantee=grantee, patient_id=patient, metric=metric, at_us=at) == (
            want_any
        )
        assert index.decide(grantee=grantee, patient_id=patient, metric=metric, at_us=at) == d
        if d.allowed:
            g = next(g for g in gs if g.grant_id == d.grant_id)
            assert reference_covers(g, grantee, patient, metric, at)
        else:
            assert d.reason


@pytest.mark.parametrize(
    ("grants_", "metric", "at", "reason"),
    [
        ([], "heart_rate", T0, "no grant from patient p1 to Practitioner/dr-a"),
        (
            [grant(status=ConsentStatus.INACTIVE, recorded_us=T0 + 60_000_000, version=2)],
            "heart_rate",
            T0 + 2 * 60_000_000,
            "grant g-1 was revoked at 2026-11-30T00:54:20Z by test",
        ),
        ([grant()], "heart_rate", T0 + HOUR, "grant g-1 expired at 2026-11-30T01:53:20Z"),
        ([grant()], "heart_rate", T0 - 1, "grant g-1 starts at 2026-11-30T00:53:20Z"),
        (
            [grant()],
            "spo2",
            T0,
            "grant g-1 does not cover metric spo2 (it covers heart_rate)",
        ),
        ([grant(metrics=frozenset({ALL_VITALS}))], "no_such", T0, "unknown metric 'no_such'"),
        ([grant(grantee=DR_B)], "heart_rate", T0, "no grant from patient p1 to Practitioner/dr-a"),
    ],
)
def test_refusals_say_why(grants_: list[Grant], metric: str, at: int, reason: str) -> None:
    d = decide(grants_, grantee=DR_A, patient_id="p1", metric=metric, at_us=at)
    assert not d.allowed
    assert d.reason == reason


def test_the_closest_grant_explains_a_refusal() -> None:
    revoked = grant(grant_id="g-old", status=ConsentStatus.INACTIVE)
    expired = grant(grant_id="g-exp", start_us=T0 - 2 * HOUR, end_us=T0 - HOUR)
    other_metric = grant(grant_id="g-spo2", metrics=frozenset({"spo2"}))
    d = decide(
        [revoked, expired, other_metric],
        grantee=DR_A,
        patient_id="p1",
        metric="heart_rate",
        at_us=T0,
    )
    assert (d.grant_id, d.reason) == ("g-exp", f"grant g-exp expired at {iso_from_us(T0 - HOUR)}")
    ok = decide(
        [revoked, grant(grant_id="g-new")],
        grantee=DR_A,
        patient_id="p1",
        metric="heart_rate",
        at_us=T0,
    )
    assert ok.allowed and ok.grant_id == "g-new" and "TREAT" in ok.reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"patient_id": "p 1"}, "patient_id"),
        ({"grant_id": ""}, "grant_id"),
        ({"grantee": "Patient/p1"}, "grantee"),
        ({"grantee": "Practitioner/dr_a"}, "grantee"),  # '_' is no FHIR id
        ({"metrics": frozenset()}, "metrics"),
        ({"metrics": frozenset({"hr"})}, "metrics"),
        ({"metrics": frozenset({ALL_VITALS, "spo2"})}, "metrics"),
        ({"purpose": "treatment"}, "purpose"),
        ({"end_us": T0}, "end"),
        ({"version": 0}, "version"),
        ({"recorded_by": ""}, "recorded_by"),
    ],
)
def test_an_invalid_grant_names_its_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidConsent) as e:
        grant(**change)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_index_patients_and_speed() -> None:
    gs = [grant(grant_id=f"g-{i}", patient_id=f"p{i}", grantee=DR_A) for i in range(1000)]
    gs.append(grant(grant_id="g-r", patient_id="p-r", status=ConsentStatus.INACTIVE))
    gs.append(grant(grant_id="g-b", patient_id="p-b", grantee=DR_B))
    index = ConsentIndex(gs)
    assert index.patients(DR_A, at_us=T0) == {f"p{i}" for i in range(1000)}
    assert index.patients(DR_A, at_us=T0 + HOUR) == set()
    assert index.patients(DR_B, at_us=T0) == {"p-b"}
    assert len(index) == 1002
    n = 100_000
    t = time.perf_counter()
    for i in range(n):
        index.allowed(grantee=DR_A, patient_id="p7", metric="heart_rate", at_us=T0 + i)
    assert time.perf_counter() - t < 2.0, "the per-reading check must stay a few comparisons"


# -- the store ------------------------------------------------------------------------------


class Clock:
    def __init__(self, t_us: int = T0) -> None:
        self.t_us = t_us

    def __call__(self) -> float:
        return self.t_us / 1_000_000


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    with ConsentStore(tmp_path / "clinic" / "consent.sqlite3", clock=clock) as s:
        yield s


def raw_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT * FROM grant_versions ORDER BY seq").fetchall()


def test_revoke_appends_a_version_and_rewrites_nothing(store: ConsentStore, clock: Clock) -> None:
    g = store.grant(
        patient_id="p1",
        grantee=DR_A,
        metrics=["heart_rate", "spo2"],
        purpose="TREAT",
        end_us=T0 + HOUR,
        actor="patient:p1",
    )
    assert (g.version, g.status, g.start_us, g.recorded_us) == (1, ConsentStatus.ACTIVE, T0, T0)
    before = raw_rows(store.path)
    assert store.decide(grantee=DR_A, patient_id="p1", metric="spo2", at_us=T0).allowed
    clock.t_us += 1000
    r = store.revoke(g.grant_id, actor="patient:p1")
    after = raw_rows(store.path)
    assert after[: len(before)] == before  # the old row, byte for byte
    assert len(after) == len(before) + 1
    assert (r.version, r.status, r.recorded_us) == (2, ConsentStatus.INACTIVE, T0 + 1000)
    assert store.get(g.grant_id) == r
    assert store.history(g.grant_id) == [g, r]
    d = store.decide(grantee=DR_A, patient_id="p1", metric="spo2", at_us=T0 + 2000)
    assert not d.allowed and "was revoked at" in d.reason
    with pytest.raises(ConsentConflict, match=r"already revoked at .* by patient:p1"):
        store.revoke(g.grant_id, actor="x")
    with pytest.raises(UnknownGrant):
        store.revoke("g-nope", actor="x")
    assert raw_rows(store.path) == after
    assert store.get("g-nope") is None and store.history("g-nope") == []


def test_the_table_refuses_updates_and_deletes(store: ConsentStore) -> None:
    store.grant(patient_id="p1", grantee=DR_A, metrics=["*"], purpose="TREAT", actor="t")
    with sqlite3.connect(store.path) as db:
        for sql in ("UPDATE grant_versions SET status = 'active'", "DELETE FROM grant_versions"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)
    assert len(raw_rows(store.path)) == 1


def test_durable_settings_and_reopen(tmp_path: Path, clock: Clock) -> None:
    path = PathSettings(home=tmp_path).consent_path
    assert path == tmp_path / "clinic" / "consent.sqlite3"
    with ConsentStore(path, clock=clock) as s:
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        g = s.grant(patient_id="p1", grantee=ICU, metrics=["*"], purpose="ETREAT", actor="t")
    with ConsentStore(path, clock=clock) as s:
        assert s.get(g.grant_id) == g
        assert s.index().allowed(grantee=ICU, patient_id="p1", metric="ppg", at_us=T0)


def test_grants_filters_expiry_and_changes(store: ConsentStore, clock: Clock) -> None:
    assert store.changes() == 0
    a = store.grant(
        patient_id="p1",
        grantee=DR_A,
        metrics=["heart_rate"],
        purpose="TREAT",
        end_us=T0 + HOUR,
        actor="t",
    )
    b = store.grant(
        patient_id="p2",
        grantee=DR_A,
        metrics=["*"],
        purpose="HRESCH",
        start_us=T0 + HOUR,
        actor="t",
    )
    c = store.grant(patient_id="p1", grantee=DR_B, metrics=["spo2"], purpose="TREAT", actor="t")
    n = store.changes()
    assert n == 3 and store.changed_since(0) == [a, b, c] and store.changed_since(n) == []
    assert store.grants() == [a, b, c]
    assert store.grants(patient_id="p1") == [a, c]
    assert store.grants(grantee=DR_A) == [a, b]
    assert store.grants(patient_id="p1", grantee=DR_B) == [c]
    assert store.grants(active_at_us=T0) == [a, c]
    assert store.grants(active_at_us=T0 + HOUR) == [b, c]  # a expired, b started
    d = store.decide(grantee=DR_A, patient_id="p1", metric="heart_rate", at_us=T0 + HOUR)
    assert not d.allowed and d.reason == f"grant {a.grant_id} expired at {iso_from_us(T0 + HOUR)}"
    r = store.revoke(c.grant_id, actor="t")
    assert store.changes() == n + 1 and store.changed_since(n) == [r]
    assert store.grants(active_at_us=T0 + HOUR) == [b]
    with pytest.raises(InvalidConsent, match="already passed") as e:
        store.grant(
            patient_id="p1", grantee=DR_A, metrics=["*"], purpose="TREAT", end_us=T0 - 1, actor="t"
        )
    assert e.value.field == "end"
    with pytest.raises(InvalidConsent) as e:
        store.grant(patient_id="p1", grantee=DR_A, metrics=["pulse"], purpose="TREAT", actor="t")
    assert e.value.field == "metrics"
    assert store.changes() == n + 1  # refusals change nothing


def test_changes_are_seen_by_another_connection(store: ConsentStore) -> None:
    with ConsentStore(store.path) as other:
        n = other.changes()
        g = store.grant(patient_id="p1", grantee=DR_A, metrics=["*"], purpose="TREAT", actor="t")
        assert other.changes() > n and other.changed_since(n) == [g]
        store.revoke(g.grant_id, actor="t")
        assert not other.index().allowed(
            grantee=DR_A, patient_id="p1", metric="spo2", at_us=store.now_us()
        )


def test_import_versions(store: ConsentStore, clock: Clock) -> None:
    doc = grant(grant_id="g-ext", version=7, recorded_by="ehr")
    g, changed = store.import_grant(doc, actor="import")
    assert changed and (g.version, g.recorded_by, g.recorded_us) == (1, "import", T0)
    assert store.import_grant(doc, actor="import") == (g, False)  # the same terms again
    wider = grant(grant_id="g-ext", metrics=frozenset({"heart_rate", "spo2"}))
    g2, changed = store.import_grant(wider, actor="import")
    assert changed and g2.version == 2 and g2.metrics == wider.metrics
    with pytest.raises(ConsentConflict, match="patient p1's, not p2's"):
        store.import_grant(grant(grant_id="g-ext", patient_id="p2"), actor="import")
    g3, _ = store.import_grant(
        grant(grant_id="g-ext", metrics=wider.metrics, status=ConsentStatus.INACTIVE),
        actor="import",
    )
    assert (g3.version, g3.status) == (3, ConsentStatus.INACTIVE)
    with pytest.raises(ConsentConflict, match="not reactivated"):
        store.import_grant(wider, actor="import")
    assert [v.version for v in store.history("g-ext")] == [1, 2, 3]


# -- FHIR -----------------------------------------------------------------------------------


@st.composite
def any_grants(draw: st.DrawFn) -> Grant:
    g = draw(grants())
    metrics = draw(
        st.just(frozenset({ALL_VITALS}))
        | st.frozensets(st.sampled_from(sorted(METRICS)), min_size=1)
    )
    return grant(
        **{f: getattr(g, f) for f in ("patient_id", "grantee", "start_us", "end_us", "status")},
        grant_id=draw(st.sampled_from(["g-0123abcd", "g_under_score", "consent.7"])),
        version=draw(st.integers(1, 50)),
        metrics=metrics,
        purpose=draw(st.sampled_from(["TREAT", "HRESCH", "ETREAT", "BTG"])),
        recorded_us=draw(st.integers(T0 - HOUR, T0 + HOUR)),
        recorded_by=draw(st.sampled_from(["cli:root", "patient:p1", "émile"])),
    )


@settings(max_examples=150, deadline=None)
@given(any_grants())
def test_fhir_round_trip(g: Grant) -> None:
    doc = consent_to_fhir(g)
    ConsentR4.model_validate(doc)  # valid R4 (R4B's Consent is R4's)
    assert doc["status"] == g.status.value
    assert ("code" in doc["provision"]) != g.all_vitals
    assert grant_from_fhir(doc) == g
    assert grant_from_fhir(json.dumps(doc)) == g


def test_fhir_export_shape() -> None:
    doc = consent_to_fhir(grant(metrics=frozenset({"spo2", "ppg"})))
    prov = doc["provision"]
    assert doc["patient"] == {"reference": "Patient/p1"}
    assert doc["scope"]["coding"][0]["code"] == "patient-privacy"
    assert doc["category"][0]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "59284-0",
        "display": "Patient Consent",
    }
    assert prov["type"] == "permit"
    assert prov["actor"][0]["reference"] == {"reference": DR_A}
    assert prov["period"] == {"start": "2026-11-30T00:53:20Z", "end": "2026-11-30T01:53:20Z"}
    assert prov["purpose"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    ppg, spo2 = prov["code"]
    assert [c["code"] for c in spo2["coding"]] == ["2708-6", "59408-5", "spo2"]
    assert [c["code"] for c in ppg["coding"]] == ["ppg"]  # no LOINC code in the export map


def r4_doc() -> dict[str, Any]:
    return consent_to_fhir(grant(metrics=frozenset({"heart_rate", "spo2"})))


def r5_doc() -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "subject": {"reference": "Patient/p9"},
        "date": "2026-11-30",
        "decision": "permit",
        "grantee": [{"reference": ICU}],
        "period": {"start": "2026-12-01T08:00:00+01:00", "end": "2026-12-31"},
        "provision": [
            {
                "purpose": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "code": "HRESCH",
                    }
                ],
                "code": [{"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}],
            }
        ],
    }


def test_fhir_r5_import() -> None:
    doc = r5_doc()
    ConsentR5.model_validate(doc)
    g = grant_from_fhir(doc, new_id=lambda: "g-new")
    assert g.grant_id == "g-new" and g.version == 1 and g.recorded_by == "fhir-import"
    assert (g.patient_id, g.grantee, g.purpose) == ("p9", ICU, "HRESCH")
    assert g.metrics == {"heart_rate", "pulse_rate"}  # 8867-4 names both in the export map
    assert iso_from_us(g.start_us) == "2026-12-01T07:00:00Z"
    assert iso_from_us(g.end_us or 0) == "2027-01-01T00:00:00Z"  # a date end: the whole day
    assert iso_from_us(g.recorded_us) == "2026-11-30T00:00:00Z"


def _set(path: str, value: Any) -> Any:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


@pytest.mark.parametrize(
    ("shape", "change", "field", "words"),
    [
        (
            r4_doc,
            _set("provision.period.start", "yesterday"),
            "provision.period.start",
            "not a dateTime",
        ),
        (
            r4_doc,
            _set("provision.period.end", "2026-02-30"),
            "provision.period.end",
            "not a dateTime",
        ),
        (r4_doc, _set("provision.type", "deny"), "provision.type", "deny provisions are not"),
        (r5_doc, _set("decision", "deny"), "decision", "deny provisions are not supported"),
        (r4_doc, _set("status", "draft"), "status", "'draft' is not supported"),
        (r4_doc, _set("scope", KeyError), "scope", "required"),
        (r4_doc, _set("resourceType", "Patient"), "resourceType", "expected 'Consent'"),
        (r4_doc, _set("provision.bogus", 1), "provision.bogus", "unknown field"),
        (
            r4_doc,
            _set("provision.actor.0.reference.reference", "Patient/p1"),
            "provision.actor[0].reference",
            "is not Practitioner/<id>",
        ),
        (r4_doc, _set("provision.actor", []), "provision.actor", "required"),
        (
            r4_doc,
            _set("provision.purpose.0.code", "TRAET"),
            "provision.purpose[0].code",
            "unknown purpose 'TRAET'",
        ),
        (r4_doc, _set("provision.purpose", []), "provision.purpose", "exactly one code"),
        (
            r4_doc,
            _set("provision.code.0.coding", [{"system": "http://loinc.org", "code": "1-8"}]),
            "provision.code[0]",
            "no metric vitalproof knows",
        ),
        (
            r4_doc,
            _set("provision.code.1.coding.2.code", "sp02"),
            "provision.code[1].coding",
            "unknown metric 'sp02'",
        ),
        (
            r4_doc,
            _set("provision.dataPeriod", {"start": "2026-01-01"}),
            "provision.dataPeriod",
            "not supported",
        ),
        (
            r4_doc,
            _set("provision.provision", [{"type": "deny"}]),
            "provision.provision",
            "nested provisions",
        ),
        (
            r4_doc,
            _set("provision.action", [{"coding": [{"code": "collect"}]}]),
            "provision.action[0]",
            "only access, use and disclose",
        ),
        (
            r4_doc,
            _set("patient", {"reference": "Group/g1"}),
            "patient.reference",
            "is not Patient/<id>",
        ),
        (r4_doc, _set("patient", {"reference": "Patient/p 1"}), "patient", "not a valid id"),
        (
            r4_doc,
            _set("provision.period.end", "2000-01-01"),
            "provision.period.end",
            "ends before it starts",
        ),
        (r5_doc, _set("provision", [{}, {}]), "provision", "2 provisions: one is supported"),
        (r5_doc, _set("period.start", "30/11/2026"), "period.start", "not a dateTime"),
        (r5_doc, _set("subject", KeyError), "subject", "required"),
    ],
)
def test_malformed_consent_names_the_field(shape: Any, change: Any, field: str, words: str) -> None:
    doc = copy.deepcopy(shape())
    change(doc)
    with pytest.raises(InvalidConsent) as e:
        grant_from_fhir(doc)
    assert e.value.field == field, str(e.value)
    assert words in str(e.value)
    assert str(e.value).startswith(f"{field}: ")


@pytest.mark.parametrize("text", ["{", "[]", '"Consent"'])
def test_not_a_consent_document(text: str) -> None:
    with pytest.raises(InvalidConsent) as e:
        grant_from_fhir(text)
    assert e.value.field == "(document)"
