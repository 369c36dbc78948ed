"""Configuration: small frozen groups, each read from ``VITALPROOF_*`` environment variables.

Each component takes the group (or groups) it needs, not the whole :class:`Settings`: the MQTT
collector its :class:`MqttSettings` and :class:`KafkaSettings`, the sealer its
:class:`BatchSettings`, the anchor job its :class:`ChainSettings`, and so on. :class:`Settings`
holds one of each and the few facts derived from several (the namespace's folders).

Defaults are the local stack's (everything on 127.0.0.1, state under ``./.vitalproof``);
compose.yaml and the tests set the same fields through the environment or the constructors.
The environment variable of a field is ``VITALPROOF_`` + its group's prefix + its name, as
docs/settings.md lists (``VITALPROOF_KAFKA_BOOTSTRAP``, ``VITALPROOF_BATCH_MAX_AGE_S``);
the few whose names predate the groups keep them (``VITALPROOF_TOPIC_PREFIX``,
``VITALPROOF_PARTITIONS``, ``VITALPROOF_CHAIN``).

Secrets (:class:`~pydantic.SecretStr` fields) may also come from files: a folder holding one
file per secret, named after its variable (what Docker and Kubernetes secrets mount), named
by ``VITALPROOF_SECRETS_DIR`` or, by default, ``<home>/secrets`` (where ``vitalproof stack up``
puts the collector password it generates). That is also how the processes we start get
theirs (:meth:`Settings.child_env`): never through their environment, which other users of
the machine can read in ``/proc`` and which crash reports and ``ps e`` print.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from vitalproof.durable import write_atomic
from vitalproof.errors import ConfigError

__all__ = [
    "SECRETS_DIR_VAR",
    "BatchSettings",
    "ChainKind",
    "ChainSettings",
    "DedupeSettings",
    "DevStackSettings",
    "GatewaySettings",
    "KafkaSettings",
    "LakeSettings",
    "MqttSettings",
    "PathSettings",
    "RuntimeSettings",
    "Settings",
]

ChainKind = Literal["embedded", "anvil", "rpc"]
Compression = Literal["none", "lz4", "zstd", "snappy", "gzip"]
#: Names the folder of secret files (one file per secret, named after its variable).
SECRETS_DIR_VAR = "VITALPROOF_SECRETS_DIR"

G = TypeVar("G", bound="_Group")


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="ignore", populate_by_name=True)


class _Group(BaseSettings):
    """One group: read from the environment (and the secrets folder) when constructed."""

    @classmethod
    def from_env(cls: type[G], secrets_dir: Path | None = None) -> G:
        """Read from the environment, and secrets also from files in ``secrets_dir``.

        A value that does not parse is a :class:`ConfigError` naming its variable.
        """
        try:
            if secrets_dir is None or not secrets_dir.is_dir():
                return cls()
            # _secrets_dir is pydantic-settings' init option, not a field (unknown to mypy)
            return cls(_secrets_dir=secrets_dir)  # type: ignore[call-arg]
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            if field in cls.model_fields:
                where = cls.env_name(field)
            else:  # a field read under its own variable name (validation_alias)
                where = field.upper() if field.upper().startswith("VITALPROOF_") else cls.__name__
            raise ConfigError(
                f"setting {where}: {first['msg']} (got {first.get('input')!r})"
            ) from None

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable (and secret file) a field is read from."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, str):
            return alias
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    def env_items(self) -> list[tuple[str, Any]]:
        """``(variable, value)`` of every field that is set, the way this group reads them."""
        return [
            (self.env_name(name), getattr(self, name))
            for name in type(self).model_fields
            if getattr(self, name) is not None
        ]


class PathSettings(_Group):
    model_config = _config("VITALPROOF_")

    home: Path = Field(default=Path(".vitalproof"), description="state folder: stack, keys, lake")

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # The daemons we start run in their own folders; a relative state path would point
        # somewhere else for them.
        return home.expanduser().resolve()

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def registry_path(self) -> Path:
        return self.home / "registry.sqlite3"

    @property
    def consent_path(self) -> Path:
        """The consent registry (:mod:`clinic.consent_store`)."""
        return self.home / "clinic" / "consent.sqlite3"

    @property
    def audit_path(self) -> Path:
        """The clinician service's audit log (clinic.audit), one for the whole home."""
        return self.home / "clinic" / "audit.sqlite3"


