"""The record of ``vitals.raw``: how a collector hands a device's bytes to the pipeline.

Collectors do not parse payloads (BLE collectors excepted, which must decode GATT bytes):
they stamp who sent what, when and how, and forward the original bytes, so normalization is
the one place that accepts or rejects, and a rejection can always quote the original bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitalproof.schema import Transport

H_CONTENT_TYPE = "content-type"
H_DEVICE = "device-id"
H_TRANSPORT = "transport"
H_GATEWAY = "gateway-id"
H_RECEIVED = "received-us"
H_SOURCE = "source"  # MQTT topic or GATT characteristic UUID

# Added to a record when it is rejected to vitals.dlq (the original headers and bytes stay).
H_DLQ_REASON = "dlq-reason"
H_DLQ_STAGE = "dlq-stage"  # normalize | seal | ble
H_DLQ_ORIGIN = "dlq-origin"  # topic/partition/offset of the rejected record, when it had one


@dataclass(frozen=True, slots=True)
class RawRecord:
    device_id: str
    payload: bytes
    content_type: str
    transport: Transport
    gateway_id: str
    received_us: int
    source: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (H_CONTENT_TYPE, self.content_type.encode()),
            (H_DEVICE, self.device_id.encode()),
            (H_TRANSPORT, self.transport.value.encode()),
            (H_GATEWAY, self.gateway_id.encode()),
            (H_RECEIVED, str(self.received_us).encode()),
            (H_SOURCE, self.source.encode()),
        ]

    @classmethod
    def from_kafka(
        cls, value: bytes, headers: list[tuple[str, bytes]] | dict[str, bytes]
    ) -> RawRecord:
        """Rebuild from a consumed record; missing headers become empty (normalize rejects)."""
        h = dict(headers)

        def get(name: str) -> str:
            raw = h.get(name)
            return raw.decode("utf-8", "replace") if raw else ""

        try:
            transport = Transport(get(H_TRANSPORT))
        except ValueError:
            transport = Transport.MQTT
        received = get(H_RECEIVED)
        return cls(
            device_id=get(H_DEVICE),
            payload=value or b"",
            content_type=get(H_CONTENT_TYPE),
            transport=transport,
            gateway_id=get(H_GATEWAY),
            received_us=int(received) if received.isdigit() else 0,
            source=get(H_SOURCE),
        )
