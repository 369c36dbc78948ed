"""The clinician service (`vitalproof serve`): one ASGI app in front of the lake and Kafka.

:func:`create_app` builds it from a :class:`ServiceContext` (settings, consent, audit, the
token validator); the FHIR REST base is ``/fhir``.
"""

from clinic.service.app import create_app
from clinic.service.context import ServiceContext

__all__ = ["ServiceContext", "create_app"]
