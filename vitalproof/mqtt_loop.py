"""paho-mqtt clients driven by the asyncio event loop, without paho's network thread.

paho can run without its thread when the application watches its socket: it announces the
socket through four callbacks (open, close, "I have bytes to write", "nothing left to write")
and expects ``loop_read`` when the socket is readable, ``loop_write`` when it is writable and
``loop_misc`` about once a second (keepalive pings, a broker that stopped answering). This
module is that contract handed to asyncio (``add_reader``/``add_writer``) once, for the MQTT
collector and for the simulated fleet alike: one thread then drives any number of clients,
with no hand-off between threads per message. A thread per client would not scale to a
thousand simulated devices on two cores, and the GIL would serialize them anyway.

Only paho's public API is used here: what reaches into paho's internals lives in
:mod:`ingest.mqtt.client`, behind its version check.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt

#: Called when a client's socket is readable; reads (at least once) with ``loop_read``.
Reader = Callable[[], None]

# loop_read calls before abort() gives up on seeing paho notice the closed socket: one is
# enough for a silent socket, each further one takes bytes the broker had already sent.
_ABORT_READS = 1000


def read_available(client: mqtt.Client) -> None:
    """One ``loop_read``, and more while TLS holds decrypted bytes that select() cannot see
    (they would otherwise wait for the next packet, or the next keepalive)."""
    client.loop_read()
    sock = client.socket()
    while isinstance(sock, ssl.SSLSocket) and sock.pending():
        client.loop_read()
        sock = client.socket()


def abort(client: mqtt.Client) -> None:
    """Close the client's connection now, without DISCONNECT.

    The socket is shut down and paho reads the end of the stream, so paho closes its side
    (socket callbacks, ``on_disconnect``) as it does when a broker hangs up; after a
    ``disconnect()`` paho reports that as a clean disconnect."""
    sock: Any = client.socket()
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    for _ in range(_ABORT_READS):
        if client.socket() is not sock:
            return
        client.loop_read()


class MqttLoop:
    """The sockets of paho clients, watched by the running asyncio loop.

    Use as ``async with MqttLoop() as mqtt_loop:``, :meth:`attach` each client before its
    ``connect()``; leaving the block sends DISCONNECT from every client still connected and
    waits (``close_timeout_s`` at most) for the broker to close, then closes what is left.
    Every callback runs on the loop's thread, so clients and their callbacks need no locks.
    """

    def __init__(self, *, close_timeout_s: float = 2.0, misc_interval_s: float = 1.0) -> None:
        self.close_timeout_s = close_timeout_s
        self.misc_interval_s = misc_interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[mqtt.Client] = []
        self._readers: dict[int, Reader] = {}  # id(client) -> what a readable socket calls
        self._open = 0
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._misc: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._misc = self._loop.create_task(self._misc_loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def attach(self, client: mqtt.Client, on_readable: Reader | None = None) -> None:
        """Drive ``client``'s sockets from now on. A readable socket calls ``on_readable``
        (default: :func:`read_available` of the client)."""
        self._clients.append(client)
        self._readers[id(client)] = on_readable or (lambda: read_available(client))
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    async def aclose(self) -> None:
        """DISCONNECT every connected client, wait for the broker to close (bounded), then
        close whatever is still open: a broker gone quiet must not hold the caller up."""
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        for client in self._clients:
            if client.socket() is not None:
                client.disconnect()  # the writer callback sends it, then paho closes
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), self.close_timeout_s)
        for client in self._clients:
            if client.socket() is not None:
                client.loop_write()  # a last try at what is queued, DISCONNECT included
                abort(client)

    # -- paho's socket callbacks ----------------------------------------------------------

    def _loop_of(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("MqttLoop: connect clients inside `async with MqttLoop()`")
        return self._loop

    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._open += 1
        self._all_closed.clear()
        self._loop_of().add_reader(sock, self._readers[id(client)])

    def _on_socket_close(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        loop = self._loop_of()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        self._open -= 1
        if self._open == 0:
            self._all_closed.set()

    def _on_socket_register_write(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._loop_of().add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: object, sock: Any) -> None:
        self._loop_of().remove_writer(sock)

    async def _misc_loop(self) -> None:
        """Keepalive pings and paho's timeouts for every connected client."""
        while True:
            await asyncio.sleep(self.misc_interval_s)
            for client in self._clients:
                if client.socket() is not None:
                    client.loop_misc()
