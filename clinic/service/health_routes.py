"""Pipeline health: ``GET /api/health`` for the operator page, ``GET /metrics`` for Prometheus.

Both read the figures :class:`clinic.health.Health` refreshes in the background, so neither
waits on Kafka. ``/api/health`` is for the operator role: another role's token is refused
(403, with the reason). The refusal is not written to the audit log, which records
disclosures of and acts on patients' data; pipeline health is neither, and the service's
other routes without health data (``/status``, ``/api/me``, ``/fhir/metadata``) are not
audited either.

``/metrics`` answers without a token, as Prometheus scrapers expect: it carries no health
data and no patient or device identifier at all (counts, rates, lags, offsets, the last
anchor's transaction hash and block, times and ages), only what any reader of the anchor
contract or the Kafka cluster's own metrics would learn. Serve it on a private address.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from clinic.auth import Role
from clinic.health import Health, registry
from clinic.service.deps import FHIR_JSON, Who
from clinic.service.refusal import outcome

router = APIRouter()


def health_of(request: Request) -> Health:
    health: Health = request.app.state.health
    return health


def _registry(request: Request) -> CollectorRegistry:
    state = request.app.state
    reg: CollectorRegistry | None = getattr(state, "metrics_registry", None)
    if reg is None:
        reg = state.metrics_registry = registry(health_of(request))
    return reg


@router.get("/api/health")
async def pipeline_health(request: Request, who: Who) -> JSONResponse:
    """Every health figure and the rate history, for operators."""
    if who.role is not Role.OPERATOR:
        reason = f"pipeline health is for operators; a {who.role.value} token may not read it"
        return JSONResponse(outcome("forbidden", reason), status_code=403, media_type=FHIR_JSON)
    return JSONResponse(health_of(request).view())


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """The same figures in Prometheus' text format (no token: see the module's docstring)."""
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)
