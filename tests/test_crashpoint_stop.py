"""``VITALPROOF_CRASH_AT=NAME:N:stop``: the process group freezes once, at that exact step,
and goes on where it was on SIGCONT (what the fencing drill relies on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vitalproof.crashpoints import parse_spec

CHILD = """
import sys
from vitalproof import crashpoints
crashpoints.arm("step:2:stop")
for i in range(4):
    crashpoints.crashpoint("step")
    print("passed", i, flush=True)
"""


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_stop_freezes_the_group_once_at_the_nth_call_and_resumes_there() -> None:
    assert parse_spec("step:2:stop") == ("step", 2)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while _state(proc.pid) != "T":
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the process never stopped"
            time.sleep(0.05)
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["passed", "0"]  # then frozen in call 2
        os.killpg(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert out.split("\n")[:3] == ["passed 1", "passed 2", "passed 3"]  # once only
    assert "vitalproof crashpoint step (2) stop" in err