class KafkaSettings(_Group):
    """The cluster, the record compression, and the namespace's topics."""

    model_config = _config("VITALPROOF_KAFKA_")

    bootstrap: str = Field(default="127.0.0.1:19092", description="host:port of a broker")
    compression: Compression = Field(
        default="zstd",
        # zstd (level 3, as aiokafka sets it) compresses ~5x faster than aiokafka's lz4 at
        # its level 9, and smaller
        description="codec of the record batches the collectors and the worker produce",
    )
    topic_prefix: str = Field(
        default="",
        validation_alias="VITALPROOF_TOPIC_PREFIX",
        description="prepended to every topic; names the namespace (tests isolate with it)",
    )
    partitions: int = Field(
        default=4,
        gt=0,
        validation_alias="VITALPROOF_PARTITIONS",
        description="partitions of the topics the pipeline creates",
    )
    replication_factor: int = Field(
        default=1,
        gt=0,
        description="replicas of every topic the pipeline creates: 1 on the one local broker, "
        "3 on a cluster (docs/deploy.md)",
    )
    min_insync_replicas: int = Field(
        default=1,
        gt=0,
        description="min.insync.replicas of those topics: an acks=all produce fails unless "
        "this many replicas have it (2 of 3 on a cluster: one broker may be down)",
    )

    @model_validator(mode="after")
    def _isr_within_replicas(self) -> KafkaSettings:
        # min ISR above the replica count would refuse every acks=all produce
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"VITALPROOF_KAFKA_MIN_INSYNC_REPLICAS ({self.min_insync_replicas}) exceeds "
                f"VITALPROOF_KAFKA_REPLICATION_FACTOR ({self.replication_factor})"
            )
        return self

    @property
    def compression_type(self) -> str | None:
        """:attr:`compression` as aiokafka and Faust take it (``None``: uncompressed)."""
        return None if self.compression == "none" else self.compression

    @property
    def port(self) -> int:
        return int(self.bootstrap.rsplit(":", 1)[1])

    @property
    def namespace(self) -> str:
        """Topics, lake and anchor log belong together: the topic prefix names all three."""
        return self.topic_prefix.strip(".") or "default"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def topic_raw(self) -> str:
        return self.topic("vitals.raw")

    @property
    def topic_clean(self) -> str:
        return self.topic("vitals.clean")

    @property
    def topic_dlq(self) -> str:
        return self.topic("vitals.dlq")

    @property
    def topic_batches(self) -> str:
        return self.topic("vitals.batches")

    @property
    def topic_events(self) -> str:
        """Sequence gaps, device resets and clock jumps found by normalization."""
        return self.topic("vitals.events")

    @property
    def topic_dedupe(self) -> str:
        """The normalizer's memory of seen reading ids (compacted; Faust declares it too)."""
        return self.topic("vitals.dedupe")

    @property
    def pipeline_topics(self) -> list[str]:
        """Every topic the pipeline uses, for whoever creates them up front."""
        return [
            self.topic_raw,
            self.topic_clean,
            self.topic_dlq,
            self.topic_batches,
            self.topic_events,
        ]


class MqttSettings(_Group):
    """The broker the devices publish to, as the collector sees it."""

    model_config = _config("VITALPROOF_MQTT_")

    host: str = Field(default="127.0.0.1", description="the broker devices publish to")
    port: int = 11883
    collector_user: str = Field(default="collector", description="the collector's login")
    collector_password: SecretStr | None = Field(
        default=None,
        description="or the file VITALPROOF_MQTT_COLLECTOR_PASSWORD in the secrets folder, "
        "where `stack up` generates one for the local broker",
    )
    tls_ca: Path | None = Field(
        default=None, description="CA bundle the collector verifies the broker's certificate with"
    )
    share_group: str = Field(
        default="collectors",
        description="collectors in one group share $share/<group>/...; empty: one collector"
        " subscribes plainly (a Mosquitto crash then loses nothing: 2.0 forgets shared ones)",
    )


