"""Request dependencies: the service's context and the caller's validated token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from clinic.auth import AuthError, Principal
from clinic.service.context import ServiceContext

FHIR_JSON = "application/fhir+json"


def context_of(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.context
    return ctx


def principal_of(request: Request) -> Principal:
    """The validated bearer token of the request (``Authorization: Bearer``; for browsers'
    EventSource, which cannot set headers, ``access_token`` in the query)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header and scheme.lower() != "bearer":
        raise AuthError(f"unsupported authorization scheme {scheme!r} (use Bearer)")
    return context_of(request).validator.validate(
        token.strip() or request.query_params.get("access_token")
    )


Ctx = Annotated[ServiceContext, Depends(context_of)]
Who = Annotated[Principal, Depends(principal_of)]
Json = dict[str, Any]
