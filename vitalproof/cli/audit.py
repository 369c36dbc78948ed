"""`vitalproof audit list` and `vitalproof audit verify`: the audit log for people and scripts.

``list`` prints records (oldest first) as tab-separated lines, as JSON (an array of records
with their chain fields, what ``verify --file`` checks) or as a FHIR Bundle of AuditEvents.
``verify`` recomputes the whole hash chain and its checkpoints, checks every audit
checkpoint in this namespace's anchor log against it, and prints the size and the Merkle
root; with ``--file`` it checks an exported list of records instead, without the database.
Both only read: a missing log is an error, never created.

Exit codes follow :mod:`vitalproof.cli`: 0 done, 1 failed (no log, or a broken chain: the
line names the first bad record), 2 malformed input. Errors are one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitalproof.errors import UsageError
from vitalproof.settings import Settings

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``audit list|verify`` on the main parser's subcommands."""
    au = sub.add_parser("audit", help="the audit log of every disclosure: list and verify")
    ausub = au.add_subparsers(dest="action", required=True)
    al = ausub.add_parser("list", help="print audit records, oldest first")
    al.add_argument("--patient", help="only records about this patient id")
    al.add_argument("--actor", help="only records of this actor, e.g. Practitioner/dr-a")
    al.add_argument(
        "--since", type=int, default=0, metavar="SEQ", help="only records after this seq"
    )
    al.add_argument("--limit", type=int, help="print at most this many records")
    fmt = al.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json", action="store_true", help="one JSON array of records with their hashes"
    )
    fmt.add_argument("--fhir", action="store_true", help="one FHIR R4 Bundle of AuditEvents")
    av = ausub.add_parser(
        "verify", help="recompute the hash chain and check the anchored checkpoints"
    )
    av.add_argument(
        "--file",
        type=Path,
        help="check an exported JSON array of records (audit list --json) instead of the log",
    )
    av.add_argument("--json", action="store_true", help="print the result as one JSON object")
    au.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        return audit_list(
            settings,
            patient=args.patient,
            actor=args.actor,
            since=args.since,
            limit=args.limit,
            as_json=args.json,
            as_fhir=args.fhir,
        )
    if args.file is not None:
        return verify_file(args.file, as_json=args.json)
    return audit_verify(settings, as_json=args.json)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def audit_list(
    settings: Settings,
    *,
    patient: str | None = None,
    actor: str | None = None,
    since: int = 0,
    limit: int | None = None,
    as_json: bool = False,
    as_fhir: bool = False,
) -> int:
    from clinic.audit import AuditLog, to_fhir_bundle

    if since < 0:
        _error(f"--since {since}: a seq is >= 0")
        return EXIT_BAD_INPUT
    if limit is not None and limit < 1:
        _error(f"--limit {limit}: give at least 1")
        return EXIT_BAD_INPUT
    with AuditLog(settings.paths.audit_path, readonly=True) as audit:
        records = audit.records(patient_id=patient, actor=actor, since_seq=since, limit=limit)
    if as_fhir:
        print(json.dumps(to_fhir_bundle(records), separators=(",", ":")))
    elif as_json:
        print(json.dumps([r.to_json_dict() for r in records], separators=(",", ":")))
    else:
        for r in records:
            print(
                "\t".join(
                    str(x)
                    for x in (
                        r.seq,
                        _iso(r.time_us),
                        r.actor,
                        r.role,
                        r.patient_id or "-",
                        r.action.value,
                        r.outcome.value,
                        r.count,
                        r.purpose or "-",
                        r.what,
                        r.reason,
                    )
                )
            )
    print(f"{len(records)} records", file=sys.stderr)
    return 0


def _iso(time_us: int) -> str:
    import datetime as dt

    t = dt.datetime.fromtimestamp(time_us // 1_000_000, tz=dt.UTC)
    return t.replace(microsecond=time_us % 1_000_000).isoformat().replace("+00:00", "Z")


def audit_verify(settings: Settings, *, as_json: bool = False) -> int:
    """Verify the log (a broken chain raises AuditError: `error: audit record N: ...`, 1)."""
    from anchor.log import MerkleLog
    from clinic.audit import AuditLog, check_against_log

    path = settings.paths.audit_path
    log_dir = settings.anchor_dir / "log"
    with AuditLog(path, readonly=True) as audit:
        size = audit.verify()
        head = audit.head(size)
        anchored = []
        if log_dir.is_dir():
            with MerkleLog(log_dir, readonly=True) as mlog:
                anchored = check_against_log(audit, mlog)
    in_log = [c.size for c in anchored]
    on_chain = [c.size for c in anchored if c.anchored]
    if as_json:
        out = {
            "audit_log": str(path),
            "size": size,
            "root": head.root.hex(),
            "checkpoints_in_log": in_log,
            "checkpoints_anchored": on_chain,
        }
        print(json.dumps(out, separators=(",", ":")))
        return 0
    print(f"audit log {path}: {size} records verified, root {head.root.hex()}")
    if anchored:
        last = f", latest anchored at size {on_chain[-1]}" if on_chain else ", none anchored yet"
        print(f"  {len(in_log)} checkpoints in the anchor log match{last}")
    else:
        print("  no checkpoint in the anchor log yet (`vitalproof anchor run` adds one)")
    return 0


def verify_file(path: Path, *, as_json: bool = False) -> int:
    """Check exported records: each hash against its fields, each link present."""
    from clinic.audit import AuditRecord, check_records

    try:
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: not a readable JSON file: {e}") from None
        if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
            raise UsageError(f"{path}: expected a JSON array of records (audit list --json)")
    except UsageError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    records = [AuditRecord.from_json_dict(d) for d in doc]
    n, links = check_records(records)
    if as_json:
        print(json.dumps({"file": str(path), "records": n, "links": links}))
    else:
        print(f"{path}: {n} records match their hashes, {links} chain links checked")
    return 0
