"""What the dashboard's pages ask the service beyond FHIR: who is signed in.

The pages themselves are static files (clinic.web) served at ``/ui/``; every health figure
they show comes through the same routes, consent checks and audit as any other client's.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, RedirectResponse

from clinic.service.deps import Who

router = APIRouter()


@router.get("/", include_in_schema=False)
async def home() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/api/me")
async def me(who: Who) -> JSONResponse:
    """The token's principal, for the page to greet and route; no health data."""
    return JSONResponse(
        {
            "subject": who.subject,
            "role": who.role.value,
            "patient_id": who.patient_id,
            "scopes": str(who.claims.get("scope", "")).split(),
            "expires_at": who.expires_at,
        }
    )
