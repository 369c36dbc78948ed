"""Lifecycle of the local stack on its own ports (not the session stack other tests share)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from vitalproof.devstack import StackManager, anvil, kafka, mosquitto
from vitalproof.devstack.procs import ProcState, free_ports
from vitalproof.errors import PrerequisiteMissing
from vitalproof.settings import (
    DevStackSettings,
    KafkaSettings,
    MqttSettings,
    PathSettings,
    Settings,
)

pytestmark = pytest.mark.integration


def _own_settings(home: Path) -> Settings:
    kafka_port, controller_port, mqtt_port, anvil_port = free_ports(4)
    return Settings(
        paths=PathSettings(home=home),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{kafka_port}"),
        devstack=DevStackSettings(
            kafka_controller_port=controller_port, kafka_heap="384m", anvil_port=anvil_port
        ),
        mqtt=MqttSettings(port=mqtt_port, collector_password=SecretStr("collector-test-password")),
    )


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _processes_mentioning(*needles: str) -> list[str]:
    """Command lines of live processes that contain any of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(n in cmdline for n in needles):
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_up_status_noop_down(tmp_path: Path) -> None:
    settings = _own_settings(tmp_path / "home")
    manager = StackManager(settings)
    # Stale records: a pid that has exited, and a live pid (ours) with another start time,
    # as after a reboot with pid reuse. Neither may be trusted, and down must not kill us.
    ProcState(_dead_pid(), 1, "x", ["x"], "x").save(mosquitto.state_path(settings))
    ProcState(os.getpid(), 1, "x", ["x"], "x").save(kafka.state_path(settings))
    before = manager.status()
    assert not before.healthy
    assert before.kafka is not None and not before.kafka.running
    try:
        t0 = time.monotonic()
        status = manager.up(chain="anvil")
        first_up = time.monotonic() - t0
        assert status.healthy, status.to_json()
        parts = status.parts
        assert set(parts) == {"kafka", "mosquitto", "anvil"}
        pids = {name: p.pid for name, p in parts.items()}
        assert all(pid and pid != os.getpid() for pid in pids.values()), pids
        assert parts["kafka"].address == settings.kafka.bootstrap
        assert parts["mosquitto"].address == f"127.0.0.1:{settings.mqtt.port}"
        assert anvil.chain_id(manager.rpc_url) == 31337
        decoded = json.loads(status.to_json())
        assert decoded["parts"]["kafka"]["pid"] == pids["kafka"]

        t0 = time.monotonic()
        again = manager.up(chain="anvil")
        assert time.monotonic() - t0 < 5, "second up should not restart anything"
        assert {name: p.pid for name, p in again.parts.items()} == pids

        # Another manager (another process, in real life) sees the same stack.
        assert StackManager(settings).status().healthy
        print(f"own stack up in {first_up:.1f} s")
    finally:
        manager.down()

    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still exists after down"
    leftovers = _processes_mentioning(
        str(settings.paths.stack_dir), f"--port {settings.devstack.anvil_port}"
    )
    assert leftovers == []
    after = manager.status()
    assert not any(p.running for p in after.parts.values())
    assert not kafka.state_path(settings).exists()
    manager.down()  # idempotent


def test_missing_prerequisite_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("VITALPROOF_KAFKA_LIBS", str(tmp_path / "no-jars"))
    monkeypatch.setattr(mosquitto, "SBIN_DIRS", ())
    settings = _own_settings(tmp_path / "home")
    manager = StackManager(settings)

    with pytest.raises(PrerequisiteMissing) as info:
        manager.up()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{info.value.program} not found: ")
    assert "apt-get install" in message
    assert not manager.status().healthy
    assert not any(p.running for p in manager.status().parts.values())

    for check, program in (
        (mosquitto.check_prerequisites, "mosquitto"),
        (kafka.java_program, "java"),
        (lambda: kafka.check_prerequisites(Settings()), "java"),
    ):
        with pytest.raises(PrerequisiteMissing) as info:
            check()
        assert info.value.program == program
        assert str(info.value).count("\n") == 0
    assert str(info.value) == "java not found: apt-get install -y openjdk-17-jre-headless"


def test_anvil_comes_back_with_its_chain_after_a_stop(tmp_path: Path) -> None:
    """`stack down` then `stack up`: the same chain, with the transaction sent before (what a
    proof exported after a demo needs, to be checked on chain later)."""
    from web3 import Web3

    settings = _own_settings(tmp_path / "home")
    manager = StackManager(settings)
    try:
        manager.start("anvil")
        w3 = Web3(Web3.HTTPProvider(manager.rpc_url))
        tx = w3.eth.send_transaction(
            {"from": w3.eth.accounts[0], "to": w3.eth.accounts[1], "value": 1}
        )
        receipt = w3.eth.wait_for_transaction_receipt(tx)
        manager.stop("anvil")
        assert anvil.chain_state_path(settings).stat().st_size > 0
        manager.start("anvil")
        again = w3.eth.get_transaction_receipt(tx)
        assert again["blockHash"] == receipt["blockHash"]
        assert w3.eth.get_block(receipt["blockNumber"])["hash"] == receipt["blockHash"]
    finally:
        manager.stop("anvil")


def test_a_proxied_kafka_listener_advertises_the_proxys_port(tmp_path: Path) -> None:
    """The partition-kafka drill's listener: clients that bootstrap through it are told to
    come back to the proxy's port, so the proxy stays in their path; the plain listener is
    unchanged, and without the setting there is no second listener."""
    base = Settings(
        paths=PathSettings(home=tmp_path),
        kafka=KafkaSettings(bootstrap="127.0.0.1:19092"),
        devstack=DevStackSettings(kafka_controller_port=19093),
    )
    plain = dict(ln.split("=", 1) for ln in kafka._server_properties(base).splitlines())
    assert "PROXIED" not in plain["listeners"] + plain["advertised.listeners"]
    proxied = base.evolve(
        devstack={"kafka_proxied_port": 21001, "kafka_proxied_advertised_port": 21002}
    )
    props = dict(ln.split("=", 1) for ln in kafka._server_properties(proxied).splitlines())
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093,PROXIED://127.0.0.1:21001"
    )
    assert props["advertised.listeners"] == (
        "PLAINTEXT://127.0.0.1:19092,PROXIED://127.0.0.1:21002"
    )
    assert props["listener.security.protocol.map"].endswith(",PROXIED:PLAINTEXT")
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