class GatewaySettings(_Group):
    model_config = _config("VITALPROOF_GATEWAY_")

    id: str = Field(
        default="gw-local",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="names this collector in every record and in its MQTT client id "
        "(vitalproof-collector-<id>): one per collector, the same across its restarts",
    )


class ChainSettings(_Group):
    """Where anchors go, and who signs them."""

    model_config = _config("VITALPROOF_")

    kind: ChainKind = Field(
        default="embedded",
        validation_alias="VITALPROOF_CHAIN",
        description="embedded (py-evm in process), anvil (the local stack's) or rpc",
    )
    rpc_url: str | None = Field(default=None, description="JSON-RPC endpoint of the chain")
    submitter_key: SecretStr | None = Field(
        default=None, description="hex private key of the anchor submitter; dev key on local chains"
    )
    submitter_keystore: Path | None = Field(
        default=None, description="encrypted (Web3 Secret Storage) keystore file of the submitter"
    )
    submitter_keystore_password: SecretStr | None = Field(
        default=None, description="the keystore's password"
    )
    anchor_period_s: float = Field(
        default=10.0, gt=0, description="seconds between anchor transactions (if the log grew)"
    )


class BatchSettings(_Group):
    """When the sealer closes a batch: whichever limit is reached first."""

    model_config = _config("VITALPROOF_BATCH_")

    max_rows: int = Field(default=50_000, gt=0, description="seal when a batch holds this many")
    max_messages: int = Field(default=5_000, gt=0, description="... or this many Kafka messages")
    max_age_s: float = Field(
        default=5.0, gt=0, description="... or when its first message is this old"
    )


class DedupeSettings(_Group):
    model_config = _config("VITALPROOF_DEDUPE_")

    retain_windows: int = Field(
        default=5, gt=0, description="normalize drops ids seen in this many one-minute windows"
    )
    max_ids: int = Field(
        default=4_000_000,
        gt=0,
        description="... but holds at most this many ids (~17 bytes each): past it the oldest "
        "window is evicted early and older retransmissions reach the sealer's memory",
    )


class LakeSettings(_Group):
    """Where the lake is: a local folder (the default) or an S3 bucket, and how to reach it.

    Only the lake (the Parquet files and ``_batches``) moves to S3; the keystore, the anchor
    log, the registry and the clinic's SQLite stay in the state folder.
    """

    model_config = _config("VITALPROOF_")

    root: str | None = Field(
        default=None,
        validation_alias="VITALPROOF_LAKE",
        description="the lake: a folder or s3://bucket/prefix, each namespace below it "
        "(default `<home>/lake`)",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL, e.g. http://127.0.0.1:18333 (SeaweedFS of `stack up "
        "--s3`); default AWS's",
    )
    s3_region: str = Field(default="us-east-1", description="S3 region")
    s3_access_key: SecretStr | None = Field(
        default=None, description="S3 access key id (else AWS's usual environment and files)"
    )
    s3_secret_key: SecretStr | None = Field(default=None, description="S3 secret access key")

    @field_validator("root", mode="after")
    @classmethod
    def _known_root(cls, root: str | None) -> str | None:
        if root is None or root == "":
            return None
        if "://" in root:
            scheme, rest = root.split("://", 1)
            if scheme != "s3" or not rest.strip("/"):
                raise ValueError("a lake URI is s3://bucket[/prefix]; other schemes are not served")
            return "s3://" + rest.strip("/")
        return str(Path(root).expanduser().resolve())

    @property
    def remote(self) -> bool:
        """The lake is in an object store, not a local folder."""
        return self.root is not None and self.root.startswith("s3://")


