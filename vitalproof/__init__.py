"""vitalproof: wearable vital signs whose integrity anyone can check.

This package holds what every stage shares: the canonical data model and wire schema
(:mod:`vitalproof.schema`), units (:mod:`vitalproof.units`), settings, errors, the device
registry, the local stack and the CLI. The stages themselves live in the top-level packages
``ingest``, ``streams``, ``anchor`` and ``device_sims``.
"""

__version__ = "0.1.0"
