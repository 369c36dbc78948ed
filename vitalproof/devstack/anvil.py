"""Anvil (Foundry's dev chain, from npm ``@foundry-rs/anvil``) as the local "real node".

Only started when the chain is ``anvil``. Its chain persists in the state folder
(``stack/anvil/chain-state.json``, written every few seconds and when Anvil stops), so
`vitalproof stack down` and `stack up` bring back the same chain: its contract, blocks,
receipts and anchors, which is what lets a proof exported after a demo be checked against
the chain later. Delete that file for a fresh chain (each test session has its own folder).
"""

from __future__ import annotations

import json
import platform
import shutil
import urllib.request
from pathlib import Path

from vitalproof.devstack import procs
from vitalproof.errors import PrerequisiteMissing, StackError
from vitalproof.settings import Settings

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
ANVIL_HINT = "run `npm ci` in the repo root (npm package @foundry-rs/anvil), or install Foundry"
NODE_HINT = "apt-get install -y nodejs (Node 20+), then `npm ci` in the repo root"


def anvil_dir(settings: Settings) -> Path:
    return settings.paths.stack_dir / "anvil"


def state_path(settings: Settings) -> Path:
    return anvil_dir(settings) / "state.json"


def chain_state_path(settings: Settings) -> Path:
    """Anvil's own dump of the chain (``--state``), beside our record of its process."""
    return anvil_dir(settings) / "chain-state.json"


#: Seconds between Anvil's dumps of the chain: a SIGKILL loses at most this much of it.
STATE_INTERVAL_S = 2


def log_path(settings: Settings) -> Path:
    return anvil_dir(settings) / "anvil.log"


def rpc_url(settings: Settings) -> str:
    """HTTP JSON-RPC endpoint of the local Anvil."""
    return f"http://127.0.0.1:{settings.devstack.anvil_port}"


def _node_modules() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo / "node_modules", Path.cwd() / "node_modules"]
    return list(dict.fromkeys(c for c in candidates if c.is_dir()))


def find_anvil() -> list[str]:
    """argv prefix that runs anvil.

    Prefers the native binary npm installed for this platform (no Node process in between,
    so the pid we record is anvil itself), then the npm wrapper, then Foundry's ``anvil``.
    """
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    wrapper: Path | None = None
    for nm in _node_modules():
        native = nm / "@foundry-rs" / f"anvil-linux-{arch}" / "bin" / "anvil"
        if arch and native.is_file():
            return [str(native)]
        if (nm / ".bin" / "anvil").exists():
            wrapper = nm / ".bin" / "anvil"
    if wrapper is not None:
        node = procs.require_program("node", NODE_HINT)
        return [node, str(wrapper.resolve())]
    found = shutil.which("anvil")
    if found:
        return [found]
    raise PrerequisiteMissing("anvil", ANVIL_HINT)


def chain_id(url: str, timeout: float = 2.0) -> int:
    """eth_chainId over HTTP; raises OSError/ValueError when anvil is not answering."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    return int(reply["result"], 16)


def healthy(settings: Settings) -> bool:
    try:
        chain_id(rpc_url(settings), timeout=3.0)
    except (OSError, ValueError, KeyError):
        return False
    return True


def start(settings: Settings) -> procs.ProcState:
    """Start anvil on 127.0.0.1:anvil_port; ready when eth_chainId answers."""
    argv = [
        *find_anvil(),
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.devstack.anvil_port),
        "--silent",
        "--state",
        str(chain_state_path(settings)),
        "--state-interval",
        str(STATE_INTERVAL_S),
    ]
    if procs.port_open("127.0.0.1", settings.devstack.anvil_port):
        raise StackError(
            f"port 127.0.0.1:{settings.devstack.anvil_port} is already in use by another "
            "process (Anvil)"
        )
    return procs.start_daemon(
        "anvil",
        argv,
        log_path=log_path(settings),
        state_path=state_path(settings),
        address=f"127.0.0.1:{settings.devstack.anvil_port}",
        ready=lambda: healthy(settings),
        cwd=anvil_dir(settings),
        timeout=READY_TIMEOUT_S,
        interval=0.1,
        stop_timeout=2,
    )
