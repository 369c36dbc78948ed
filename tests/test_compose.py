"""compose.yaml cannot run here (no Docker engine); check it agrees with the local stack and
that its cluster profile is the deployment docs/deploy.md describes."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from vitalproof.devstack import kafka, mosquitto
from vitalproof.settings import SECRETS_DIR_VAR, PathSettings, Settings

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def profile(name: str) -> dict[str, dict[str, Any]]:
    """The services ``docker compose --profile NAME up`` starts."""
    return {k: v for k, v in load()["services"].items() if name in v.get("profiles", [])}


#: compose's ``${VAR:?message}`` / ``${VAR:-default}``: what an operator must (or may) set.
_INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Z0-9_]+)(?::(?P<op>[?-])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m["var"] in env:
            return env[m["var"]]
        assert m["op"] == "-", f"{m['var']} must be set: {m['arg']}"
        return m["arg"]

    return _INTERPOLATION.sub(sub, value)


#: Names the S3 lake's settings will have (another branch adds them, h/s3). Until they are
#: settings, compose may use them; once they are, they are checked like every other name.


def setting_names() -> set[str]:
    names = {g.env_name(f) for g in Settings.groups() for f in g.model_fields}
    return names | {SECRETS_DIR_VAR}


def secret_names() -> set[str]:
    return {
        g.env_name(f)
        for g in Settings.groups()
        for f, spec in g.model_fields.items()
        if "SecretStr" in str(spec.annotation)
    }


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
    compactor = doc["services"]["compactor"]
    assert compactor["command"][:3] == ["lake", "compact", "--watch"]
    assert compactor["environment"] == doc["services"]["worker"]["environment"]


# -- the cluster profile ----------------------------------------------------------------------

CLUSTER_ENV = {"VITALPROOF_RPC_URL": "https://rpc.example.org"}


def cluster_settings(service: dict[str, Any]) -> Settings:
    env = {k: interpolate(str(v), CLUSTER_ENV) for k, v in service["environment"].items()}
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env.items():
            mp.setenv(var, value)
        return Settings()


def vitalproof_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in services.items() if v.get("build") == "."}


def test_profiles_split_the_file_in_two():
    services = load()["services"]
    assert all(v.get("profiles") for v in services.values()), "every service is in a profile"
    local, cluster = profile("local"), profile("cluster")
    assert set(local) == {
        "kafka", "mosquitto", "anvil", "collector", "worker", "compactor", "anchor"
    }  # fmt: skip
    assert not {"kafka", "anvil"} & set(cluster), "the cluster runs no local broker or chain"


def test_three_brokers_with_one_controller_quorum():
    cluster = profile("cluster")
    brokers = {k: v for k, v in cluster.items() if v.get("image", "").startswith("apache/kafka")}
    assert len(brokers) == 3
    envs = {name: b["environment"] for name, b in brokers.items()}
    voters = {e["KAFKA_CONTROLLER_QUORUM_VOTERS"] for e in envs.values()}
    assert len(voters) == 1, "every broker names the same quorum"
    quorum = dict(v.split("@") for v in voters.pop().split(","))
    assert len(quorum) == 3
    for name, env in envs.items():
        node = env["KAFKA_NODE_ID"]
        assert quorum[node].split(":")[0] == name, f"voter {node} is not {name}"
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:19092"
        ctrl_port = quorum[node].split(":")[1]
        assert f"CONTROLLER://0.0.0.0:{ctrl_port}" in env["KAFKA_LISTENERS"]
    assert len({e["KAFKA_NODE_ID"] for e in envs.values()}) == 3
    (cluster_id,) = {e["CLUSTER_ID"] for e in envs.values()}
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "a KRaft cluster id"
    # Replication 3 / min ISR 2 for every topic: the broker defaults (internal topics and
    # anything Faust declares) and the pipeline's own, made by `vitalproof topics create`.
    for env in envs.values():
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    partitions = {e["KAFKA_NUM_PARTITIONS"] for e in envs.values()}
    for name, service in vitalproof_services(cluster).items():
        s = cluster_settings(service)
        assert s.kafka.replication_factor == 3 and s.kafka.min_insync_replicas == 2, name
        assert {str(s.kafka.partitions)} == partitions, name
        hosts = {h.split(":")[0] for h in s.kafka.bootstrap.split(",")}
        assert hosts == set(brokers), f"{name} bootstraps from every broker"


def test_topics_are_made_before_anything_uses_them():
    cluster = profile("cluster")
    assert cluster["topics"]["command"] == ["topics", "create"]
    for name, service in vitalproof_services(cluster).items():
        if name != "topics":
            cond = service["depends_on"]["topics"]["condition"]
            assert cond == "service_completed_successfully", name


def test_collectors_and_workers_scale():
    cluster = profile("cluster")
    collectors = {k: v for k, v in cluster.items() if v.get("command", [""])[0] == "collect"}
    assert len(collectors) >= 2
    gateways = []
    for name, service in collectors.items():
        cmd = service["command"]
        gateways.append(cmd[cmd.index("--gateway-id") + 1])
        assert service["restart"] == "always", f"{name}: its session waits for it to return"
    assert len(set(gateways)) == len(gateways), "each collector its own client id"
    groups = {cluster_settings(s).mqtt.share_group for s in collectors.values()}
    assert len(groups) == 1, "one shared subscription"
    (worker,) = [v for v in cluster.values() if v.get("command") == ["worker"]]
    assert worker["deploy"]["replicas"] >= 2
    assert "VITALPROOF_GATEWAY_ID" not in worker["environment"]
    assert worker["deploy"]["replicas"] <= cluster_settings(worker).kafka.partitions
    (compactor,) = [
        v for v in cluster.values() if v.get("command", [""])[:2] == ["lake", "compact"]
    ]
    assert compactor.get("deploy", {}).get("replicas", 1) == 1, "one compactor per object store"


def test_the_lake_is_on_seaweedfs_s3_and_the_chain_is_external():
    cluster = profile("cluster")
    weed = cluster["seaweedfs"]
    assert weed["image"].split(":")[0] == "chrislusf/seaweedfs"
    assert weed["command"][:3] == ["server", "-s3", "-dir=/data"]
    assert "-s3.port=8333" in weed["command"] and weed["ports"] == ["8333:8333"]
    for name, service in vitalproof_services(cluster).items():
        env = service["environment"]
        assert env["VITALPROOF_LAKE"].startswith("s3://"), name
        assert env["VITALPROOF_S3_ENDPOINT"] == "http://seaweedfs:8333", name
        s = cluster_settings(service)
        assert s.chain.kind == "rpc" and s.chain.rpc_url == CLUSTER_ENV["VITALPROOF_RPC_URL"]
        with pytest.raises(AssertionError, match="VITALPROOF_RPC_URL must be set"):
            interpolate(env["VITALPROOF_RPC_URL"], {})
    assert "anvil" not in str(cluster)


def test_cluster_names_are_real_settings_and_secrets_come_as_files():
    doc = load()
    cluster = profile("cluster")
    real = setting_names()
    for name, service in vitalproof_services(cluster).items():
        unknown = set(service["environment"]) - real
        assert not unknown, f"{name}: {unknown} are not settings"
        in_env = set(service["environment"]) & secret_names()
        assert not in_env, f"{name}: secrets {in_env} in the environment, not files"
        assert service["environment"]["VITALPROOF_SECRETS_DIR"] == "/run/secrets"
        for secret in service.get("secrets", []):
            assert secret in secret_names(), f"{name}: secret {secret} is no setting"
            assert secret in doc["secrets"]
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("./secrets/"), "secrets stay outside git"


def test_deploy_doc_names_only_real_settings():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"VITALPROOF_[A-Z0-9_]*[A-Z0-9]", doc))
    unknown = named - setting_names()
    assert not unknown, f"docs/deploy.md names {sorted(unknown)}, which are not settings"
    cluster = profile("cluster")
    for name in cluster:
        assert f"`{name}" in doc, f"docs/deploy.md does not describe the service {name}"


def test_the_broker_reads_the_password_file_enrolment_writes():
    """`devices enroll` in a vitalproof container writes the file its VITALPROOF_HOME puts it
    at; the broker container must read that same file through the shared `state` volume."""
    conf = (ROOT / "vitalproof/devstack/data/mosquitto/mosquitto.conf").read_text()
    (line,) = [ln for ln in conf.splitlines() if ln.startswith("password_file ")]
    inside_broker = Path(line.split(" ", 1)[1])
    (mount,) = [v for v in load()["services"]["mosquitto"]["volumes"] if v.startswith("state:")]
    broker_mount = Path(mount.split(":")[1])
    for name in ("collector", "collector-a"):
        service = load()["services"][name]
        home = Path(service["environment"]["VITALPROOF_HOME"])
        assert "state:" + str(home) in service["volumes"]
        written = mosquitto.password_file(Settings(paths=PathSettings(home=home)))
        assert inside_broker == broker_mount / written.relative_to(home), name
