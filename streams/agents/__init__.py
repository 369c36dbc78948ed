"""The worker's two Faust agents as plain classes: :class:`NormalizeAgent` (vitals.raw ->
vitals.clean | vitals.dlq) and :class:`SealAgent` (vitals.clean -> encrypted Parquet +
manifest -> vitals.batches).

Each is built from only what it needs (its settings group, its state, where its output goes)
and runs over anything with Faust's ``noack_take``/``ack`` surface, so it can be driven
without a broker; :func:`streams.app.create_app` wires both to Kafka.
"""

from streams.agents.normalize import NormalizeAgent, bundle_by_patient
from streams.agents.ports import NormalizeOutputs, SealOutputs, TakeStream, dlq_headers
from streams.agents.seal import SealAgent

__all__ = [
    "NormalizeAgent",
    "NormalizeOutputs",
    "SealAgent",
    "SealOutputs",
    "TakeStream",
    "bundle_by_patient",
    "dlq_headers",
]
