"""Mosquitto 2 as the devices' MQTT broker, with per-device credentials and topic ACLs.

Security model (why the generated files look like this):

* no anonymous clients; every device has its own username (= device id) and password;
* ``pattern write devices/%u/#``: a device can only publish under its own id, so a
  compromised wristband cannot inject readings for another patient;
* the collector account only reads ``devices/#``. Mosquitto 2 checks a shared subscription
  (``$share/<group>/devices/#``) against the underlying topic, so the same rule covers the
  load-balanced collectors;
* persistence on and a deep per-client queue, so a restarting collector with a persistent
  session misses nothing.

Password entries are written by Python in mosquitto's own ``$7$`` format (PBKDF2-SHA512,
101 iterations, 12-byte salt, 64-byte hash: what ``mosquitto_passwd`` of 2.0 writes), so
enrolment needs neither ``mosquitto_passwd`` nor a broker restart: the file is replaced
atomically and the broker reloads it on SIGHUP.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path

from vitalproof.devstack import procs
from vitalproof.durable import write_atomic, write_new
from vitalproof.errors import ConfigError, StackError
from vitalproof.settings import MqttSettings, Settings

MOSQUITTO_HINT = "apt-get install -y mosquitto"
# Debian installs the broker in /usr/sbin, which a non-root PATH often lacks.
SBIN_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin")
READY_TIMEOUT_S = 15.0
RELOAD_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
MAX_QUEUED_MESSAGES = 100_000
#: Largest MQTT packet the broker takes. Below Kafka's 1 MiB record limit with room for the
#: collector's headers: a bigger payload would be acked by the broker and then could never be
#: produced (the collector would stop on it at every restart). MQTT v5 clients learn the limit
#: from CONNACK; a client that sends more anyway is disconnected, and nothing is acked.
MAX_PACKET_BYTES = 512 * 1024

PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64

# A login whose password changes on every password-file update and is never handed out:
# after SIGHUP we connect with the new one to know the broker has really reloaded.
RELOAD_PROBE_USER = "_vitalproof_reload"

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# CONNACK return codes of MQTT 3.1.1
CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


def mosquitto_dir(settings: Settings) -> Path:
    return settings.paths.stack_dir / "mosquitto"


def state_path(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "state.json"


def config_path(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "mosquitto.conf"


def password_file(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "passwd"


def acl_file(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "acl"


def log_path(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "logs" / "mosquitto.log"


def _stdout_path(settings: Settings) -> Path:
    return mosquitto_dir(settings) / "logs" / "stdout.log"


def _secret_path(settings: Settings) -> Path:
    """The collector password's file in the secrets folder, where every process's settings
    read it (so the collector needs nothing of this module to log in)."""
    return settings.secrets_dir / MqttSettings.env_name("collector_password")


def check_prerequisites() -> str:
    """Path of the ``mosquitto`` binary (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in SBIN_DIRS:
        candidate = os.path.join(folder, "mosquitto")
        if os.access(candidate, os.X_OK):
            return candidate
    return procs.require_program("mosquitto", MOSQUITTO_HINT)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto 2's ``$7$`` hash: ``$7$101$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS, HASH_BYTES
    )
    return (
        f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
        f"${base64.b64encode(digest).decode()}"
    )


def verify_password(password: str, entry: str) -> bool:
    """Check a password against a ``$7$`` entry (used by tests and by `stack status`)."""
    try:
        _, kind, iterations, salt_b64, hash_b64 = entry.split("$")
    except ValueError:
        return False
    if kind != "7":
        return False
    salt = base64.b64decode(salt_b64)
    want = base64.b64decode(hash_b64)
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(iterations), len(want))
    return secrets.compare_digest(got, want)


