"""Shared fixtures: the REAL local stack, started once per test session.

* ``stack_settings`` (session): a Settings with free random ports and a tmp home; nothing
  started yet.
* ``stack`` (session): a :class:`StackManager` whose Kafka (KRaft) and Mosquitto are up;
  ``stack.settings`` are the session settings. Stopped at session end.
* ``anvil`` (session, lazy): Anvil started only when a test asks for it; yields its
  :class:`PartStatus`. ``anvil_rpc_url`` (session) is its ``http://127.0.0.1:<port>``.
* ``settings`` (function): the session's ports and broker state (``stack_dir`` is a symlink
  to the session's, so enrolling device credentials works) but its own ``home`` for
  lake/keys/anchor/registry and a unique ``topic_prefix``.
* ``anvil_settings`` (function): ``settings`` with ``chain='anvil'`` and ``rpc_url`` set.
* ``kafka_topics`` (function): ``settings`` after creating its four pipeline topics.
* ``seaweedfs`` (session, lazy): the real SeaweedFS (``weed server -s3``) on free ports with
  its bucket; yields Settings whose lake group points at it (``VITALPROOF_LAKE`` an
  ``s3://`` prefix, endpoint and keys). ``s3_settings`` (function): ``settings`` with that
  lake group, so the namespace's lake is on S3 under its own topic prefix.
* ``lake_root`` (function, params ``local`` and ``s3``): an empty lake root, a folder in
  ``tmp_path`` or an own prefix on the session's SeaweedFS (a :class:`LakeRoot`).
* ``browser`` (module) and ``page`` (function): Debian's chromium under Playwright, a tab
  that may reach only 127.0.0.1 (tests/web.py).

A service that cannot start FAILS the tests that need it, loudly, with its log tail. There
is no skip and no in-memory stand-in: these fixtures exist so tests hit real brokers.
"""

from __future__ import annotations

import atexit
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from streams.lake.storage import LakeRoot, open_lake
from tests.s3 import s3_lake
from vitalproof.devstack import PartStatus, StackManager, StackStatus, ensure_topics, seaweedfs
from vitalproof.devstack.manager import PartName
from vitalproof.devstack.procs import free_ports
from vitalproof.errors import VitalproofError
from vitalproof.settings import (
    ChainSettings,
    DevStackSettings,
    KafkaSettings,
    LakeSettings,
    MqttSettings,
    PathSettings,
    Settings,
)

pytest_plugins = ["tests.web"]

# Startup durations measured by the fixtures, printed in the terminal summary.
_TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Session settings: tmp home, free ports on 127.0.0.1, fixed collector password."""
    home = tmp_path_factory.mktemp("vitalproof-home")
    kafka_port, controller_port, mqtt_port, anvil_port = free_ports(4)
    return Settings(
        paths=PathSettings(home=home),
        kafka=KafkaSettings(bootstrap=f"127.0.0.1:{kafka_port}", topic_prefix=""),
        devstack=DevStackSettings(kafka_controller_port=controller_port, anvil_port=anvil_port),
        mqtt=MqttSettings(
            host="127.0.0.1",
            port=mqtt_port,
            collector_password=SecretStr(secrets.token_urlsafe(18)),
        ),
        chain=ChainSettings(kind="embedded"),
    )


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Iterator[StackManager]:
    """Real Kafka + Mosquitto for the whole session; fails (never skips) if they can't start."""
    manager = StackManager(stack_settings)
    atexit.register(_down_quietly, manager)  # also on an interrupted session
    t0 = time.monotonic()
    try:
        status = manager.up(chain="embedded")
    except VitalproofError as exc:
        _down_quietly(manager)
        pytest.fail(f"local stack failed to start: {exc}", pytrace=False)
    _TIMINGS["stack up (kafka+mosquitto)"] = time.monotonic() - t0
    status = _settle(manager, status)
    if not status.healthy:
        _down_quietly(manager)
        pytest.fail(f"local stack started but is not healthy:\n{status.to_json()}", pytrace=False)
    yield manager
    manager.down()


@pytest.fixture(scope="session")
def anvil(stack_settings: Settings) -> Iterator[PartStatus]:
    """Anvil on the session's anvil_port, started on first use; fails if it can't start."""
    manager = StackManager(stack_settings)
    atexit.register(_stop_anvil_quietly, manager)
    t0 = time.monotonic()
    try:
        status = manager.start("anvil")
    except VitalproofError as exc:
        _stop_anvil_quietly(manager)
        pytest.fail(f"anvil failed to start: {exc}", pytrace=False)
    _TIMINGS["anvil start"] = time.monotonic() - t0
    if not status.healthy:
        _stop_anvil_quietly(manager)
        pytest.fail(f"anvil started but does not answer: {status}", pytrace=False)
    yield status
    manager.stop("anvil")


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The real SeaweedFS for the session, started on first use; fails if it can't start."""
    home = tmp_path_factory.mktemp("seaweedfs-home")
    (s3_port,) = free_ports(1)
    own = Settings(
        paths=PathSettings(home=home),
        devstack=DevStackSettings(s3_port=s3_port),
        lake=LakeSettings(),
    )
    manager = StackManager(own)
    atexit.register(_stop_quietly, manager, "seaweedfs")
    t0 = time.monotonic()
    try:
        status = manager.start("seaweedfs")
    except VitalproofError as exc:
        _stop_quietly(manager, "seaweedfs")
        pytest.fail(f"seaweedfs failed to start: {exc}", pytrace=False)
    _TIMINGS["seaweedfs start"] = time.monotonic() - t0
    if not status.healthy:
        _stop_quietly(manager, "seaweedfs")
        pytest.fail(f"seaweedfs started but does not answer: {status}", pytrace=False)
    access, secret = seaweedfs.credentials(own)
    yield own.evolve(
        lake={
            "root": seaweedfs.lake_uri(own),
            "s3_endpoint": seaweedfs.endpoint(own),
            "s3_access_key": access,
            "s3_secret_key": secret,
        }
    )
    manager.stop("seaweedfs")


