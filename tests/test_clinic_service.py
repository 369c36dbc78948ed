"""The clinician service for real: `vitalproof serve` in its own process on a free port, a
lake sealed by the real sealer, tokens from its development issuer, consent in its store.

What is checked is what a hospital's reviewer would try: the CapabilityStatement without a
token; every kind of bad token refused with its reason (401); a clinician sees exactly the
readings their grant covers, as valid FHIR Observations, and nothing without one (403, no
data in the body); a revocation holds at the next request; a patient sees their own data and
their disclosure log, and every read and refusal is in it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from anchor.job import AnchorJob
from clinic.auth import DevIssuer
from clinic.consent import ALL_VITALS
from clinic.consent_store import ConsentStore
from clinic.service.context import clinic_dir
from streams.lake.keystore import LocalKeystore
from streams.sealer import Pending, Sealer
from vitalproof.devstack.procs import free_ports
from vitalproof.schema import SampleBatch, Transport
from vitalproof.settings import PathSettings, Settings

T0 = 1_800_000_000_000_000  # 2027-01-15T08:00:00Z
DR_A, DR_B = "Practitioner/dr-a", "Practitioner/dr-b"
READ_OBS = ["user/Observation.rs"]


@dataclass
class Service:
    url: str
    settings: Settings
    issuer: DevIssuer
    readings: dict[str, dict[str, int]]  # patient -> metric -> readings sealed

    def token(self, sub: str = DR_A, role: str = "clinician", **kw: Any) -> str:
        scopes = kw.pop("scopes", READ_OBS)
        return self.issuer.issue(sub, role, scopes, **kw)

    def get(self, path: str, token: str | None, **params: Any) -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=30)

    def consent(self) -> ConsentStore:
        return ConsentStore(self.settings.paths.consent_path)


def seal(settings: Settings) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    pendings = []
    for n, patient in enumerate(["pt-1", "pt-2"]):
        b = SampleBatch(
            device_id=f"dev-{n}",
            patient_id=patient,
            gateway_id="gw",
            transport=Transport.MQTT,
            receive_time_us=T0,
        )
        for i in range(30):
            b.add("heart_rate", "/min", T0 + i * 1_000_000, 2 * i, float(60 + i % 9))
            b.add("spo2", "%", T0 + i * 1_000_000, 2 * i + 1, float(95 + i % 4))
        b.fill_reading_ids()
        pendings.append(Pending(settings.kafka.topic_clean, n, 0, b))
        counts[patient] = {"heart_rate": 30, "spo2": 30}
    manifest = Sealer(settings.lake_dir, LocalKeystore(settings.paths.keys_dir)).seal(pendings)
    assert manifest is not None and manifest.rows == 120
    job = AnchorJob.from_settings(settings)  # the embedded chain: the anchor's receipt stays
    try:
        job.add_manifest(manifest.to_json_bytes())
        assert job.anchor_once() is not None
    finally:
        job.close()
    return counts


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("clinic-home")
    settings = Settings(paths=PathSettings(home=home))
    readings = seal(settings)
    issuer = DevIssuer(clinic_dir(settings))
    env = os.environ | {"VITALPROOF_HOME": str(home)}
    with serving(env, home / "serve.log", _answers_metadata) as url:
        yield Service(url, settings, issuer, readings)


def _answers_metadata(url: str) -> bool:
    return httpx.get(url + "/fhir/metadata", timeout=2).status_code == 200


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, ready: Callable[[str], bool]) -> Iterator[str]:
    """`vitalproof serve` on a free port until the block ends; fails loudly (with its log)
    if it exits or is not ``ready`` within 60 s."""
    (port,) = free_ports(1)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vitalproof", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vitalproof serve exited:\n{log.read_text()}", pytrace=False)
            with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                if ready(url):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vitalproof serve not ready:\n{log.read_text()}", pytrace=False)
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_metadata_answers_without_a_token_as_a_valid_capability_statement(
    service: Service,
) -> None:
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    r = service.get("/fhir/metadata", None)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    cs = CapabilityStatement.model_validate(r.json())
    assert cs.fhirVersion == "4.0.1"
    types = {res.type for res in cs.rest[0].resource}
    assert {"Observation", "AuditEvent"} <= types


def _forged(service: Service, **claims: Any) -> str:
    """A token like the issuer's, signed by another key, or with other claims."""
    now = int(time.time())
    base = {
        "iss": service.issuer.issuer,
        "aud": service.issuer.audience,
        "sub": DR_A,
        "role": "clinician",
        "scope": "user/Observation.rs",
        "iat": now,
        "exp": now + 600,
    }
    return jwt.encode(base | claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("none", "no bearer token"),
        ("forged", "signature"),
        ("expired", "expired"),
        ("audience", "audience"),
        ("alg-none", "algorithm"),
        ("garbage", "malformed"),
    ],
)
def test_bad_tokens_are_401_with_the_reason(service: Service, kind: str, reason: str) -> None:
    now = int(time.time())
    unsigned = {
        "iss": service.issuer.issuer,
        "aud": "vitalproof",
        "sub": DR_A,
        "role": "clinician",
        "scope": "user/Observation.rs",
        "iat": now,
        "exp": now + 600,
    }
    token = {
        "none": None,
        "forged": _forged(service),
        "expired": service.issuer.issue(DR_A, "clinician", READ_OBS, ttl_s=-120),
        "audience": service.issuer.issue(DR_A, "clinician", READ_OBS, audience="someone-else"),
        "alg-none": jwt.encode(unsigned, key=None, algorithm="none"),
        "garbage": "not.a.token",
    }[kind]
    r = service.get("/fhir/Observation", token, patient="pt-1")
    assert r.status_code == 401
    assert reason in r.json()["issue"][0]["diagnostics"]
    assert reason in r.headers["www-authenticate"]


