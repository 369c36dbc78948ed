"""compose.yaml cannot run here (no Docker engine); check it agrees with the local stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vitalproof.devstack import kafka, mosquitto
from vitalproof.settings import SECRETS_DIR_VAR, Settings

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def host_port(service: dict[str, Any]) -> int:
    (mapping,) = service["ports"]
    host, container = mapping.split(":")
    assert host == container, "compose publishes each port on the same number"
    return int(host)


def test_ports_match_local_defaults():
    s = Settings()
    services = load()["services"]
    assert host_port(services["kafka"]) == s.kafka.port
    assert host_port(services["mosquitto"]) == s.mqtt.port
    assert host_port(services["anvil"]) == s.devstack.anvil_port
    conf = (ROOT / "vitalproof/devstack/data/mosquitto/mosquitto.conf").read_text()
    assert f"listener {s.mqtt.port} " in conf
    assert "allow_anonymous false" in conf and "persistence true" in conf
    assert f"max_packet_size {mosquitto.MAX_PACKET_BYTES}" in conf.splitlines()


def test_kafka_settings_match_the_local_broker():
    s = Settings()
    env = load()["services"]["kafka"]["environment"]
    local = dict(
        line.split("=", 1) for line in kafka._server_properties(s).splitlines() if "=" in line
    )
    assert env["KAFKA_PROCESS_ROLES"] == local["process.roles"]
    assert env["KAFKA_NUM_PARTITIONS"] == local["num.partitions"] == str(s.kafka.partitions)
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "group.initial.rebalance.delay.ms",
        "auto.create.topics.enable",
    ):
        assert env["KAFKA_" + key.upper().replace(".", "_")] == local[key], key
    pom = kafka.pom_text()
    version = load()["services"]["kafka"]["image"].split(":")[1]
    assert f"<kafka.version>{version}</kafka.version>" in pom


def test_acl_is_the_one_the_local_stack_generates():
    def rules(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    assert rules((ROOT / "vitalproof/devstack/data/mosquitto/acl").read_text()) == rules(
        mosquitto._acl_text(Settings())
    )


def test_services_use_real_settings_fields_and_topics():
    doc = load()
    fields = {g.env_name(f) for g in Settings.groups() for f in g.model_fields}
    fields.add(SECRETS_DIR_VAR)
    for name in ("collector", "worker", "anchor"):
        env = doc["services"][name]["environment"]
        unknown = set(env) - fields
        assert not unknown, f"{name}: {unknown} are not settings"
        with pytest.MonkeyPatch.context() as mp:
            for var, value in env.items():
                mp.setenv(var, str(value))
            s = Settings()
        assert s.kafka.bootstrap.endswith(f":{Settings().kafka.port}")
        assert s.kafka.topic_raw == "vitals.raw" and s.kafka.topic_batches == "vitals.batches"
    assert doc["services"]["collector"]["command"] == ["collect"]
    assert doc["services"]["worker"]["command"] == ["worker"]
    assert doc["services"]["anchor"]["command"][:2] == ["anchor", "run"]
