"""What the patient's page asks beyond FHIR: the choices of a grant, and the disclosure log
with each record's proof status.

``GET /fhir/AuditEvent`` gives the records but not whether they are anchored yet, and not a
page at a time newest first; ``GET /api/disclosures`` does both. A record is **anchored**
when an audit checkpoint covering it (``audit-<size>`` with size >= its seq) is an entry of
the Merkle log that an anchored head includes: the same rule :func:`disclosure_proof` uses to
build the record's proof, so an anchored row always has a proof to download
(``GET /api/disclosures/{seq}/proof``). Otherwise it is **pending** (the next anchor period
takes it). Before anything is called anchored the checkpoints are checked against the audit
log (:func:`check_against_log`); if the log no longer matches what was anchored, no record is
called anchored and the answer says why.

Who may read: the patient (their own records only; another patient's is a 403, audited) and
an operator (any patient). Reading one's disclosure log is not itself audited, as for
``GET /fhir/AuditEvent``; a refusal is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from anchor.errors import AnchorError
from anchor.log import ANCHORS_FILE, ENTRIES_FILE, LogHead, MerkleLog
from clinic.audit import (
    AnchoredCheckpoint,
    AuditAction,
    AuditError,
    AuditRecord,
    check_against_log,
    disclosure_proof,
)
from clinic.auth import Principal, Role
from clinic.consent import PURPOSES, iso_from_us
from clinic.fhir_consent import METRIC_SYSTEM
from clinic.service import disclosure
from clinic.service.context import ServiceContext
from clinic.service.deps import Ctx, Who
from clinic.service.refusal import outcome
from streams.lake.export import FHIR_MAP
from streams.lake.export.fhir import PATIENT_ID_SYSTEM
from vitalproof.units import Metric

router = APIRouter()

#: Records per page of the disclosure log, unless asked for fewer (or up to MAX_PAGE).
PAGE = 50
MAX_PAGE = 500
#: Purposes a patient may not pick: break-glass is the clinician's emergency act.
NOT_PATIENT_PURPOSES = frozenset({"BTG"})
_WORDS = {"bp": "blood pressure", "rr": "RR", "ppg": "PPG", "accel": "acceleration", "bmi": "BMI"}


def metric_label(metric: str) -> str:
    """The words a patient reads for a metric (the FHIR export's text where it has one)."""
    code = FHIR_MAP.get(metric)
    if code is not None:
        return code.text
    words = [_WORDS.get(w, w) for w in metric.split("_")]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


@router.get("/api/consent-options")
async def consent_options(who: Who) -> JSONResponse:
    """The metrics and purposes a grant may name (from clinic.consent, so the form offers
    exactly what the service accepts), and the code systems a FHIR Consent uses for them."""
    return JSONResponse(
        {
            "metrics": [{"code": m.value, "text": metric_label(m.value)} for m in Metric],
            "purposes": [
                {"code": code, "text": text}
                for code, text in PURPOSES.items()
                if code not in NOT_PATIENT_PURPOSES
            ],
            "systems": {"metric": METRIC_SYSTEM, "patient_id": PATIENT_ID_SYSTEM},
        }
    )


@dataclass(frozen=True)
class ProofStatus:
    """The anchored audit checkpoints (in Merkle-log order, with the head anchoring each),
    or why none can be trusted."""

    anchored: tuple[tuple[AnchoredCheckpoint, LogHead], ...]
    problem: str | None = None

    def covering(self, seq: int) -> tuple[AnchoredCheckpoint, LogHead] | None:
        """The earliest anchored checkpoint that covers record ``seq`` (disclosure_proof's)."""
        for cp, head in self.anchored:
            if cp.size >= seq:
                return cp, head
        return None

    def of(self, seq: int) -> dict[str, Any]:
        if self.problem is not None:
            return {"status": "unverified", "problem": self.problem}
        found = self.covering(seq)
        if found is None:
            return {"status": "pending"}
        cp, head = found
        return {
            "status": "anchored",
            "checkpoint": f"audit-{cp.size}",
            "log_index": cp.log_index,
            "tree_size": head.tree_size,
            "tx_hash": head.anchor.get("tx_hash"),
            "block_number": head.anchor.get("block_number"),
            "chain_id": head.anchor.get("chain_id"),
        }


def _merkle_log(ctx: ServiceContext) -> MerkleLog | None:
    folder = ctx.settings.anchor_dir / "log"
    return MerkleLog(folder, readonly=True) if folder.is_dir() else None


#: How long a proof status is reused while the Merkle log has not grown: a record rewritten
#: below an anchored checkpoint (which grows nothing) is noticed within this.
PROOF_STATUS_MAX_AGE_S = 30.0


def _log_state(ctx: ServiceContext) -> tuple[tuple[int, int, int] | None, ...]:
    """What the Merkle log's files are now (inode, size, mtime): an append of a checkpoint
    or an anchor changes it."""
    folder = ctx.settings.anchor_dir / "log"
    out: list[tuple[int, int, int] | None] = []
    for name in (ENTRIES_FILE, ANCHORS_FILE):
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True)
class _Memo:
    log_state: tuple[tuple[int, int, int] | None, ...]
    audit_size: int
    at: float
    status: ProofStatus