class DevStackSettings(_Group):
    """The local stack's own knobs (vitalproof.devstack); nothing in the pipeline reads them."""

    model_config = _config("VITALPROOF_")

    kafka_controller_port: int = Field(default=19093, description="local broker: KRaft port")
    kafka_heap: str = Field(default="768m", description="local broker: JVM heap (at most 1g)")
    kafka_libs: Path | None = Field(
        default=None, description="a folder of Kafka jars to use instead of resolving them"
    )
    kafka_proxied_port: int | None = Field(
        default=None,
        description="local broker: also listen on this port, advertised as the next setting's:"
        " a TCP proxy there forwarding here sits in its clients' path (the partition-kafka drill)",
    )
    kafka_proxied_advertised_port: int | None = Field(
        default=None, description="local broker: the port that listener advertises (the proxy's)"
    )
    anvil_port: int = Field(default=18545, description="local Anvil: JSON-RPC port")
    s3_port: int = Field(default=18333, description="local SeaweedFS (`stack up --s3`): S3 port")
    s3_bucket: str = Field(default="vitalproof", description="local SeaweedFS: the lake's bucket")
    mqtt_tls_listener_port: int | None = Field(
        default=None,
        description="local broker: also listen with TLS on this port (needs the two files below)",
    )
    mqtt_autosave_changes: int = Field(
        default=0,
        ge=0,
        description="local broker: save its state after this many changes (1: a SIGKILL loses"
        " nothing, at ~1/10 of the throughput); 0: every 60 s",
    )
    mqtt_tls_certfile: Path | None = Field(default=None, description="local broker: TLS cert")
    mqtt_tls_keyfile: Path | None = Field(default=None, description="local broker: TLS key")

    @property
    def anvil_url(self) -> str:
        return f"http://127.0.0.1:{self.anvil_port}"


class RuntimeSettings(_Group):
    """Switches for benchmarks and crash tests, applied once by the process's entry point,
    and how long-running parts wait out an unreachable dependency (:mod:`vitalproof.retry`)."""

    model_config = _config("VITALPROOF_")

    native: bool = Field(
        default=True, description="hash with the Rust extension when installed (A/B: off)"
    )
    crash_at: str | None = Field(
        default=None,
        description="crash tests: SIGKILL at this crash point (NAME, NAME:N; NAME:N:stop: SIGSTOP)",
    )
    retry_min_s: float = Field(
        default=1.0,
        gt=0,
        description="waiting out an unreachable Kafka (collector), chain (anchor job) or a full"
        " lake disk (worker): the first pause between tries, doubled after each failure",
    )
    retry_max_s: float = Field(
        default=30.0, gt=0, description="... up to this many seconds between tries"
    )


def _group(cls: type[G]) -> Any:
    # Never used when Settings is validated (the validator below fills every group first);
    # a default keeps the constructor's signature honest: every group is optional.
    return Field(default_factory=cls.from_env)