def _check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ConfigError(
            f"device id {device_id!r} cannot be an MQTT username: use letters, digits, . _ -"
        )


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with mode 0600 (it holds secrets or hashes)."""
    write_atomic(path, text.encode(), mode=0o600)


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """Serialise password-file updates between processes (enrol CLI vs. `stack up`)."""
    lock = mosquitto_dir(settings) / ".passwd.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_entries(settings: Settings) -> dict[str, str]:
    entries: dict[str, str] = {}
    try:
        text = password_file(settings).read_text()
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        user, sep, hashed = line.partition(":")
        if sep and user:
            entries[user] = hashed
    return entries


def collector_credentials(settings: Settings) -> tuple[str, str]:
    """(username, password) of the collector account.

    ``settings.mqtt.collector_password`` wins; otherwise a random password is generated
    once into the secrets folder (``<home>/secrets/VITALPROOF_MQTT_COLLECTOR_PASSWORD``,
    0600), where the collector's own settings find it, and reused.
    """
    user = settings.mqtt.collector_user
    if settings.mqtt.collector_password is not None:
        return user, settings.mqtt.collector_password.get_secret_value()
    path = _secret_path(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    if not write_new(path, password.encode(), mode=0o600):
        return user, path.read_text().strip()
    return user, password


def _update_entries(
    settings: Settings,
    *,
    set_passwords: Mapping[str, str] | None = None,
    remove: tuple[str, ...] = (),
) -> str:
    """Apply changes to the password file; returns the new reload-probe password."""
    probe_password = secrets.token_urlsafe(18)
    with _locked(settings):
        entries = _read_entries(settings)
        for user in remove:
            entries.pop(user, None)
        for user, password in (set_passwords or {}).items():
            entries[user] = hash_password(password)
        entries[RELOAD_PROBE_USER] = hash_password(probe_password)
        _write_private(password_file(settings), "".join(f"{u}:{h}\n" for u, h in entries.items()))
    return probe_password


def _running_state(settings: Settings) -> procs.ProcState | None:
    state = procs.ProcState.load(state_path(settings))
    return state if state is not None and state.alive() else None


def _reload(settings: Settings, probe_password: str) -> None:
    """SIGHUP a running broker and wait until it accepts the new password file."""
    state = _running_state(settings)
    if state is None:
        return  # read at next start
    os.kill(state.pid, signal.SIGHUP)
    host, port = settings.mqtt.host, settings.mqtt.port
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if connect_rc(host, port, RELOAD_PROBE_USER, probe_password) == CONNACK_ACCEPTED:
                return
        time.sleep(0.05)
    raise StackError(
        f"mosquitto did not reload its password file within {RELOAD_TIMEOUT_S:.0f} s; "
        f"last lines of {log_path(settings)}:\n{procs.log_tail(log_path(settings))}"
    )


def set_device_credentials(settings: Settings, credentials: Mapping[str, str]) -> None:
    """Add or replace device logins (username = device id) and reload a running broker.

    When this returns the broker already accepts the new passwords.
    """
    for device_id, password in credentials.items():
        _check_device_id(device_id)
        if device_id in (settings.mqtt.collector_user, RELOAD_PROBE_USER):
            raise ConfigError(f"{device_id!r} is reserved and cannot be a device id")
        if not password:
            raise ConfigError(f"empty MQTT password for device {device_id!r}")
    probe = _update_entries(settings, set_passwords=credentials)
    _reload(settings, probe)


def remove_device(settings: Settings, device_id: str) -> None:
    """Revoke a device's login; existing connections keep running until they reconnect."""
    if device_id in (settings.mqtt.collector_user, RELOAD_PROBE_USER):
        raise ConfigError(f"{device_id!r} is reserved and cannot be removed as a device")
    probe = _update_entries(settings, remove=(device_id,))
    _reload(settings, probe)


ACL_COLLECTOR_LINE = "user collector"


def acl_template() -> str:
    """The one ACL (package data, mounted by compose.yaml too) for the collector user
    ``collector``."""
    return resources.files(__package__).joinpath("data/mosquitto/acl").read_text()


def _acl_text(settings: Settings) -> str:
    """The ACL with the configured collector user in place of ``collector``."""
    lines = acl_template().splitlines()
    if ACL_COLLECTOR_LINE not in lines:
        raise StackError(f"the packaged Mosquitto ACL lacks the line {ACL_COLLECTOR_LINE!r}")
    user = f"user {settings.mqtt.collector_user}"
    header = "# generated by vitalproof.devstack on every `stack up`; edits are lost"
    return "\n".join([header, *(user if ln == ACL_COLLECTOR_LINE else ln for ln in lines)]) + "\n"


def _autosave_lines(settings: Settings) -> list[str]:
    changes = settings.devstack.mqtt_autosave_changes
    if changes:
        return ["autosave_on_changes true", f"autosave_interval {changes}"]
    return ["autosave_interval 60"]


