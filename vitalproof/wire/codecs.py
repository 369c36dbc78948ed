"""Payload encodings a device may use, named by the MQTT v5 content type.

Normalization asks this module to turn a payload into a :class:`SampleBatch`; adding an
encoding means registering a decoder here, nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable

from vitalproof.errors import WireFormatError
from vitalproof.schema import CONTENT_TYPE_JSON, SampleBatch
from vitalproof.wire import binary

Decoder = Callable[[bytes, str], SampleBatch]


def _decode_json(payload: bytes, device_id: str) -> SampleBatch:
    return SampleBatch.from_json(payload, device_id=device_id)


#: media type (without parameters) -> decoder
DECODERS: dict[str, Decoder] = {
    CONTENT_TYPE_JSON.split(";")[0]: _decode_json,
    binary.CONTENT_TYPE_BINARY.split(";")[0]: binary.decode_payload,
}


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def decode_samples(content_type: str, payload: bytes, device_id: str) -> SampleBatch:
    """Decode ``payload`` by its content type; :class:`WireFormatError` says what is wrong."""
    decoder = DECODERS.get(media_type(content_type))
    if decoder is None:
        raise WireFormatError(f"unsupported content type {content_type!r}")
    return decoder(payload, device_id)
