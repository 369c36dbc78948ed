"""`vitalproof consent grant|revoke|list|show|import`: the consent registry for people.

The registry is :mod:`clinic.consent_store` at ``<VITALPROOF_HOME>/clinic/consent.sqlite3``;
every change is a new version, so ``show --history`` tells the whole story of a grant. FHIR
(``show --fhir``, ``import``) loads the lake's export map, hence pyarrow: only those two pay
for it.

Exit codes follow :mod:`vitalproof.cli`: 0 done, 1 failed (unknown grant, revoking a revoked
grant), 2 malformed input (a bad time, metric, purpose or grantee, an invalid FHIR Consent):
one ``error: ...`` line on stderr naming the option or the document's field.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitalproof.errors import UsageError
from vitalproof.settings import Settings

if TYPE_CHECKING:
    from clinic.consent import Grant
    from clinic.consent_store import ConsentStore

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

#: A grant's field -> the option that sets it, for error messages.
_OPTION = {
    "metrics": "--metrics",
    "purpose": "--purpose",
    "grantee": "--grantee",
    "patient_id": "--patient",
    "end": "--until",
    "grant_id": "GRANT_ID",
    "recorded_by": "--actor",
}


def _default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name (a container without passwd entry)
        return "cli"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``consent`` and its actions on the main parser's subcommands."""
    cn = sub.add_parser("consent", help="grant, revoke and inspect patients' consents")
    csub = cn.add_subparsers(dest="action", required=True)
    actor = argparse.ArgumentParser(add_help=False)
    actor.add_argument(
        "--actor", default=_default_actor(), help="who records the change (default: cli:<user>)"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")

    g = csub.add_parser("grant", parents=[actor, as_json], help="record a new grant")
    g.add_argument("--patient", required=True, help="the patient id (as in the registry)")
    g.add_argument(
        "--grantee", required=True, help="who may see: Practitioner/<id> or Organization/<id>"
    )
    g.add_argument(
        "--metrics", required=True, help="comma-separated metric names, or 'all' for all vitals"
    )
    g.add_argument(
        "--purpose", required=True, help="HL7 v3 PurposeOfUse code: TREAT, ETREAT, HRESCH, ..."
    )
    g.add_argument("--from", dest="start", help="ISO 8601 start (UTC if no offset; default now)")
    g.add_argument("--until", help="ISO 8601 expiry, exclusive (UTC if no offset; default none)")

    r = csub.add_parser("revoke", parents=[actor, as_json], help="revoke a grant (a new version)")
    r.add_argument("grant_id", metavar="GRANT_ID", help="the grant to revoke")

    ls = csub.add_parser("list", parents=[as_json], help="the latest version of each grant")
    ls.add_argument("--patient", help="only this patient's grants")
    ls.add_argument("--grantee", help="only grants to this Practitioner/<id> or Organization/<id>")
    ls.add_argument("--active", action="store_true", help="only grants in force now")

    sh = csub.add_parser("show", parents=[as_json], help="one grant (latest version)")
    sh.add_argument("grant_id", metavar="GRANT_ID", help="the grant to show")
    sh.add_argument("--fhir", action="store_true", help="as a FHIR R4 Consent resource")
    sh.add_argument("--history", action="store_true", help="every version, oldest first")

    im = csub.add_parser("import", parents=[actor, as_json], help="take in a FHIR Consent")
    im.add_argument("file", metavar="FILE.json", help="a FHIR Consent (R4 or R5); '-' for stdin")
    cn.set_defaults(handler=cmd_consent)


def parse_time_us(text: str, option: str) -> int:
    """ISO 8601 -> microseconds since the epoch; a time without offset is UTC."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-11-21T14:40:00Z)"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_metric_list(text: str) -> list[str]:
    """``heart_rate,spo2`` or ``all`` (checked by the grant itself)."""
    from clinic.consent import ALL_VITALS

    names = [ALL_VITALS if n == "all" else n for n in (n.strip() for n in text.split(",")) if n]
    if not names:
        raise UsageError("--metrics: name at least one metric, or 'all'")
    return names


def cmd_consent(args: argparse.Namespace, settings: Settings) -> int:
    from clinic.consent import InvalidConsent
    from clinic.consent_store import ConsentStore

    try:
        with ConsentStore(settings.paths.consent_path) as store:
            changed = _run(args, store)
        if changed is not None:
            _audit(settings, args, *changed)
        return 0
    except InvalidConsent as e:
        if args.action == "import":
            _error(f"{args.file}: {e}")
        else:
            where = _OPTION.get(e.field or "", e.field)
            _error(f"{where}: {e.reason}" if where else e.reason)
        return EXIT_BAD_INPUT
    except UsageError as e:
        _error(str(e))
        return EXIT_BAD_INPUT


def _audit(settings: Settings, args: argparse.Namespace, grant: Grant, change: str) -> None:
    """The change, in the audit log, as the operator who ran the command."""
    from clinic.audit import AuditLog
    from clinic.consent_audit import record_consent_change

    with AuditLog(settings.paths.audit_path) as audit:
        record_consent_change(audit, actor=args.actor, role="operator", grant=grant, change=change)


def _run(args: argparse.Namespace, store: ConsentStore) -> tuple[Grant, str] | None:
    """Carry out the command; the grant version and the change it made, if it made one."""
    from clinic.consent import UnknownGrant, iso_from_us

    if args.action == "grant":
        g = store.grant(
            patient_id=args.patient,
            grantee=args.grantee,
            metrics=parse_metric_list(args.metrics),
            purpose=args.purpose,
            start_us=None if args.start is None else parse_time_us(args.start, "--from"),
            end_us=None if args.until is None else parse_time_us(args.until, "--until"),
            actor=args.actor,
        )
        _out(args, g, f"granted {_line(g)}")
        return g, "granted"
    elif args.action == "revoke":
        g = store.revoke(args.grant_id, actor=args.actor)
        _out(args, g, f"revoked {g.grant_id} (version {g.version}) at {iso_from_us(g.recorded_us)}")
        return g, "revoked"
    elif args.action == "list":
        grants = store.grants(
            patient_id=args.patient,
            grantee=args.grantee,
            active_at_us=store.now_us() if args.active else None,
        )
        if args.json:
            _print_json([g.to_dict() for g in grants])
        for g in grants if not args.json else ():
            print(_line(g))
    elif args.action == "show":
        versions = store.history(args.grant_id)
        if not versions:
            raise UnknownGrant(f"no grant {args.grant_id!r}")
        _show(args, versions if args.history else versions[-1:])
    else:
        return _import(args, store)
    return None


def _show(args: argparse.Namespace, versions: list[Grant]) -> None:
    if args.fhir:
        from clinic.fhir_consent import consent_to_fhir

        for g in versions:
            _print_json(consent_to_fhir(g))
    elif args.json:
        for g in versions:
            _print_json(g.to_dict())
    else:
        for g in versions:
            for key, value in g.to_dict().items():
                if not key.endswith("_us"):
                    shown = g.describe_metrics() if key == "metrics" else value
                    print(f"{key + ':':<13}{'-' if shown is None else shown}")
            if len(versions) > 1:
                print()


def _import(args: argparse.Namespace, store: ConsentStore) -> tuple[Grant, str] | None:
    from clinic.fhir_consent import grant_from_fhir

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{args.file}: cannot read ({e})") from None
    g, changed = store.import_grant(grant_from_fhir(text), actor=args.actor)
    verb = "imported" if changed else "unchanged:"
    _out(args, g, f"{verb} {_line(g)}")
    if not changed:
        return None
    return g, "granted" if g.version == 1 else "changed"


def _line(g: Grant) -> str:
    from clinic.consent import iso_from_us

    until = "no expiry" if g.end_us is None else f"until {iso_from_us(g.end_us)}"
    return (
        f"{g.grant_id} v{g.version} {g.status.value}: patient {g.patient_id} -> {g.grantee}, "
        f"{g.describe_metrics()}, {g.purpose}, from {iso_from_us(g.start_us)} {until}"
    )


def _out(args: argparse.Namespace, g: Grant, text: str) -> None:
    if args.json:
        _print_json(g.to_dict())
    else:
        print(text)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, separators=(",", ":")))


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