def _config_text(settings: Settings) -> str:
    base = mosquitto_dir(settings)
    lines = [
        "# generated by vitalproof.devstack on every `stack up`; edits are lost",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file(settings)}",
        f"acl_file {acl_file(settings)}",
        f"listener {settings.mqtt.port} {settings.mqtt.host}",
        "persistence true",
        f"persistence_location {base / 'data'}",
        # A SIGKILLed broker restarts from its last save: saving after every change loses
        # nothing it acknowledged (the kill-mosquitto drill) but cut collector_bench from
        # 12-54k to 1.6k msg/s, so it is a setting (devstack.mqtt_autosave_changes).
        *_autosave_lines(settings),
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        # The collector acks only after Kafka acked: with mosquitto's default of 20 unacked
        # messages per client it would idle waiting on Kafka round trips.
        "max_inflight_messages 1000",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"log_dest file {log_path(settings)}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if settings.devstack.mqtt_tls_listener_port is not None:
        if (
            settings.devstack.mqtt_tls_certfile is None
            or settings.devstack.mqtt_tls_keyfile is None
        ):
            raise StackError(
                "VITALPROOF_MQTT_TLS_LISTENER_PORT needs VITALPROOF_MQTT_TLS_CERTFILE and "
                "VITALPROOF_MQTT_TLS_KEYFILE (the broker's certificate and key, PEM)"
            )
        lines += [
            f"listener {settings.devstack.mqtt_tls_listener_port} {settings.mqtt.host}",
            f"certfile {settings.devstack.mqtt_tls_certfile}",
            f"keyfile {settings.devstack.mqtt_tls_keyfile}",
            "tls_version tlsv1.2",
        ]
    if os.geteuid() == 0:
        # As root mosquitto would switch to user "mosquitto", which cannot read our 0600
        # files; naming the current user keeps it as is.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    return "\n".join(lines) + "\n"


def write_config(settings: Settings) -> Path:
    """Config, ACL and a password file holding at least the collector; returns the config."""
    base = mosquitto_dir(settings)
    for sub in ("data", "logs"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    user, password = collector_credentials(settings)
    with _locked(settings):
        entries = _read_entries(settings)
        current = entries.get(user)
        if current is None or not verify_password(password, current):
            entries[user] = hash_password(password)
            _write_private(
                password_file(settings), "".join(f"{u}:{h}\n" for u, h in entries.items())
            )
    _write_private(acl_file(settings), _acl_text(settings))
    config_path(settings).write_text(_config_text(settings))
    return config_path(settings)


def _encode_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_rc(
    host: str, port: int, user: str | None, password: str | None, timeout: float = 2.0
) -> int:
    """Send one MQTT 3.1.1 CONNECT and return the CONNACK code (0 accepted, 4/5 refused).

    A dependency-free probe: readiness and reload checks must not need paho's threads.
    """
    flags = 0x02  # clean session
    payload = _encode_str("")
    if user is not None:
        flags |= 0x80
        payload += _encode_str(user)
        if password is not None:
            flags |= 0x40
            payload += _encode_str(password)
    variable = _encode_str("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big")
    body = variable + payload
    packet = b"\x10" + _varint(len(body)) + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(packet)
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection before CONNACK")
            data += chunk
        if data[0] != 0x20:
            raise ConnectionError(f"unexpected MQTT packet type {data[0]:#x}")
        rc = data[3]
        if rc == CONNACK_ACCEPTED:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
        return rc


def start(settings: Settings) -> procs.ProcState:
    """Write config and start mosquitto; ready when the collector can log in."""
    binary = check_prerequisites()
    if procs.port_open(settings.mqtt.host, settings.mqtt.port):
        raise StackError(
            f"port {settings.mqtt.host}:{settings.mqtt.port} is already in use by another "
            "process (MQTT)"
        )
    conf = write_config(settings)
    probe_password = _update_entries(settings)
    argv = [binary, "-c", str(conf)]

    def probe() -> bool:
        rc = connect_rc(settings.mqtt.host, settings.mqtt.port, RELOAD_PROBE_USER, probe_password)
        return rc == CONNACK_ACCEPTED

    return procs.start_daemon(
        "mosquitto",
        argv,
        log_path=_stdout_path(settings),
        state_path=state_path(settings),
        address=f"{settings.mqtt.host}:{settings.mqtt.port}",
        ready=probe,
        cwd=mosquitto_dir(settings),
        timeout=READY_TIMEOUT_S,
        interval=0.05,
        stop_timeout=3,
        state_log=log_path(settings),
        failure_log=log_path(settings),
    )


def healthy(settings: Settings) -> bool:
    """The collector can log in right now."""
    user, password = collector_credentials(settings)
    try:
        return connect_rc(settings.mqtt.host, settings.mqtt.port, user, password) == 0
    except OSError:
        return False
