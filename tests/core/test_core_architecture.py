"""The layering contracts and the CLI surface, checked in the suite itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is part of the dev extra"
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_core_imports_without_qt() -> None:
    code = (
        "import sys, guidance.session, guidance.cli, streaming, engines.registry;"
        "bad=[m for m in sys.modules if m.split('.')[0] in {'PySide6','pyqtgraph','ui'}];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize(
    "argv", [["--help"], ["demo", "--help"], ["bench", "pipeline", "--help"], ["--version"]]
)
def test_cli_entry_points_answer(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "guidance", *argv], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
