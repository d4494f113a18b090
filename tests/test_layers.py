"""The package's layers import downward only: the import-linter contract in pyproject.toml, checked on the package
as it is installed (``passes/`` and ``recipes/`` sit at the top of the repository but are ``monomod.passes`` and
``monomod.recipes``, so the linter reads an assembled copy of the tree)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _assembled(tmp_path: Path) -> Path:
    """The package laid out as pip installs it, sources only."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "monomod", tmp_path / "monomod", ignore=skip)
    shutil.copytree(ROOT / "passes", tmp_path / "monomod" / "passes", ignore=skip)
    shutil.copytree(ROOT / "recipes", tmp_path / "monomod" / "recipes", ignore=skip)
    return tmp_path


def _lint(where: Path) -> subprocess.CompletedProcess:
    linter = Path(sys.executable).with_name("lint-imports")
    assert linter.is_file(), "import-linter is missing: pip install -e '.[dev]'"
    return subprocess.run([str(linter), "--no-cache", str(ROOT / "pyproject.toml")], cwd=where,
                          capture_output=True, text=True, timeout=300)


def test_layers_import_downward_only(tmp_path):
    result = _lint(_assembled(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a pass that imports the runtime is caught."""
    where = _assembled(tmp_path)
    trace = where / "monomod" / "passes" / "trace.py"
    trace.write_text(trace.read_text() + "\nfrom monomod.runtime import train as _upward  # noqa\n")
    result = _lint(where)
    assert result.returncode != 0
    assert "monomod.passes is not allowed to import monomod.runtime" in result.stdout
