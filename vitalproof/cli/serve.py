"""`vitalproof serve` (the clinician service) and `vitalproof token` (development tokens)."""

from __future__ import annotations

import argparse

from vitalproof.settings import Settings

ROLES = ("clinician", "patient", "operator")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sv = sub.add_parser("serve", help="run the clinician service (FHIR API, live streams)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8470, help="port to listen on (0: any free)")
    sv.set_defaults(handler=cmd_serve)
    from vitalproof.cli.namespaces import add_option

    add_option(sv)

    tk = sub.add_parser("token", help="tokens from the service's development issuer")
    tksub = tk.add_subparsers(dest="action", required=True)
    ti = tksub.add_parser("issue", help="print a signed bearer token")
    ti.add_argument("--role", choices=ROLES, required=True, help="who the token speaks for")
    ti.add_argument(
        "--sub", required=True, help="subject: Practitioner/<id>, Patient/<id>, Organization/<id>"
    )
    ti.add_argument(
        "--scope",
        action="append",
        required=True,
        help="a SMART v2 scope, e.g. user/Observation.rs (repeat for several)",
    )
    ti.add_argument("--patient", help="a patient token's own patient id")
    ti.add_argument("--ttl", type=float, default=3600.0, help="seconds the token is valid")
    tk.set_defaults(handler=cmd_token)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from clinic.service import ServiceContext, create_app

    app = create_app(ServiceContext.open(settings))
    # No permessage-deflate: browsers always offer it, and compressing every notification
    # was most of the fan-out's cost at 20,000 readings/s (p99 8.9 s with it, 1.0 s without:
    # bench/fanout_latency_bench.py, docs/benchmarks.md); readings are small and local.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", ws_per_message_deflate=False
    )
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from clinic.auth import DevIssuer
    from clinic.service.context import clinic_dir

    issuer = DevIssuer(clinic_dir(settings))
    print(issuer.issue(args.sub, args.role, args.scope, patient=args.patient, ttl_s=args.ttl))
    return 0