def _observations(r: httpx.Response) -> list[dict[str, Any]]:
    from fhir.resources.R4B.bundle import Bundle

    assert r.status_code == 200, r.text
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "searchset"
    return [e["resource"] for e in r.json()["entry"]]


def test_a_clinician_sees_exactly_what_the_grant_covers_until_it_is_revoked(
    service: Service,
) -> None:
    from fhir.resources.R4B.observation import Observation

    with service.consent() as store:
        grant = store.grant(
            patient_id="pt-1",
            grantee=DR_B,
            metrics=frozenset({"heart_rate"}),
            purpose="TREAT",
            actor="Patient/pt-1",
        )
    token = service.token(DR_B)
    obs = _observations(service.get("/fhir/Observation", token, patient="pt-1"))
    assert len(obs) == service.readings["pt-1"]["heart_rate"]
    for o in obs:
        Observation.model_validate(o)
        assert o["code"]["coding"][0]["code"] == "8867-4"  # heart rate only, no SpO2
        assert o["subject"]["reference"] == "Patient/pt-1"
    # The other patient gave dr-b nothing: refused, and nothing of the data in the body.
    r = service.get("/fhir/Observation", token, patient="pt-2")
    assert r.status_code == 403 and "no grant" in r.text and 'Observation"' not in r.text
    assert "valueQuantity" not in r.text
    # Revoked: the very next request is refused, with the reason.
    with service.consent() as store:
        store.revoke(grant.grant_id, actor="Patient/pt-1")
    r = service.get("/fhir/Observation", token, patient="pt-1")
    assert r.status_code == 403 and "revoked" in r.json()["issue"][0]["diagnostics"]


def test_date_and_code_narrow_the_search(service: Service) -> None:
    with service.consent() as store:
        store.grant(
            patient_id="pt-2",
            grantee=DR_A,
            metrics=frozenset({ALL_VITALS}),
            purpose="TREAT",
            actor="Patient/pt-2",
        )
    token = service.token(DR_A)
    all_obs = _observations(service.get("/fhir/Observation", token, patient="pt-2"))
    assert len(all_obs) == 60
    spo2 = _observations(
        service.get("/fhir/Observation", token, patient="pt-2", code="http://loinc.org|2708-6")
    )
    assert len(spo2) == 30
    window = _observations(
        service.get(
            "/fhir/Observation",
            token,
            patient="Patient/pt-2",
            date=["ge2027-01-15T08:00:10Z", "lt2027-01-15T08:00:20Z"],
        )
    )
    assert len(window) == 20  # 10 s of heart rate and SpO2
    bad = service.get("/fhir/Observation", token, patient="pt-2", date="yesterday")
    assert bad.status_code == 400 and "date=yesterday" in bad.text


