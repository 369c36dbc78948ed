"""SeaweedFS (Apache-2.0) as the local S3 server of ``stack up --s3``.

One ``weed server -s3`` process: a master, a volume server, a filer and the S3 gateway, on
127.0.0.1. Clients use only the S3 port (``VITALPROOF_S3_PORT``, default 18333); the other
six (master, volume, filer, each with its gRPC port) are internal and chosen free at every
start (the data and the filer's metadata are in the folder and survive restarts). Access is
by one identity (``-s3.config``), whose keys ``up`` generates once into the secrets folder as
``VITALPROOF_S3_ACCESS_KEY`` and ``VITALPROOF_S3_SECRET_KEY``, where every process's
settings find them; the lake's bucket is created at start.

The binary is built from the Go module proxy (``go``, no Docker, no prebuilt download):
:func:`build_weed`, run by ``vitalproof stack fetch --s3`` and ``make install``, into
``~/.cache/vitalproof/seaweedfs-<version>/weed``. Its go.mod has replace directives, so
``go install module@version`` refuses it; it is downloaded with ``go mod download`` and built
as the main module.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from vitalproof.devstack import procs
from vitalproof.durable import write_atomic, write_new
from vitalproof.errors import PrerequisiteMissing, StackError
from vitalproof.settings import LakeSettings, Settings

#: The SeaweedFS module version built (the one the Go module proxy serves here).
WEED_MODULE = "github.com/seaweedfs/seaweedfs"
WEED_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
READY_TIMEOUT_S = 60.0
#: SIGTERM, then SIGKILL after this: weed's filer spends ~15 s trying to flush its own system
#: log after the volume server stopped. Nothing is lost to the SIGKILL: the filer's leveldb
#: and the volumes are written with write(2) as requests complete (the page cache outlives
#: the process), so only a machine crash could lose more than it would anyway.
STOP_TIMEOUT_S = 3.0
GO_HINT = "install Go 1.24+ (https://go.dev/dl/), then `vitalproof stack fetch --s3`"
WEED_HINT = "run `vitalproof stack fetch --s3` (builds it with go) or set VITALPROOF_WEED"
#: Where Go is usually installed when it is not on PATH.
_GO_CANDIDATES = (Path("/usr/local/go/bin/go"), Path.home() / "go" / "bin" / "go")


def seaweed_dir(settings: Settings) -> Path:
    return settings.paths.stack_dir / "seaweedfs"


def state_path(settings: Settings) -> Path:
    return seaweed_dir(settings) / "state.json"


def log_path(settings: Settings) -> Path:
    return seaweed_dir(settings) / "weed.log"


def endpoint(settings: Settings) -> str:
    """The S3 endpoint URL of the local server (``VITALPROOF_S3_ENDPOINT`` for clients)."""
    return f"http://127.0.0.1:{settings.devstack.s3_port}"


def lake_uri(settings: Settings) -> str:
    """``VITALPROOF_LAKE`` for a lake in the local server's bucket."""
    return f"s3://{settings.devstack.s3_bucket}/lake"


def weed_path() -> Path:
    """Where :func:`build_weed` puts the binary (``VITALPROOF_WEED`` names another)."""
    named = os.environ.get("VITALPROOF_WEED")
    if named:
        return Path(named)
    return Path.home() / ".cache" / "vitalproof" / f"seaweedfs-{WEED_VERSION}" / "weed"


def find_weed() -> Path:
    path = weed_path()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PrerequisiteMissing(f"weed ({path})", WEED_HINT)
    return path


def find_go() -> str:
    found = shutil.which("go")
    if found:
        return found
    for candidate in _GO_CANDIDATES:
        if candidate.is_file():
            return str(candidate)
    raise PrerequisiteMissing("go", GO_HINT)


def build_weed(*, timeout_s: float = 1800.0) -> Path:
    """Build ``weed`` from the module proxy once; later calls return the cached binary.

    Built in a temp folder and renamed into place, so an interrupted build never leaves a
    binary that later starts would trust.
    """
    final = weed_path()
    if final.is_file():
        return final
    go = find_go()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".weed-build-", dir=final.parent) as tmp:
        info = json.loads(
            procs.run_checked(
                [go, "mod", "download", "-json", f"{WEED_MODULE}@{WEED_VERSION}"],
                what="go mod download (SeaweedFS)",
                timeout=timeout_s,
                cwd=Path(tmp),
            )
        )
        # The module cache is read-only; build a writable copy as the main module.
        src = Path(tmp) / "src"
        shutil.copytree(info["Dir"], src)
        for d, _dirs, _files in os.walk(src):
            os.chmod(d, 0o755)
        out = Path(tmp) / "weed"
        procs.run_checked(
            [go, "build", "-trimpath", "-o", str(out), "./weed"],
            what="go build (SeaweedFS weed)",
            timeout=timeout_s,
            cwd=src,
        )
        os.replace(out, final)
    return final


