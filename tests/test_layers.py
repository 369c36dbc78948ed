"""The import contracts (pyproject.toml, run by `make lint`) really catch a wrong-way import.

The contracts are checked on a copy of the packages, once as they are (kept) and once with
one import added that runs against the layers (broken, naming the file and line), so a
contract that silently checks nothing, or checks the installed copy instead of the code,
fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["vitalproof", "clinic", "ingest", "streams", "anchor", "device_sims"]

# Runs lint-imports on the packages under the current directory, not on the editable
# installs of this checkout (their finders would resolve the package names first).
RUNNER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, ".")
for name in [m for m in sys.modules if m.split(".")[0] in {names!r}]:
    del sys.modules[name]
from importlinter.cli import lint_imports
sys.exit(lint_imports(no_cache=True))
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "verifier" / "vitalproof_verify",
        tmp_path / "vitalproof_verify",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    names = [*PACKAGES, "vitalproof_verify"]
    return subprocess.run(
        [sys.executable, "-c", RUNNER.format(names=names)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _append(path: Path, line: str) -> int:
    text = path.read_text()
    path.write_text(text + ("" if text.endswith("\n") else "\n") + line + "\n")
    return len(path.read_text().splitlines())


@pytest.mark.parametrize(
    ("module", "imported", "why"),
    [
        ("anchor/log.py", "streams.sealer", "a stage importing another stage"),
        ("vitalproof/schema.py", "ingest.gatt.parsers", "the core importing a stage"),
        ("vitalproof_verify/merkle.py", "vitalproof.settings", "the kit importing the core"),
        ("vitalproof/devstack/kafka.py", "vitalproof.cli.main", "the dev stack importing the CLI"),
        ("vitalproof_verify/leaves.py", "pyarrow", "the kit importing a pipeline dependency"),
    ],
)
def test_a_wrong_way_import_breaks_the_contracts(
    tree: Path, module: str, imported: str, why: str
) -> None:
    line = _append(tree / module, f"import {imported}  # noqa")
    out = _lint(tree)
    assert out.returncode != 0, f"{why} was not caught:\n{out.stdout}"
    dotted = module.removesuffix(".py").replace("/", ".")
    assert f"{dotted} -> {imported} (l.{line})" in out.stdout, out.stdout


def test_the_contracts_hold_on_the_code_as_it_is(tree: Path) -> None:
    out = _lint(tree)
    assert out.returncode == 0, out.stdout
    assert "0 broken" in out.stdout and "BROKEN" not in out.stdout


def test_a_new_core_module_must_be_placed_in_a_layer(tree: Path) -> None:
    """The inner contract is exhaustive: a module nobody placed is an error, not a free pass."""
    (tree / "vitalproof" / "newcomer.py").write_text("X = 1\n")
    out = _lint(tree)
    assert out.returncode != 0
    assert "vitalproof.newcomer" in out.stdout