def test_a_patient_reads_their_own_data_and_disclosures_and_nobody_elses(
    service: Service,
) -> None:
    mine = service.token(
        "Patient/pt-1", "patient", scopes=["patient/Observation.rs", "patient/AuditEvent.rs"],
        patient="pt-1",
    )  # fmt: skip
    assert len(_observations(service.get("/fhir/Observation", mine, patient="pt-1"))) == 60
    r = service.get("/fhir/Observation", mine, patient="pt-2")
    assert r.status_code == 403 and "may not read patient pt-2" in r.text
    # A clinician with no scope for Observation is refused before consent is asked.
    no_scope = service.token(DR_A, scopes=["user/Consent.rs"])
    assert service.get("/fhir/Observation", no_scope, patient="pt-2").status_code == 403

    from fhir.resources.R4B.auditevent import AuditEvent

    log = service.get("/fhir/AuditEvent", mine)
    assert log.status_code == 200
    events = [e["resource"] for e in log.json()["entry"]]
    for e in events:
        AuditEvent.model_validate(e)
    text = log.text
    assert "Practitioner/dr-b" in text  # dr-b's reads and the refusal after the revocation
    assert "Patient/pt-2" not in text and "pt-2" not in text  # only pt-1's disclosures


def _send(service: Service, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.request(method, service.url + path, headers=headers, timeout=30, **kw)


def test_consent_through_the_api_is_the_patients_to_give_and_to_revoke(
    service: Service,
) -> None:
    from clinic.consent import ConsentStatus, Grant, new_grant_id
    from clinic.fhir_consent import consent_to_fhir

    now = int(time.time() * 1e6)
    doc = consent_to_fhir(
        Grant(
            grant_id=new_grant_id(),
            version=1,
            patient_id="pt-2",
            grantee="Practitioner/dr-c",
            metrics=frozenset({"spo2"}),
            purpose="TREAT",
            start_us=now - 1_000_000,
            end_us=None,
            status=ConsentStatus.ACTIVE,
            recorded_us=now,
            recorded_by="Patient/pt-2",
        )
    )
    patient = service.token(
        "Patient/pt-2", "patient", scopes=["patient/Consent.cruds", "patient/Observation.rs"],
        patient="pt-2",
    )  # fmt: skip
    clinician = service.token(
        "Practitioner/dr-c", scopes=["user/Observation.rs", "user/Consent.rs"]
    )
    # A clinician cannot give themselves consent.
    assert _send(service, "POST", "/fhir/Consent", clinician, json=doc).status_code == 403
    created = _send(service, "POST", "/fhir/Consent", patient, json=doc)
    assert created.status_code == 201, created.text
    grant_id = created.json()["id"]
    obs = _observations(service.get("/fhir/Observation", clinician, patient="pt-2"))
    assert len(obs) == 30 and {o["code"]["coding"][0]["code"] for o in obs} == {"2708-6"}
    listed = service.get("/fhir/Consent", clinician).json()
    assert grant_id in {e["resource"]["id"] for e in listed["entry"]}
    assert _send(service, "DELETE", f"/fhir/Consent/{grant_id}", clinician).status_code == 403
    revoked = _send(service, "DELETE", f"/fhir/Consent/{grant_id}", patient)
    assert revoked.status_code == 200 and revoked.json()["status"] == "inactive"
    assert service.get("/fhir/Observation", clinician, patient="pt-2").status_code == 403
    bad = dict(doc, provision={"type": "permit", "period": {"start": "soon"}})
    r = _send(service, "POST", "/fhir/Consent", patient, json=bad)
    assert r.status_code == 422 and "provision" in r.json()["field"]


def test_break_glass_opens_audited_time_limited_access_the_patient_sees(
    service: Service,
) -> None:
    er = service.token("Practitioner/dr-er")
    assert service.get("/fhir/Observation", er, patient="pt-1").status_code == 403
    short = _send(service, "POST", "/break-glass", er, json={"patient": "pt-1", "reason": "x"})
    assert short.status_code == 422 and "reason" in short.text
    opened = _send(
        service, "POST", "/break-glass", er,
        json={"patient": "pt-1", "reason": "unconscious on arrival, no consent on file"},
    )  # fmt: skip
    assert opened.status_code == 201, opened.text
    body = opened.json()
    assert body["seconds_left"] == 3600 and body["shown_to_patient"] is True
    assert len(_observations(service.get("/fhir/Observation", er, patient="pt-1"))) == 60
    mine = service.token(
        "Patient/pt-1", "patient", scopes=["patient/AuditEvent.rs"], patient="pt-1"
    )
    events = service.get("/fhir/AuditEvent", mine).text
    assert "unconscious on arrival" in events and "BTG" in events and "dr-er" in events


def test_a_clinician_gets_the_proof_of_a_reading_they_may_see_and_no_other(
    service: Service,
) -> None:
    from vitalproof_verify.bundle import load_bundle, verify_offline

    with service.consent() as store:
        store.grant(
            patient_id="pt-1", grantee="Practitioner/dr-p", metrics=frozenset({"heart_rate"}),
            purpose="TREAT", actor="Patient/pt-1",
        )  # fmt: skip
    token = service.token("Practitioner/dr-p")
    obs = _observations(service.get("/fhir/Observation", token, patient="pt-1"))
    reading_id = obs[0]["identifier"][0]["value"]
    r = service.get(f"/proof/{reading_id}", token, patient="pt-1")
    assert r.status_code == 200, r.text
    verify_offline(load_bundle(r.content))
    # A SpO2 reading of the same patient is outside the grant: refused, no bundle.
    mine = service.token(
        "Patient/pt-1", "patient", scopes=["patient/Observation.rs"], patient="pt-1"
    )
    spo2 = [
        o["identifier"][0]["value"]
        for o in _observations(service.get("/fhir/Observation", mine, patient="pt-1"))
        if o["code"]["coding"][0]["code"] == "2708-6"
    ]
    refused = service.get(f"/proof/{spo2[0]}", token, patient="pt-1")
    assert refused.status_code == 403 and "leaf" not in refused.text


def test_only_an_operator_may_erase_and_an_unknown_patient_is_not_found(
    service: Service,
) -> None:
    path = "/patients/pt-9/$erase"
    clinician = service.token(DR_A)
    assert _send(service, "POST", path, clinician, json={"reason": "asked"}).status_code == 403
    operator = service.token("Organization/ops", "operator", scopes=["system/*.rs"])
    assert _send(service, "POST", path, operator, json={}).status_code == 422
    assert _send(service, "POST", path, operator, json={"reason": "asked"}).status_code == 404


def test_malformed_or_unconsented_subscriptions_are_refused_with_the_field(
    service: Service,
) -> None:
    token = service.token("Practitioner/dr-none")
    path = "/fhir/Subscription"
    r = _send(service, "POST", path, token, content=b"nope")
    assert r.status_code == 422 and "body" in r.text
    r = _send(service, "POST", path, token, json={"metrics": "heart_rate"})
    assert r.status_code == 422 and "metrics: a list of strings" in r.text
    r = _send(service, "POST", path, token, json={"patients": ["pt-1"], "metrics": ["pulse"]})
    assert r.status_code == 403 and "metrics: unknown pulse" in r.text
    r = _send(service, "POST", path, token, json={"patients": ["pt-1"], "metrics": None})
    assert r.status_code == 403 and "no grant" in r.text
    ok = _send(service, "POST", path, token, json={"patients": None, "metrics": None})
    assert ok.status_code == 201  # "all who consented to me": none yet, and that is allowed
    sse = service.get(f"/stream/sse/{ok.json()['id']}", token, format="xml")
    assert sse.status_code == 422 and "format=xml" in sse.text
