"""Apache Kafka as a single KRaft node (broker + controller in one JVM) on 127.0.0.1.

No Docker and no Kafka tarball: the broker's class path is resolved by Maven from the pom
shipped with this package (``vitalproof/devstack/data/kafka-pom.xml``) once into a per-user
cache, so every checkout, installed copy and test session shares the same jars and only pays
the JVM start.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Coroutine, Iterable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from vitalproof.devstack import procs
from vitalproof.errors import ConfigError, StackError
from vitalproof.settings import Settings

KAFKA_VERSION = "3.9.1"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
MAX_HEAP_BYTES = 1024**3

JAVA_HINT = "apt-get install -y openjdk-17-jre-headless"
MVN_HINT = "apt-get install -y maven (or set VITALPROOF_KAFKA_LIBS to a folder of Kafka jars)"

T = TypeVar("T")


def kafka_dir(settings: Settings) -> Path:
    return settings.paths.stack_dir / "kafka"


def state_path(settings: Settings) -> Path:
    return kafka_dir(settings) / "state.json"


def log_path(settings: Settings) -> Path:
    return kafka_dir(settings) / "logs" / "stdout.log"


def pom_text() -> str:
    """The pom that lists the broker's jars (package data, so an installed copy has it)."""
    return resources.files(__package__).joinpath("data/kafka-pom.xml").read_text()


def libs_dir(settings: Settings) -> Path:
    """Where the jars live: ``settings.devstack.kafka_libs`` or the per-user cache."""
    if settings.devstack.kafka_libs is not None:
        return settings.devstack.kafka_libs
    return Path.home() / ".cache" / "vitalproof" / f"kafka-{KAFKA_VERSION}" / "libs"


def _libs_present(libs: Path) -> bool:
    return libs.is_dir() and any(libs.glob("kafka_2.13-*.jar"))


def java_program() -> str:
    """``$JAVA_HOME/bin/java`` if set and present, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return procs.require_program("java", JAVA_HINT)


def check_prerequisites(settings: Settings) -> None:
    """Raise PrerequisiteMissing before anything starts (java; mvn only if jars are missing)."""
    java_program()
    if not _libs_present(libs_dir(settings)):
        procs.require_program("mvn", MVN_HINT)


def resolve_libs(settings: Settings) -> Path:
    """The broker's jar folder, resolved with Maven on first use.

    Resolves into a sibling temp folder and renames it, so an interrupted download never
    leaves a half-filled cache that later starts would trust.
    """
    libs = libs_dir(settings)
    if _libs_present(libs):
        return libs
    mvn = procs.require_program("mvn", MVN_HINT)
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = libs.parent / f".{libs.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Maven works beside its pom (target/): a copy in the cache, not the installed package.
    pom = libs.parent / "pom.xml"
    pom.write_text(pom_text())
    procs.run_checked(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
        ],
        what="mvn dependency:copy-dependencies (Kafka jars)",
        timeout=600,
    )
    if _libs_present(libs):  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, libs)
    return libs


def heap_arg(heap: str) -> str:
    """Validate ``settings.devstack.kafka_heap`` (e.g. ``768m``) and keep it at or under 1 GB."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", heap.strip())
    if not match:
        raise ConfigError(f"kafka_heap {heap!r} is not a JVM size like 768m")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    size = int(match.group(1)) * scale
    if size > MAX_HEAP_BYTES:
        raise ConfigError(f"kafka_heap {heap!r} exceeds 1 GB; the local broker needs far less")
    if size < 128 * 1024**2:
        raise ConfigError(f"kafka_heap {heap!r} is below 128m; the broker will not start")
    return heap.strip()


