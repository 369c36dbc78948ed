"""`vitalproof patients list|erase`: the patients a home holds data of, and erasing one.

``erase`` is :func:`clinic.erasure.erase_patient` (read its docstring for what it does and
what it cannot reach) with a confirmation in front: on a terminal the operator types the
patient id back; without a terminal it refuses unless ``--yes`` says the caller means it,
so a script cannot erase someone by a stray pipe. The retired devices' logins are removed
from the local broker too, as ``devices retire`` does.

Exit codes follow :mod:`vitalproof.cli`: 0 done, 1 failed (unknown patient, already erased,
not confirmed), 2 malformed input (not a patient id, an empty reason, no terminal and no
``--yes``). Errors are one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from vitalproof.settings import Settings

if TYPE_CHECKING:
    from clinic.erasure import ErasurePlan, ErasureReport

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

DEFAULT_ACTOR = "Operator/cli"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``patients list|erase`` on the main parser's subcommands."""
    pt = sub.add_parser("patients", help="patients with data in the lake; erase one")
    psub = pt.add_subparsers(dest="action", required=True)
    ls = psub.add_parser(
        "list", help="patients with sealed data in this namespace's lake, with counts"
    )
    ls.add_argument("--json", action="store_true", help="print one JSON array")
    er = psub.add_parser(
        "erase",
        help="destroy a patient's keys and salts, revoke their grants, retire their devices",
    )
    er.add_argument("patient_id", metavar="PATIENT", help="the patient id (as in the registry)")
    er.add_argument(
        "--reason",
        required=True,
        metavar="TEXT",
        help="why (kept in the audit record), e.g. a request number",
    )
    er.add_argument(
        "--actor",
        default=DEFAULT_ACTOR,
        help=f"who erases, as the audit record names them (default: {DEFAULT_ACTOR})",
    )
    er.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (needed without a tty)"
    )
    er.add_argument("--json", action="store_true", help="print the report as one JSON object")
    pt.set_defaults(handler=cmd_patients)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def cmd_patients(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        return patients_list(settings, as_json=args.json)
    return patients_erase(
        settings,
        args.patient_id,
        reason=args.reason,
        actor=args.actor,
        yes=args.yes,
        as_json=args.json,
    )


def patients_list(settings: Settings, *, as_json: bool = False) -> int:
    from clinic.patients import list_patients

    patients = list_patients(settings)
    if as_json:
        print(json.dumps([p.to_json_dict() for p in patients], separators=(",", ":")))
        return 0
    if not patients:
        print(f"no patient has sealed data in {settings.lake_dir}", file=sys.stderr)
        return 0
    print(f"{'patient':<24} {'files':>7} {'readings':>10} {'batches':>8} {'devices':>8} "
          f"{'grants':>7}  state")  # fmt: skip
    for p in patients:
        state = "erased" if p.erased else "keys held"
        who = p.patient_id or f"({p.pseudonym[:12]}…)"  # an erased id is gone
        print(
            f"{who:<24} {p.files:>7,} {p.readings:>10,} {p.batches:>8,} "
            f"{p.active_devices:>8} {p.active_grants:>7}  {state}"
        )
    return 0


def _confirm(plan: ErasurePlan) -> bool:
    """Ask on the terminal; the patient id typed back is the only yes."""
    print(plan.describe() + ". This cannot be undone.", file=sys.stderr)
    print(f"type {plan.patient_id} to erase: ", end="", file=sys.stderr, flush=True)
    try:
        answer = input()  # the prompt went to stderr: stdout carries only the report
    except EOFError:
        return False
    return answer.strip() == plan.patient_id


def patients_erase(
    settings: Settings,
    patient_id: str,
    *,
    reason: str,
    actor: str = DEFAULT_ACTOR,
    yes: bool = False,
    as_json: bool = False,
) -> int:
    from clinic.erasure import ErasureError, InvalidPatientId, erase_patient, plan_erasure

    if not reason.strip():
        _error("--reason: say why the patient is erased (kept in the audit record)")
        return EXIT_BAD_INPUT
    if not actor.strip():
        _error("--actor: name who erases (e.g. Operator/<name>)")
        return EXIT_BAD_INPUT
    try:
        plan = plan_erasure(settings, patient_id)
        if not yes:
            if not sys.stdin.isatty():
                _error(
                    f"refusing to erase patient {patient_id} without confirmation: stdin is "
                    "not a terminal, pass --yes"
                )
                return EXIT_BAD_INPUT
            if not _confirm(plan):
                _error(f"not confirmed: nothing of patient {patient_id} was erased")
                return EXIT_FAILED
        report = erase_patient(settings, patient_id, actor=actor.strip(), reason=reason.strip())
    except InvalidPatientId as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    except ErasureError as e:
        _error(str(e))
        return EXIT_FAILED
    warning = _remove_logins(settings, report.devices_retired)
    if as_json:
        print(json.dumps(report.to_json_dict(), separators=(",", ":")))
    else:
        _print_report(report)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _remove_logins(settings: Settings, device_ids: list[str]) -> str | None:
    """The retired devices' logins off the local broker; a failure is a warning, because the
    erasure itself is done (the registry refuses their data whatever the broker does)."""
    if not device_ids:
        return None
    from vitalproof.devstack import mosquitto
    from vitalproof.errors import VitalproofError

    if not mosquitto.password_file(settings).exists():
        return None  # no local broker was ever set up: no login to remove
    try:
        for device_id in device_ids:
            mosquitto.remove_device(settings, device_id)
    except (VitalproofError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"the broker still knows {', '.join(device_ids)}: {first}"
    return None


def _print_report(r: ErasureReport) -> None:
    where = ", ".join(f"{n} in {ns}" for ns, n in sorted(r.files_by_namespace.items()))
    rows = [
        ("keys destroyed", "yes" if r.keys_destroyed else "no (no live key left)"),
        ("files unreadable", f"{r.files_unreadable}" + (f" ({where})" if where else "")),
        ("readings unreadable", f"{r.readings_unreadable}"),
        ("grants revoked", _listed(r.grants_revoked)),
        ("devices retired", _listed(r.devices_retired)),
        ("audit record", f"{r.audit_seq}"),
    ]
    print(f"erased patient {r.patient_id}")
    for name, value in rows:
        print(f"  {name:<20} {value}")


def _listed(items: list[str]) -> str:
    return f"{len(items)}" + (f": {', '.join(items)}" if items else "")