def proof_status(ctx: ServiceContext) -> ProofStatus:
    """Which audit checkpoints are anchored now, checked against the audit log first.

    Reading the Merkle log and recomputing the audit roots costs a pass over both, so the
    answer is kept until the log's files change (a new checkpoint or anchor: pending becomes
    anchored), the audit log shrinks (records removed), or PROOF_STATUS_MAX_AGE_S pass. The
    audit log's growth alone changes nothing: new records are pending until a checkpoint."""
    state = _log_state(ctx)
    size = ctx.audit.size
    memo = ctx.memo.get("proof_status")
    if (
        isinstance(memo, _Memo)
        and memo.log_state == state
        and size >= memo.audit_size
        and ctx.clock() - memo.at < PROOF_STATUS_MAX_AGE_S
    ):
        return memo.status
    status = _read_proof_status(ctx)
    ctx.memo["proof_status"] = _Memo(state, size, ctx.clock(), status)
    return status


def _read_proof_status(ctx: ServiceContext) -> ProofStatus:
    try:
        log = _merkle_log(ctx)
        if log is None:
            return ProofStatus(())
        with log:
            found = check_against_log(ctx.audit, log)
            heads = [(cp, log.anchor_covering(cp.log_index)) for cp in found if cp.anchored]
    except (AuditError, AnchorError) as e:
        return ProofStatus((), f"the audit log does not match what was anchored: {e}")
    return ProofStatus(tuple((cp, h) for cp, h in heads if h is not None))


def _whose(ctx: ServiceContext, who: Principal, asked: str | None, what: str) -> str:
    """The patient whose log is read: the patient's own; any for an operator; else 403."""
    patient = asked.removeprefix("Patient/") if asked else None
    if who.role is Role.PATIENT:
        if patient not in (None, who.patient_id):
            disclosure.refuse(
                ctx, who, patient, AuditAction.READ, what,
                f"a patient token for {who.patient_id} may not read another patient's "
                "disclosure log",
            )  # fmt: skip
        assert who.patient_id is not None
        return who.patient_id
    if who.role is Role.OPERATOR and patient:
        return patient
    disclosure.refuse(
        ctx, who, patient, AuditAction.READ, what,
        "the disclosure log is the patient's (or an operator's, naming the patient)",
    )  # fmt: skip
    raise AssertionError("refuse raises")


def _row(rec: AuditRecord, status: ProofStatus) -> dict[str, Any]:
    return {
        "seq": rec.seq,
        "time": iso_from_us(rec.time_us),
        "time_us": rec.time_us,
        "actor": rec.actor,
        "role": rec.role,
        "action": rec.action.value,
        "what": rec.what,
        "purpose": rec.purpose,
        "outcome": rec.outcome.value,
        "reason": rec.reason,
        "count": rec.count,
        "break_glass": rec.action is AuditAction.BREAK_GLASS or rec.purpose == "BTG",
        "hash": rec.hash,
        "proof": status.of(rec.seq),
    }


@router.get("/api/disclosures")
async def disclosures(
    request: Request,
    ctx: Ctx,
    who: Who,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = PAGE,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> JSONResponse:
    """The patient's audit records newest first, ``limit`` at a time (``before``: a seq from
    the previous page's ``next_before``), each with its proof status."""
    what = f"disclosure log?{request.url.query}"
    patient = _whose(ctx, who, request.query_params.get("patient"), what)
    if not who.may("AuditEvent", "s"):
        disclosure.refuse(
            ctx, who, patient, AuditAction.READ, what,
            "the token's scopes do not allow searching AuditEvent",
        )  # fmt: skip
    older = ctx.audit.records(
        patient_id=patient, before_seq=before, limit=limit + 1, newest_first=True
    )
    page = older[:limit]
    status = proof_status(ctx)
    return JSONResponse(
        {
            "patient": patient,
            "total": ctx.audit.count(patient_id=patient),
            "records": [_row(r, status) for r in page],
            "next_before": page[-1].seq if len(older) > limit else None,
            "anchored_checkpoints": len(status.anchored),
            "problem": status.problem,
        }
    )


@router.get("/api/disclosures/{seq}/proof")
async def proof_of_disclosure(seq: int, ctx: Ctx, who: Who) -> JSONResponse:
    """The disclosure proof of one of the patient's records (:func:`disclosure_proof`):
    record -> audit checkpoint -> anchored log head -> anchor transaction, checkable offline
    with ``verify_disclosure_proof`` and the chain."""
    what = f"disclosure proof of audit record {seq}"
    try:
        rec = ctx.audit.record(seq)
    except AuditError:
        return JSONResponse(outcome("not-found", f"no audit record {seq}"), 404)
    patient = _whose(ctx, who, rec.patient_id, what)
    if rec.patient_id != patient:
        return JSONResponse(outcome("not-found", f"audit record {seq} is not about you"), 404)
    if not who.may("AuditEvent", "r"):
        disclosure.refuse(
            ctx, who, patient, AuditAction.READ, what,
            "the token's scopes do not allow reading AuditEvent",
        )  # fmt: skip
    status = proof_status(ctx)
    if status.problem is not None:
        return JSONResponse(outcome("conflict", status.problem), 409)
    log = _merkle_log(ctx)
    if log is None:
        return JSONResponse(outcome("not-found", "nothing is anchored yet"), 404)
    try:
        with log:
            doc = disclosure_proof(ctx.audit, log, seq)
    except AuditError as e:
        return JSONResponse(outcome("not-found", str(e)), 404)
    return JSONResponse(
        doc, headers={"Content-Disposition": f'attachment; filename="disclosure-{seq}.json"'}
    )