class Settings(BaseModel):
    """One of each group, and what is derived from several of them."""

    model_config = ConfigDict(frozen=True)

    paths: PathSettings = _group(PathSettings)
    kafka: KafkaSettings = _group(KafkaSettings)
    mqtt: MqttSettings = _group(MqttSettings)
    gateway: GatewaySettings = _group(GatewaySettings)
    chain: ChainSettings = _group(ChainSettings)
    batching: BatchSettings = _group(BatchSettings)
    dedupe: DedupeSettings = _group(DedupeSettings)
    lake: LakeSettings = _group(LakeSettings)
    devstack: DevStackSettings = _group(DevStackSettings)
    runtime: RuntimeSettings = _group(RuntimeSettings)

    @model_validator(mode="before")
    @classmethod
    def _read_missing_groups(cls, data: Any) -> Any:
        """Groups not given are read from the environment, their secrets also from the
        secrets folder (``VITALPROOF_SECRETS_DIR``, else ``<home>/secrets`` of these paths)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        paths = data.get("paths")
        if paths is None:
            paths = data["paths"] = PathSettings.from_env()
        elif isinstance(paths, dict):
            paths = data["paths"] = PathSettings.model_validate(paths)
        named = os.environ.get(SECRETS_DIR_VAR)
        folder = Path(named) if named else paths.home / "secrets"
        for name, info in cls.model_fields.items():
            if name not in data and isinstance(info.annotation, type):
                data[name] = info.annotation.from_env(folder)
        return data

    @classmethod
    def groups(cls) -> list[type[_Group]]:
        """The group classes, in field order."""
        return [f.annotation for f in cls.model_fields.values() if isinstance(f.annotation, type)]

    def evolve(self, **groups: dict[str, Any]) -> Settings:
        """A copy with some fields of some groups replaced, validated:
        ``settings.evolve(kafka={"topic_prefix": "t1."}, batching={"max_age_s": 1.0})``."""
        update: dict[str, Any] = {}
        for name, fields in groups.items():
            group = getattr(self, name)
            update[name] = type(group).model_validate(group.model_dump() | fields)
        return self.model_copy(update=update)

    # -- derived from several groups --------------------------------------------------------

    @property
    def namespace(self) -> str:
        return self.kafka.namespace

    @property
    def lake_dir(self) -> Path:
        """The namespace's lake in the state folder (where it is unless ``VITALPROOF_LAKE``
        names another place: see :attr:`lake_uri`)."""
        return self.paths.home / "lake" / self.namespace

    @property
    def lake_base(self) -> str:
        """The folder or ``s3://`` URI holding every namespace's lake."""
        return self.lake.root or str(self.paths.home / "lake")

    @property
    def lake_uri(self) -> str:
        """This namespace's lake: a local folder or ``s3://bucket/prefix/<namespace>``
        (``streams.lake.storage.open_lake`` opens it)."""
        return f"{self.lake_base}/{self.namespace}"

    @property
    def anchor_dir(self) -> Path:
        return self.paths.home / "anchor" / self.namespace

    @property
    def secrets_dir(self) -> Path:
        """Where secret files are read from (and where `stack up` writes the ones it makes)."""
        named = os.environ.get(SECRETS_DIR_VAR)
        return Path(named) if named else self.paths.home / "secrets"

    # -- handing settings to a process we start -------------------------------------------

    def child_env(self, secrets_dir: Path) -> dict[str, str]:
        """These settings as ``VITALPROOF_*`` variables for a process we start.

        Secrets do not go into the environment: each is written to ``secrets_dir`` (created
        0700, files 0600, named after the variable) and the child is told the folder through
        ``VITALPROOF_SECRETS_DIR``. The caller removes the folder when the child is done.
        """
        env: dict[str, str] = {}
        secrets: dict[str, str] = {}
        for name in type(self).model_fields:
            group: _Group = getattr(self, name)
            for var, value in group.env_items():
                if isinstance(value, SecretStr):
                    secrets[var] = value.get_secret_value()
                elif isinstance(value, Path):
                    env[var] = str(value.resolve())
                elif isinstance(value, bool):
                    env[var] = "1" if value else "0"
                else:
                    env[var] = str(value)
        if secrets:
            secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(secrets_dir, 0o700)
            for var, value in secrets.items():
                write_atomic(secrets_dir / var, value.encode(), mode=0o600)
            env[SECRETS_DIR_VAR] = str(secrets_dir.resolve())
        return env


def settings_table() -> str:
    """Every setting as a Markdown table (docs/settings.md is this, checked by a test)."""
    rows = ["| variable | setting | default | what |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        group = info.annotation
        assert isinstance(group, type) and issubclass(group, _Group)
        for field, spec in group.model_fields.items():
            default = spec.get_default(call_default_factory=True)
            shown = "" if default is None else "(empty)" if default == "" else f"`{default}`"
            what = (spec.description or "").replace("|", "\\|")
            rows.append(f"| `{group.env_name(field)}` | `{name}.{field}` | {shown} | {what} |")
    return "\n".join(rows) + "\n"
