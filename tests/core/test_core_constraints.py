"""constraints.txt (the known-good versions dev.py installs) agrees with pyproject.toml.

A pin that falls outside a requirement's specifier makes pip fail to resolve on a fresh machine, which is
the README's first command failing; a requirement without a pin floats, which is what the file is there
to stop. Both are caught here, before CI's clean install would meet them.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
#: Extras dev.py installs (the gpu extra is not installable from PyPI mirrors; torch is pinned in dev.py).
INSTALLED_EXTRAS = ("dev", "train")
PINNED_ELSEWHERE = {"torch"}


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for raw in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: {raw!r} is not an exact pin (name==version)"
        key = canonicalize_name(name)
        assert key not in out, f"constraints.txt pins {name} twice"
        out[key] = Version(version)
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in INSTALLED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def pinned_here() -> list[Requirement]:
    return [r for r in requirements() if canonicalize_name(r.name) not in PINNED_ELSEWHERE]


@pytest.mark.parametrize("req", pinned_here(), ids=str)
def test_every_requirement_is_pinned_within_its_specifier(req: Requirement) -> None:
    name = canonicalize_name(req.name)
    have = pins()
    assert name in have, f"{req.name} has no pin in constraints.txt: run `python3 dev.py lock`"
    assert req.specifier.contains(have[name], prereleases=True), (
        f"constraints.txt pins {req.name}=={have[name]}, outside pyproject's {req.specifier}"
    )


def test_torch_is_pinned_once_in_dev_py_and_meets_the_train_extra() -> None:
    assert not PINNED_ELSEWHERE & set(pins()), "torch is pinned once, in dev.py (the CPU wheel)"
    tree = ast.parse((REPO / "dev.py").read_text(encoding="utf-8"))
    (value,) = (
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["TORCH_CPU"]
    )
    pinned = Requirement(ast.literal_eval(value))
    (version,) = (Version(s.version) for s in pinned.specifier)
    (train,) = (r for r in requirements() if canonicalize_name(r.name) == "torch")
    assert train.specifier.contains(version), f"dev.py pins {pinned}, outside the train extra's {train}"