def _server_properties(settings: Settings) -> str:
    host, port = procs.split_address(settings.kafka.bootstrap)
    ctrl = settings.devstack.kafka_controller_port
    data = kafka_dir(settings) / "data"
    listeners = f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{ctrl}"
    advertised = f"PLAINTEXT://{host}:{port}"
    protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    proxied, proxy = (
        settings.devstack.kafka_proxied_port,
        settings.devstack.kafka_proxied_advertised_port,
    )
    if proxied is not None:
        # Kafka answers each listener's clients with that listener's advertised address: the
        # clients of this one reconnect to the proxy's port after bootstrap, not around it.
        listeners += f",PROXIED://{host}:{proxied}"
        advertised += f",PROXIED://{host}:{proxy or proxied}"
        protocols += ",PROXIED:PLAINTEXT"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{ctrl}",
        "listeners": listeners,
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": protocols,
        "log.dirs": str(data),
        "num.partitions": str(settings.kafka.partitions),
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        # Fewer internal partitions: faster first consumer-group join on a laptop.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.retention.hours": "168",
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _log4j_properties(settings: Settings) -> str:
    """Warnings and errors to a rolling file; only the lifecycle lines at INFO."""
    logfile = kafka_dir(settings) / "logs" / "server.log"
    return (
        "log4j.rootLogger=WARN, file\n"
        "log4j.appender.file=org.apache.log4j.RollingFileAppender\n"
        f"log4j.appender.file.File={logfile}\n"
        "log4j.appender.file.MaxFileSize=10MB\n"
        "log4j.appender.file.MaxBackupIndex=2\n"
        "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        "log4j.logger.kafka.server.KafkaRaftServer=INFO\n"
        "log4j.logger.kafka.server.BrokerServer=INFO\n"
        "log4j.logger.kafka.server.ControllerServer=INFO\n"
    )


def write_config(settings: Settings) -> tuple[Path, Path]:
    """(server.properties, log4j.properties), rewritten on every start from the settings."""
    base = kafka_dir(settings)
    (base / "logs").mkdir(parents=True, exist_ok=True)
    (base / "data").mkdir(parents=True, exist_ok=True)
    server = base / "server.properties"
    log4j = base / "log4j.properties"
    server.write_text(_server_properties(settings))
    log4j.write_text(_log4j_properties(settings))
    return server, log4j


def _jvm_args(settings: Settings, log4j: Path) -> list[str]:
    heap = heap_arg(settings.devstack.kafka_heap)
    return [
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}",
        f"-Dkafka.logs.dir={kafka_dir(settings) / 'logs'}",
    ]


def format_storage(settings: Settings, java: str, libs: Path, server: Path) -> None:
    """KRaft needs its log dir formatted with a cluster id once; later starts reuse it."""
    if (kafka_dir(settings) / "data" / "meta.properties").exists():
        return
    id_file = kafka_dir(settings) / "cluster.id"
    if not id_file.exists():
        id_file.write_text(_cluster_id())
    procs.run_checked(
        [
            java,
            "-Xmx256m",
            f"-Dlog4j.configuration=file:{server.parent / 'log4j.properties'}",
            "-cp",
            f"{libs}/*",
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            f"--cluster-id={id_file.read_text().strip()}",
            "-c",
            str(server),
        ],
        what="kafka.tools.StorageTool format",
        timeout=120,
    )


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 chars).

    One id in 64 starts with '-'; it is passed as ``--cluster-id=<id>`` so that the storage
    tool's argument parser never mistakes it for an option.
    """
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def start(settings: Settings) -> procs.ProcState:
    """Format (first time) and start the broker, returning once a metadata request succeeds."""
    java = java_program()
    libs = resolve_libs(settings)
    server, log4j = write_config(settings)
    format_storage(settings, java, libs, server)
    host, port = procs.split_address(settings.kafka.bootstrap)
    for p in (port, settings.devstack.kafka_controller_port, settings.devstack.kafka_proxied_port):
        if p is None:
            continue
        if procs.port_open(host, p):
            raise StackError(f"port {host}:{p} is already in use by another process (Kafka)")
    argv = [java, *_jvm_args(settings, log4j), "-cp", f"{libs}/*", "kafka.Kafka", str(server)]
    return procs.start_daemon(
        "Kafka",
        argv,
        log_path=log_path(settings),
        state_path=state_path(settings),
        address=settings.kafka.bootstrap,
        ready=lambda: metadata_ok(settings.kafka.bootstrap),
        cwd=kafka_dir(settings),
        timeout=READY_TIMEOUT_S,
        interval=0.3,
        failure_log=kafka_dir(settings) / "logs" / "server.log",
    )


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even if an event loop is running here.

    ``stack up`` is synchronous but may be called from async code (CLI, async tests); a
    private loop in a helper thread avoids "asyncio.run() cannot be called from a running
    event loop".
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=runner, name="vitalproof-kafka-admin")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _describe_cluster(bootstrap: str, timeout_s: float) -> dict[str, Any]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        return await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    finally:
        await admin.close()


def metadata_ok(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when the broker answers a metadata request and lists itself as a broker."""
    host, port = procs.split_address(bootstrap)
    if not procs.port_open(host, port):
        return False
    info = run_sync(_describe_cluster(bootstrap, timeout_s))
    return bool(info.get("brokers"))


