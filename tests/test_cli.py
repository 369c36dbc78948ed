"""The CLI as people use it: settings from the environment, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from vitalproof.settings import (
    SECRETS_DIR_VAR,
    ChainSettings,
    MqttSettings,
    PathSettings,
    Settings,
    settings_table,
)


def vp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitalproof", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | (env or {}),
    )


def test_relative_home_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons run in their own folders: a relative state path must not reach them."""
    monkeypatch.chdir(tmp_path)
    s = Settings(paths=PathSettings(home=Path(".vitalproof")))
    assert s.paths.home == tmp_path / ".vitalproof"
    assert s.paths.home.is_absolute() and s.paths.stack_dir.is_absolute()
    env = s.child_env(tmp_path / "secrets")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir("/")
    assert Settings() == s


def test_child_processes_get_secrets_in_files_not_in_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A started process's environment is readable in /proc and printed by ps e; its
    secrets go to 0600 files in a 0700 folder, read back by the child's Settings()."""
    s = Settings(
        mqtt=MqttSettings(collector_password=SecretStr("collector-secret")),
        chain=ChainSettings(submitter_key=SecretStr("0x" + "ab" * 32)),
    )
    folder = tmp_path / "secrets"
    env = s.child_env(folder)
    assert not any("collector-secret" in v or "ab" * 32 in v for v in env.values())
    assert "VITALPROOF_MQTT_COLLECTOR_PASSWORD" not in env
    assert env[SECRETS_DIR_VAR] == str(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    files = {f.name: f for f in folder.iterdir()}
    assert set(files) == {"VITALPROOF_MQTT_COLLECTOR_PASSWORD", "VITALPROOF_SUBMITTER_KEY"}
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files.values())
    for name in ("VITALPROOF_MQTT_COLLECTOR_PASSWORD", "VITALPROOF_SUBMITTER_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child.mqtt.collector_password is not None
    assert child.mqtt.collector_password.get_secret_value() == "collector-secret"
    assert child.chain.submitter_key is not None
    assert child.chain.submitter_key.get_secret_value() == "0x" + "ab" * 32


def test_ble_decode_prints_readings() -> None:
    out = vp("ble", "decode", "2a37", "16480304")  # contact detected, 72 /min, one RR
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    metrics = {r["metric"]: r for r in doc["readings"]}
    assert metrics["heart_rate"]["value"] == 72 and metrics["heart_rate"]["unit"] == "/min"
    assert metrics["rr_interval"]["unit"] == "ms"
    assert abs(metrics["rr_interval"]["value"] - 0x0403 * 1000 / 1024) < 1e-9


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("2a37", "1648030"), "byte"),  # odd hex digits
        (("2a37", "1048"), "truncated"),  # RR flag set, no RR bytes
        (("2aff", "00"), "2aff"),  # not a characteristic we know
    ],
)
def test_ble_decode_errors_are_one_line_exit_2(args: tuple[str, str], needle: str) -> None:
    out = vp("ble", "decode", *args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error:")
    assert needle in out.stderr


def test_verify_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    out = vp("verify", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_missing_prerequisite_is_reported_in_one_line(tmp_path: Path) -> None:
    out = vp("stack", "up", env={"PATH": str(tmp_path), "VITALPROOF_HOME": str(tmp_path / "h")})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, out.stderr
    assert "not found" in out.stderr and "install" in out.stderr


def test_docs_list_every_setting_as_the_code_defines_it() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    assert doc.endswith(settings_table()), "regenerate docs/settings.md's table"


def test_every_command_and_option_says_what_it_is_for() -> None:
    """`--help` everywhere: each command has a one-line summary, each option a help text."""
    import argparse

    from vitalproof.cli.main import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                summaries = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not summaries.get(name):
                        missing.append(f"{path} {name} (no summary)")
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "vitalproof")
    assert missing == []


def test_a_bad_gateway_id_is_one_line_exit_2() -> None:
    out = vp("collect", "--gateway-id", "no spaces/here")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: --gateway-id 'no spaces/here'")


def test_min_isr_above_the_replication_factor_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {
        "VITALPROOF_HOME": str(tmp_path),
        "VITALPROOF_KAFKA_REPLICATION_FACTOR": "1",
        "VITALPROOF_KAFKA_MIN_INSYNC_REPLICAS": "2",
    }
    out = vp("stack", "status", env=env)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "VITALPROOF_KAFKA_MIN_INSYNC_REPLICAS (2) exceeds" in out.stderr


def test_leave_with_a_time_limit_is_refused() -> None:
    """Ending a session that is not drained would discard what the broker holds for it."""
    out = vp("collect", "--leave", "--duration", "1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--leave runs until the session is drained" in out.stderr