def credentials(settings: Settings) -> tuple[str, str]:
    """(access key, secret key) of the local server's one identity.

    Given settings win; otherwise both are generated once into the secrets folder (0600,
    named after their variables), where every process's :class:`LakeSettings` reads them.
    """
    lake = settings.lake
    if lake.s3_access_key is not None and lake.s3_secret_key is not None:
        return lake.s3_access_key.get_secret_value(), lake.s3_secret_key.get_secret_value()
    folder = settings.secrets_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = []
    for field, make in (
        ("s3_access_key", lambda: "vp" + secrets.token_hex(9)),
        ("s3_secret_key", lambda: secrets.token_urlsafe(30)),
    ):
        path = folder / LakeSettings.env_name(field)
        value = make()
        if not write_new(path, value.encode(), mode=0o600):
            value = path.read_text().strip()
        out.append(value)
    return out[0], out[1]


def s3_config(access_key: str, secret_key: str) -> str:
    """SeaweedFS's ``-s3.config``: one identity with every action (the pipeline's)."""
    return json.dumps(
        {
            "identities": [
                {
                    "name": "vitalproof",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        },
        indent=2,
    )


def healthy(settings: Settings) -> bool:
    """The S3 gateway answers (``/healthz``: 200 once it serves requests)."""
    try:
        with urllib.request.urlopen(f"{endpoint(settings)}/healthz", timeout=3.0) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def argv(settings: Settings, weed: Path, config: Path, ports: list[int]) -> list[str]:
    """The command line: every listener on 127.0.0.1, nothing phoning home."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = ports
    data = seaweed_dir(settings) / "data"
    return [
        str(weed),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",  # one node: no peers to drain writes to before stopping
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={settings.devstack.s3_port}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]


def create_bucket(settings: Settings, *, timeout_s: float = 30.0) -> None:
    """Create the lake's bucket (idempotent) and write one object into it, retrying while
    the filer settles: the first write waits for the master to grow the bucket's volumes
    (~5 s after a fresh start), and ``up`` should return when writes work."""
    import pyarrow.fs as pafs

    access, secret = credentials(settings)
    fs = pafs.S3FileSystem(
        access_key=access,
        secret_key=secret,
        region=settings.lake.s3_region,
        scheme="http",
        endpoint_override=f"127.0.0.1:{settings.devstack.s3_port}",
        allow_bucket_creation=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fs.create_dir(settings.devstack.s3_bucket)
            probe = f"{settings.devstack.s3_bucket}/.vitalproof-probe"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise StackError(
                    f"SeaweedFS on {endpoint(settings)}: cannot create bucket "
                    f"{settings.devstack.s3_bucket!r}: {e}"
                ) from e
            time.sleep(0.3)


def start(settings: Settings) -> procs.ProcState:
    """Start ``weed server -s3``; ready when S3 answers and the bucket exists."""
    weed = find_weed()
    port = settings.devstack.s3_port
    if procs.port_open("127.0.0.1", port):
        raise StackError(f"port 127.0.0.1:{port} is already in use by another process (S3)")
    folder = seaweed_dir(settings)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    config = folder / "s3.json"
    write_atomic(config, s3_config(*credentials(settings)).encode(), mode=0o600)
    ports = [p for p in procs.free_ports(8) if p != port][:7]
    cmd = argv(settings, weed, config, ports)
    state = procs.start_daemon(
        "seaweedfs",
        cmd,
        log_path=log_path(settings),
        state_path=state_path(settings),
        address=f"127.0.0.1:{port}",
        ready=lambda: healthy(settings),
        cwd=folder,
        timeout=READY_TIMEOUT_S,
        stop_timeout=STOP_TIMEOUT_S,
    )
    try:
        create_bucket(settings)
    except BaseException:
        procs.terminate(state.pid, timeout=STOP_TIMEOUT_S)
        state_path(settings).unlink(missing_ok=True)
        raise
    return state