@pytest.fixture(scope="session")
def seaweedfs_lake(seaweedfs_server: Settings) -> LakeSettings:
    """The lake group that points at the session's SeaweedFS."""
    return seaweedfs_server.lake


@pytest.fixture
def s3_settings(settings: Settings, seaweedfs_lake: LakeSettings) -> Settings:
    """``settings`` whose lake is on the session's SeaweedFS, under its own prefix."""
    return settings.evolve(lake=s3_lake(seaweedfs_lake).model_dump())


@pytest.fixture(params=["local", "s3"])
def lake_root(request: pytest.FixtureRequest, tmp_path: Path) -> Path | LakeRoot:
    """An empty lake: a local folder, or an own prefix in the session's SeaweedFS bucket."""
    if request.param == "local":
        return tmp_path / "lake"
    lake = s3_lake(request.getfixturevalue("seaweedfs_lake"))
    return open_lake(Settings(paths=PathSettings(home=tmp_path / "home"), lake=lake))


@pytest.fixture(scope="session")
def anvil_rpc_url(anvil: PartStatus, stack_settings: Settings) -> str:
    """``http://127.0.0.1:<port>`` of the session's Anvil."""
    return StackManager(stack_settings).rpc_url


@pytest.fixture
def settings(stack: StackManager, tmp_path: Path) -> Settings:
    """Per-test settings on the running session stack.

    Own home (lake, keys, anchor state, registry) and topic prefix, so tests never see each
    other's data; ``home/stack`` links to the session's stack folder so device credentials
    enrolled through these settings reach the running Mosquitto.
    """
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack").symlink_to(stack.settings.paths.stack_dir, target_is_directory=True)
    tag = uuid.uuid4().hex[:12]
    # Own topics, own collector client id (derived from the gateway id) and own shared
    # subscription group: no test inherits another's persistent MQTT session.
    return stack.settings.evolve(
        paths={"home": home},
        kafka={"topic_prefix": f"t{tag}."},
        gateway={"id": f"gw-{tag}"},
        mqtt={"share_group": f"collectors-{tag}"},
    )


@pytest.fixture
def anvil_settings(settings: Settings, anvil_rpc_url: str) -> Settings:
    """``settings`` pointed at the session's Anvil."""
    return settings.evolve(chain={"kind": "anvil", "rpc_url": anvil_rpc_url})


@pytest.fixture
def kafka_topics(settings: Settings) -> Settings:
    """``settings`` whose raw/clean/dlq/batches topics exist with leaders elected."""
    ensure_topics(settings, settings.kafka.pipeline_topics, settings.kafka.partitions)
    return settings


def _settle(manager: StackManager, status: StackStatus, seconds: float = 10.0) -> StackStatus:
    """Re-ask a loaded machine for a few seconds before calling a started stack unhealthy."""
    deadline = time.monotonic() + seconds
    while not status.healthy and time.monotonic() < deadline:
        time.sleep(0.5)
        status = manager.status()
    return status


def _down_quietly(manager: StackManager) -> None:
    try:
        manager.down()
    except Exception as exc:  # best effort on the failure path; the original error wins
        print(f"vitalproof stack down failed: {exc}")


def _stop_anvil_quietly(manager: StackManager) -> None:
    _stop_quietly(manager, "anvil")


def _stop_quietly(manager: StackManager, part: PartName) -> None:
    try:
        manager.stop(part)
    except Exception as exc:
        print(f"vitalproof stop {part} failed: {exc}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"vitalproof: {what} took {seconds:.1f} s")


#: Fixtures that start a real service: a test using any of them (directly or through another
#: fixture) is an integration test, whether or not it says so; ``make test-unit`` leaves it out.
_SERVICE_FIXTURES = {
    "stack",
    "settings",
    "kafka_topics",
    "anvil",
    "anvil_rpc_url",
    "anvil_settings",
    "seaweedfs_server",
    "seaweedfs_lake",
    "s3_settings",
    "browser",
    "page",
}
_BROWSER_FIXTURES = {"browser", "page"}
_ANVIL_FIXTURES = {"anvil", "anvil_rpc_url", "anvil_settings"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "s3" in callspec.params.values():
            used.add("seaweedfs_lake")  # a lake on S3: the fixture requests it lazily
        if used & _SERVICE_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if used & _ANVIL_FIXTURES:
            item.add_marker(pytest.mark.anvil)
        if used & _BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
