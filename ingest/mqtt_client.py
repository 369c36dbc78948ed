"""paho's MQTT client, with a receive path that keeps up with tens of thousands of PUBLISHes/s.

Profiling the collector at 25,000 offered messages/s (``bench/collector_bench.py --profile``)
put 85 % of its time in paho's receive path: four ``recv()`` calls per packet (the command
byte, each remaining-length byte, then the body) and a generic MQTT v5 ``Properties`` object
per PUBLISH, whose constructor alone runs some seventy ``str.replace`` calls. This subclass
overrides two of paho's internal hooks and nothing else:

- ``_sock_recv`` serves paho's small reads from one 64 KiB ``recv()``;
- ``_handle_publish`` decodes a QoS 1 MQTT v5 PUBLISH by hand into (packet id, topic,
  payload, content type) and hands that to :attr:`FastClient.on_publish_fast`, without an
  ``MQTTMessage``. Anything it does not fully understand goes to paho's own handler;
- :meth:`FastClient.ack_many` queues the PUBACKs of a whole burst as one write through
  ``_packet_queue`` (paho's ``ack()`` costs a queued packet and a ``send()`` each).

CONNECT, SUBSCRIBE, PUBACK, keepalive, QoS 0/2, TLS and reconnects stay paho's. The hooks are
private, so they are checked at import (:data:`SUPPORTED`) and the client falls back to plain
paho when they are missing; tests/test_mqtt_collector_fast.py pins their behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

READ_CHUNK = 1 << 16

# (packet id, topic, payload, content type)
PublishSink = Callable[[int, str, bytes, str], None]

SUPPORTED = all(
    callable(getattr(mqtt.Client, name, None))
    for name in ("_sock_recv", "_handle_publish", "_packet_read", "_packet_queue")
)
_PUBACK = 0x40
_PUBACK_HEAD = bytes([_PUBACK, 2])  # remaining length 2: packet id only, reason Success


class UnhandledPublish(ValueError):
    """A PUBLISH the lean decoder does not take (malformed, or an unexpected property)."""


def _varint(body: bytes | bytearray, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(4):
        byte = body[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    raise UnhandledPublish("variable byte integer longer than 4 bytes")


def _length16(body: bytes | bytearray, i: int) -> int:
    return (body[i] << 8) | body[i + 1]


# PUBLISH properties (MQTT 5.0, 3.3.2.3) -> how many bytes their value takes, when fixed.
_FIXED_SIZE = {0x01: 1, 0x02: 4, 0x23: 2}  # payload format, message expiry, topic alias
_ONE_STRING = (0x08, 0x09)  # response topic, correlation data: 2-byte length + bytes


def decode_publish_v5(body: bytes | bytearray) -> tuple[int, str, bytes, str]:
    """The variable header and payload of a QoS 1 MQTT v5 PUBLISH -> (packet id, topic,
    payload, content type). Raises :class:`UnhandledPublish` for anything else."""
    try:
        n = _length16(body, 0)
        i = 2 + n
        if i + 3 > len(body):
            raise UnhandledPublish("PUBLISH shorter than its header")
        topic = body[2:i].decode()
        mid = _length16(body, i)
        props_len, i = _varint(body, i + 2)
        end = i + props_len
        if end > len(body):
            raise UnhandledPublish("properties run past the packet")
        content_type = ""
        while i < end:
            pid = body[i]
            i += 1
            if pid == 0x03:  # content type
                n = _length16(body, i)
                content_type = body[i + 2 : i + 2 + n].decode()
                i += 2 + n
            elif pid in _FIXED_SIZE:
                i += _FIXED_SIZE[pid]
            elif pid in _ONE_STRING:
                i += 2 + _length16(body, i)
            elif pid == 0x26:  # user property: two strings
                i += 2 + _length16(body, i)
                i += 2 + _length16(body, i)
            elif pid == 0x0B:  # subscription identifier
                _, i = _varint(body, i)
            else:
                raise UnhandledPublish(f"property {pid:#04x} in a PUBLISH")
        if i != end:
            raise UnhandledPublish("properties do not end where their length says")
    except (IndexError, UnicodeDecodeError) as e:
        raise UnhandledPublish(f"malformed PUBLISH: {e}") from e
    return mid, topic, bytes(body[end:]), content_type


class FastClient(mqtt.Client):
    """A paho ``Client`` with the buffered reads and lean PUBLISH decoding described above."""

    on_publish_fast: PublishSink | None = None
    """Receives each QoS 1 PUBLISH instead of ``on_message`` (which still gets the others)."""

    _rbuf: bytes = b""
    _rpos: int = 0
    _rsock: object = None

    def buffered(self) -> bool:
        """Bytes already read from the socket but not yet parsed: select() cannot see them."""
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK (QoS 1, manual acks) each of ``mids``, in order, in one write.

        Without a reason code or properties, as paho writes them: in MQTT 5 that means
        Success (3.4.2.1)."""
        if not SUPPORTED or not self._manual_ack:
            for mid in mids:
                self.ack(mid, 1)
            return
        if mids:
            head = _PUBACK_HEAD
            packet = b"".join([head + mid.to_bytes(2, "big") for mid in mids])
            self._packet_queue(_PUBACK, packet, 0, 0)

    def _sock_recv(self, bufsize: int) -> bytes:
        if not SUPPORTED:
            return super()._sock_recv(bufsize)
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf) or self._rsock is not self._sock:
            buf = super()._sock_recv(READ_CHUNK)  # raises BlockingIOError when empty
            self._rsock, pos = self._sock, 0
            if not buf:  # closed by the broker
                self._rbuf, self._rpos = b"", 0
                return buf
        end = pos + bufsize
        self._rbuf, self._rpos = buf, end
        return buf[pos:end]

    def _handle_publish(self) -> MQTTErrorCode:
        sink = self.on_publish_fast
        packet = self._in_packet
        if (
            sink is None
            or not SUPPORTED
            or not self._manual_ack
            or (packet["command"] & 0x06) != 0x02  # QoS 1 only
            or self._protocol != MQTTProtocolVersion.MQTTv5
        ):
            return super()._handle_publish()
        try:
            mid, topic, payload, content_type = decode_publish_v5(packet["packet"])
        except UnhandledPublish:
            return super()._handle_publish()  # paho decides, as it always did
        sink(mid, topic, payload, content_type)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
