"""The ASGI app: authentication, the FHIR REST base, and the answers to refusals.

Every route that discloses health data goes through :func:`disclose` (consent per reading,
an audit record whatever the outcome); a refusal is a 403 whose body says why and holds none
of the data. A missing or refused token is a 401 with the reason in ``WWW-Authenticate``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from clinic.auth import AuthError
from clinic.fanout import Replayer, run_fanout
from clinic.health import Health
from clinic.live import Hub
from clinic.service import (
    clinician_routes,
    consent_routes,
    fhir_routes,
    health_routes,
    patient_routes,
    stream_routes,
    ui_routes,
)
from clinic.service.context import ServiceContext
from clinic.service.deps import FHIR_JSON
from clinic.service.refusal import Refusal, outcome
from clinic.service.search import BadSearch
from clinic.web import STATIC


def create_app(context: ServiceContext) -> FastAPI:
    hub = Hub(context.consent, context.audit, clock=context.clock)
    health = Health(context.settings, hub, clock=context.clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(hub.watch_consent(stop)),
            asyncio.create_task(run_fanout(context.settings, hub, stop)),
            asyncio.create_task(health.run(stop)),
        ]
        try:
            yield
        finally:
            stop.set()
            for sub in list(hub.subscriptions.values()):
                hub.drop(sub, "the service is stopping")
            await asyncio.gather(*tasks, return_exceptions=True)
            context.close()

    app = FastAPI(
        title="vitalproof clinician service",
        summary="Consented live vitals and their history, as FHIR, with every disclosure audited.",
        lifespan=lifespan,
    )
    app.state.context = context
    app.state.hub = hub
    app.state.replayer = Replayer(context.settings, hub)
    app.state.health = health

    @app.exception_handler(AuthError)
    async def unauthorized(request: Request, exc: AuthError) -> JSONResponse:
        reason = str(exc)
        return JSONResponse(
            outcome("login", reason),
            status_code=401,
            media_type=FHIR_JSON,
            headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'
            },
        )

    @app.exception_handler(Refusal)
    async def forbidden(request: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse(outcome("forbidden", str(exc)), status_code=403, media_type=FHIR_JSON)

    @app.exception_handler(BadSearch)
    async def bad_search(request: Request, exc: BadSearch) -> JSONResponse:
        return JSONResponse(outcome("invalid", str(exc)), status_code=400, media_type=FHIR_JSON)

    app.include_router(fhir_routes.router, prefix="/fhir")
    app.include_router(stream_routes.router)
    app.include_router(consent_routes.router)
    app.include_router(ui_routes.router)
    app.include_router(clinician_routes.router)
    app.include_router(patient_routes.router)
    app.include_router(health_routes.router)
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")
    return app
