"""paho's MQTT client, with a receive path that keeps up with tens of thousands of PUBLISHes/s.

Profiling the collector at 25,000 offered messages/s (``bench/collector_bench.py --profile``)
put 85 % of its time in paho's receive path: four ``recv()`` calls per packet (the command
byte, each remaining-length byte, then the body) and a generic MQTT v5 ``Properties`` object
per PUBLISH, whose constructor alone runs some seventy ``str.replace`` calls. This subclass
replaces that path and nothing else:

- :meth:`FastClient.loop_read` reads up to 64 KiB at once and frames every complete packet
  in it (paho reads one packet per call, byte by byte up to its body). A QoS 1 MQTT v5
  PUBLISH is decoded by hand into (packet id, topic, payload, content type) and handed to
  :attr:`FastClient.on_publish_fast`, without an ``MQTTMessage``; every other packet, and any
  PUBLISH the lean decoder does not fully understand, goes to paho's own ``_packet_handle``
  with paho's reader state set as its reader would have left it;
- :meth:`FastClient.ack_many` queues the PUBACKs of a whole burst as one write through
  ``_packet_queue`` (paho's ``ack()`` costs a queued packet and a ``send()`` each).

CONNECT, SUBSCRIBE, PUBACK, keepalive, QoS 0/2, TLS and reconnects stay paho's. The hooks are
private, and paho changes them between releases (2.2.0 renamed ``_last_msg_in`` to
``_last_bytes_received`` and moved the packet decoders), so this is the one module that may
read paho's internals, and only for the releases they were checked against
(:data:`VERIFIED_PAHO`): on any other paho the client is plain paho (:data:`FAST_PATH` false:
correct, and several times slower). tests/test_mqtt_collector_fast.py pins the fast path's
behaviour and fails when the installed paho is outside the verified range.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

from vitalproof.errors import WireFormatError

MQTTv5 = MQTTProtocolVersion.MQTTv5

READ_CHUNK = 1 << 16

# (packet id, topic, payload, content type)
PublishSink = Callable[[int, str, bytes, str], None]

#: The first and last paho-mqtt releases whose internals the fast path was checked against:
#: ``_sock_recv``, ``_packet_handle`` with the ``_in_packet`` reader state it reads,
#: ``_packet_queue``, ``_loop_rc_handle``, ``_easy_log``, ``_msgtime_mutex`` and
#: ``_last_bytes_received``, ``_manual_ack``, ``_protocol``, ``_sock``, and the
#: ``MalformedPacket`` its handlers raise. Move the last only after reading those in the new
#: release and running tests/test_mqtt_collector_fast.py on it (a patch release may move
#: them too: 2.2.0 renamed one and moved the packet decoders).
VERIFIED_PAHO = ((2, 2, 0), (2, 2, 0))


def release(version: str) -> tuple[int, int, int]:
    """``"2.2.0"`` (or ``"2.2.0rc1"``, ``"2.2"``) -> (2, 2, 0); (0, 0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        return (0, 0, 0)
    return (int(m[1]), int(m[2]), int(m[3] or 0))


PAHO_VERSION = release(paho.mqtt.__version__)
#: The installed paho is one whose internals were verified: :class:`FastClient` may use them.
FAST_PATH = VERIFIED_PAHO[0] <= PAHO_VERSION <= VERIFIED_PAHO[1]
if FAST_PATH:
    from paho.mqtt.exception import MalformedPacket

_PUBACK = 0x40
_PUBACK_HEAD = bytes([_PUBACK, 2])  # remaining length 2: packet id only, reason Success


class UnhandledPublish(WireFormatError):
    """A PUBLISH the lean decoder does not take (malformed, or an unexpected property)."""


def _varint(body: bytes | bytearray, i: int) -> tuple[int, int]:
    """The MQTT variable byte integer at ``body[i]``: (value, index after it). IndexError if
    ``body`` ends first; ValueError past the 4 bytes MQTT allows."""
    value, shift = 0, 0
    for _ in range(4):
        byte = body[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    raise ValueError("variable byte integer longer than 4 bytes")


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
    except UnhandledPublish:
        raise
    except (IndexError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UnhandledPublish(f"malformed PUBLISH: {e}") from e
    return mid, topic, bytes(body[end:]), content_type


class FastClient(mqtt.Client):
    """A paho ``Client`` with the buffered reads and lean PUBLISH decoding described above.

    Off the verified paho releases (``fast_path`` false) every method here is paho's own,
    through its public API: one packet per ``loop_read``, everything to ``on_message``, one
    ``ack()`` per message."""

    fast_path: bool = FAST_PATH
    """Whether this client reads and acks through paho's internals (tests turn it off to
    check the fallback on a verified paho)."""

    on_publish_fast: PublishSink | None = None
    """Receives each QoS 1 PUBLISH instead of ``on_message`` (which still gets the others)."""

    _partial: bytearray | None = None  # the start of a packet the next read completes
    _partial_sock: object = None
    _read_more = False

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK (QoS 1, manual acks) each of ``mids``, in order, in one write.

        Without a reason code or properties, as paho writes them: in MQTT 5 that means
        Success (3.4.2.1)."""
        if not self.fast_path or not self._manual_ack:
            for mid in mids:
                self.ack(mid, 1)
            return
        if mids:
            head = _PUBACK_HEAD
            packet = b"".join([head + mid.to_bytes(2, "big") for mid in mids])
            self._packet_queue(_PUBACK, packet, 0, 0)

    def read_more(self) -> bool:
        """The last read filled its buffer, or TLS holds decrypted bytes select() cannot see:
        read again before waiting for the socket."""
        sock = self.socket()
        return self._read_more or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """One ``recv()`` of up to 64 KiB, and every complete packet in it handled."""
        if not self.fast_path:
            return super().loop_read(max_packets)
        sock = self._sock
        if sock is None:
            return super().loop_read(max_packets)
        self._read_more = False
        try:
            data = self._sock_recv(READ_CHUNK)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        self._read_more = len(data) == READ_CHUNK
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        buf = self._partial if self._partial_sock is sock else None
        if buf is None:
            buf = bytearray(data)
        else:
            buf += data
        rc, used = self._handle_packets(buf, sock)
        del buf[:used]
        self._partial, self._partial_sock = (buf, sock) if buf else (None, None)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._partial = None
            return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_packets(self, buf: bytearray, sock: object) -> tuple[MQTTErrorCode, int]:
        """Handle the complete packets at the start of ``buf``: (paho's result code, bytes
        used). Stops at the first incomplete packet, or when a handler closed the socket."""
        sink, n, i = self.on_publish_fast, len(buf), 0
        fast = sink is not None and self._manual_ack and self._protocol == MQTTv5
        while i + 2 <= n:
            command = buf[i]
            try:
                length, j = _varint(buf, i + 1)  # the remaining length
            except IndexError:  # not all here yet
                return MQTTErrorCode.MQTT_ERR_SUCCESS, i
            except ValueError:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL, i
            end = j + length
            if end > n:
                return MQTTErrorCode.MQTT_ERR_SUCCESS, i
            body = buf[j:end]
            if fast and command & 0xF6 == 0x32:  # PUBLISH, QoS 1 (any DUP, RETAIN)
                try:
                    mid, topic, payload, content_type = decode_publish_v5(body)
                except UnhandledPublish:
                    pass  # paho's handler decides, below
                else:
                    assert sink is not None
                    sink(mid, topic, payload, content_type)
                    i = end
                    continue
            rc = self._paho_handle(command, buf[i + 1 : j], length, body)
            i = end
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is not sock:
                return rc, n  # the rest belonged to a connection that is gone
        return MQTTErrorCode.MQTT_ERR_SUCCESS, i

    def _paho_handle(
        self, command: int, length_bytes: bytearray, length: int, body: bytearray
    ) -> MQTTErrorCode:
        """One packet through paho's handlers, with its reader's state as paho leaves it."""
        self._in_packet = {
            "command": command,
            "have_remaining": 1,
            "remaining_count": list(length_bytes),
            "remaining_mult": 1 << (7 * len(length_bytes)),
            "remaining_length": length,
            "packet": body,
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        return rc