#: Kafka's INVALID_REPLICATION_FACTOR: more replicas asked for than the cluster has brokers.
_INVALID_REPLICATION_FACTOR = 38


async def _ensure_topics(
    bootstrap: str,
    names: list[str],
    partitions: int,
    timeout_s: float,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int = 1,
    compacted: frozenset[str] = frozenset(),
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            # min.insync.replicas per topic, not left to the broker's default: acks=all then
            # means "on this many replicas" whatever the broker was started with.
            configs = {"min.insync.replicas": str(min_insync_replicas)}
            response = await admin.create_topics(
                [
                    NewTopic(
                        n,
                        num_partitions=partitions,
                        replication_factor=replication_factor,
                        topic_configs=configs
                        | ({"cleanup.policy": "compact"} if n in compacted else {}),
                    )
                    for n in missing
                ],
                timeout_ms=int(timeout_s * 1000),
            )
            for item in response.topic_errors:
                name, code = item[0], item[1]
                if code == _INVALID_REPLICATION_FACTOR:
                    raise StackError(
                        f"creating topic {name!r}: replication factor {replication_factor} "
                        f"needs at least {replication_factor} brokers at {bootstrap} "
                        "(VITALPROOF_KAFKA_REPLICATION_FACTOR)"
                    )
                if code not in (0, 36):  # 36 = TOPIC_ALREADY_EXISTS (a concurrent creator)
                    raise StackError(f"creating topic {name!r} failed with Kafka error {code}")
        # Wait until every partition has a leader, so producers never see
        # LEADER_NOT_AVAILABLE right after this returns.
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(names)
            ready = all(
                t.get("error_code", 0) == 0
                and t.get("partitions")
                and all(p.get("leader", -1) >= 0 for p in t["partitions"])
                for t in described
            )
            if ready:
                short = [
                    t["topic"]
                    for t in described
                    if min(len(p["replicas"]) for p in t["partitions"]) < replication_factor
                ]
                if short:
                    raise StackError(
                        f"topics {short} exist with fewer than {replication_factor} replicas "
                        "(created before VITALPROOF_KAFKA_REPLICATION_FACTOR was set?): add "
                        "replicas with kafka-reassign-partitions.sh, or delete and recreate them"
                    )
                return
            if time.monotonic() > deadline:
                raise StackError(f"topics {names} have no leader after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    *,
    timeout_s: float = 30.0,
    compacted: Iterable[str] = (),
) -> None:
    """Create the topics that do not exist yet and wait for their leaders.

    Each gets ``settings.kafka.replication_factor`` replicas and its
    ``min_insync_replicas`` as ``min.insync.replicas`` (1 and 1 on the local broker; 3 and 2
    on a cluster, docs/deploy.md); those named in ``compacted`` are log-compacted.

    Names are used as given: pass ``settings.kafka.topic_raw`` etc. so the test prefix applies.
    Existing topics are left alone, whatever their partition count.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    run_sync(
        _ensure_topics(
            settings.kafka.bootstrap,
            wanted,
            partitions or settings.kafka.partitions,
            timeout_s,
            replication_factor=settings.kafka.replication_factor,
            min_insync_replicas=settings.kafka.min_insync_replicas,
            compacted=frozenset(compacted),
        )
    )
