"""MQTT over TLS on the real Mosquitto: the local stack's TLS listener, a device publishing
through it, the collector subscribing through it (verifying the broker's certificate against
``mqtt_tls_ca``) and forwarding to the real Kafka; a client trusting another CA is refused.

Certificates are made for the test with ``cryptography`` (a throwaway CA and a server
certificate for 127.0.0.1); the broker is a second Mosquitto on free ports with its own state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import uuid
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.client import MQTTv5

from tests.taps import RawTap
from tests.test_pipeline import collector_running
from vitalproof.devstack import mosquitto, procs, set_device_credentials
from vitalproof.settings import Settings

pytestmark = pytest.mark.integration


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(
    folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


# paho-mqtt 2.2 (Client._ssl_wrap_socket) does not close the socket whose TLS handshake failed
# and leaves it to the garbage collector: the refused client below is that case.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
def test_device_and_collector_over_tls(kafka_topics: Settings, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, ca_key, ca_cert = make_ca(pki, "vitalproof-test-ca")
    other_ca, _, _ = make_ca(pki, "someone-else")
    certfile, keyfile = make_server_cert(pki, ca_key, ca_cert)
    plain_port, tls_port = procs.free_ports(2)
    broker = kafka_topics.evolve(
        paths={"home": tmp_path / "tls-home"},
        mqtt={"port": plain_port},
        devstack={
            "mqtt_tls_listener_port": tls_port,
            "mqtt_tls_certfile": certfile,
            "mqtt_tls_keyfile": keyfile,
        },
    )
    device, password = f"dev-tls-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    set_device_credentials(broker, {device: password})
    state = mosquitto.start(broker)
    try:
        assert f"listener {tls_port} " in mosquitto.config_path(broker).read_text()
        collector_side = broker.evolve(mqtt={"port": tls_port, "tls_ca": ca})

        def publish(payload: bytes, ca_certs: Path) -> None:
            mqtt_publish.single(
                f"devices/{device}/vitals",
                payload,
                qos=1,
                hostname="127.0.0.1",
                port=tls_port,
                client_id=device,
                auth={"username": device, "password": password},
                tls={"ca_certs": str(ca_certs)},
                protocol=MQTTv5,
            )

        async def go() -> int:
            tap = RawTap(collector_side)
            await tap.start()
            try:
                async with collector_running(collector_side):
                    for i in range(3):
                        await asyncio.to_thread(publish, f"tls reading {i}".encode(), ca)
                    for _ in range(100):
                        if tap.count(device) >= 3:
                            break
                        await asyncio.sleep(0.1)
                return tap.count(device)
            finally:
                await tap.stop()

        assert asyncio.run(go()) == 3, "readings published over TLS did not reach vitals.raw"
        with pytest.raises(ssl.SSLCertVerificationError):
            publish(b"must not go through", other_ca)  # a broker this client cannot trust
    finally:
        procs.terminate(state.pid, timeout=5)
