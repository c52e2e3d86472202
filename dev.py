#!/usr/bin/env python3
"""Set everything up and run the app or the tests: the README's two commands.

    python3 dev.py run     # create .venv, install, open the app on the built-in simulated scanner
    python3 dev.py test    # create .venv, install with test tools, run lint, types, contracts and tests
    python3 dev.py lock    # re-resolve every dependency in a scratch venv and rewrite constraints.txt

Needs only Python 3.11+. The virtual environment lives in ./.venv and is reused; it is (re)installed
when pyproject.toml changes. Extra arguments go to the app or to pytest:

    python3 dev.py run --modality fluoro
    python3 dev.py test -k igtl
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def _python(env_dir: Path) -> Path:
    """A virtual environment's interpreter (its scripts sit beside it)."""
    return (
        env_dir / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    )


PY = _python(VENV)
BIN = PY.parent
STAMP = VENV / ".guidance-installed"
# Known-good versions (pip constraints: they pin, they add nothing). See the file's header.
CONSTRAINTS = ROOT / "constraints.txt"

# torch is optional (extra "train"); the CPU wheel is pinned so pip never pulls a multi-GB CUDA build.
TORCH_CPU = "torch==2.13.0"


def _sh(*cmd: str | os.PathLike[str], check: bool = True, env: dict[str, str] | None = None) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=check, env=env).returncode


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs before we know the interpreter is new enough
        sys.exit(f"Python 3.11 or newer is needed (this is {sys.version.split()[0]})")
    if not PY.exists():
        print(f"Creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, upgrade_deps=False).create(VENV)
    pinned = CONSTRAINTS.read_bytes() if CONSTRAINTS.exists() else b""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + pinned + extras.encode()).hexdigest()
    have = STAMP.read_text().strip() if STAMP.exists() else ""
    if have != want:
        _sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        _sh(PY, "-m", "pip", "install", "--quiet", *_constraints(), "-e", f".[{extras}]" if extras else ".")
        STAMP.write_text(want)


def _constraints() -> list[str]:
    return ["-c", str(CONSTRAINTS)] if CONSTRAINTS.exists() else []


def want_torch() -> None:
    """Install the pinned CPU torch and the rest of the ``train`` extra (tqdm for ``guidance train``'s progress
    bar) when the tests should exercise the torch paths (CI, or asked). torch alone once left a venv where
    the tests passed and ``guidance train`` stopped at its first line on a missing tqdm."""
    if os.environ.get("GUIDANCE_WITH_TORCH", os.environ.get("CI", "")).lower() in {"1", "true", "yes"}:
        probe = subprocess.run([str(PY), "-c", "import torch, onnx, tqdm"], capture_output=True, check=False)
        if probe.returncode != 0:
            _sh(PY, "-m", "pip", "install", "--quiet", *_constraints(), TORCH_CPU)
            _sh(PY, "-m", "pip", "install", "--quiet", *_constraints(), "-e", ".[dev,train]")


def cmd_run(args: list[str]) -> int:
    ensure_venv("")
    return _sh(BIN / "guidance", "demo", *args, check=False)


def cmd_test(args: list[str]) -> int:
    ensure_venv("dev")
    want_torch()
    steps: list[tuple[str, list[str | os.PathLike[str]]]] = [
        ("ruff", [BIN / "ruff", "check", "."]),
        ("ruff format", [BIN / "ruff", "format", "--check", "."]),
        ("mypy", [BIN / "mypy"]),
        ("import contracts", [BIN / "lint-imports"]),
    ]
    failed = [name for name, cmd in steps if _sh(*cmd, check=False) != 0]
    env = dict(os.environ, QT_QPA_PLATFORM=os.environ.get("QT_QPA_PLATFORM", "offscreen"))
    rc = _sh(PY, "-m", "pytest", *args, check=False, env=env)
    if failed:
        print(f"FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return rc or 1
    return rc


def cmd_lock() -> int:
    """Resolve pyproject.toml afresh (app, tests and training) in a scratch venv; write what it installed.

    torch goes in first, pinned to the CPU wheel, so the ``train`` extra's ``torch>=`` is already met and
    pip never reaches for a CUDA build; it is left out of the file (dev.py pins it itself).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="guidance-lock-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=True, upgrade_deps=False).create(env_dir)
        py = _python(env_dir)
        _sh(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        _sh(py, "-m", "pip", "install", "--quiet", TORCH_CPU)
        _sh(py, "-m", "pip", "install", "--quiet", ".[dev,train]")
        frozen = subprocess.run(
            [str(py), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    header = (
        [ln for ln in CONSTRAINTS.read_text().splitlines() if ln.startswith("#")]
        if CONSTRAINTS.exists()
        else []
    )
    pins = sorted(
        (ln for ln in frozen if ln and not ln.lower().startswith(("torch==", "guidance", "-e "))),
        key=str.lower,
    )
    CONSTRAINTS.write_text("\n".join([*header, *pins]) + "\n")
    print(f"wrote {len(pins)} pins to {CONSTRAINTS.name}; now run: python3 dev.py test", flush=True)
    return 0


def main(argv: list[str]) -> int:
    commands = {"run": lambda: cmd_run(argv[1:]), "test": lambda: cmd_test(argv[1:]), "lock": cmd_lock}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
