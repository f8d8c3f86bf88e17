"""Installs are reproducible: scripts/setup.sh installs the exact versions in requirements-pinned.txt (the ones
the suite last passed with), and those versions satisfy pyproject.toml's lower bounds."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "requirements-pinned.txt"


def pins() -> dict[str, Version]:
    out = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements-pinned.txt: {line!r} is not an exact pin (name==version)"
        out[canonicalize_name(name)] = Version(version)
    return out


def test_every_pip_install_in_setup_uses_the_pins():
    lines = [ln for ln in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
             if re.search(r"\$PIP install", ln) and "--upgrade pip" not in ln]
    assert lines, "setup.sh installs nothing?"
    assert 'PINS="-c requirements-pinned.txt"' in (ROOT / "scripts" / "setup.sh").read_text()
    for ln in lines:
        assert "$PINS" in ln, f"setup.sh installs without the pinned versions: {ln.strip()}"


def test_the_readme_names_the_pins_file():
    assert "requirements-pinned.txt" in (ROOT / "README.md").read_text()


def test_pins_satisfy_pyproject_and_cover_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("embedded", "dev"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pinned = pins()
    env = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is a dependency but has no pin in requirements-pinned.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"pin {req.name}=={pinned[name]} violates pyproject's {req}")


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the environment scripts/setup.sh built (.venv); this is another one")
def test_setup_installed_exactly_the_pins():
    """Run in the venv setup.sh made (as CI does): every installed distribution is pinned, at its pin."""
    pinned = pins()
    wrong, unpinned = [], []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("saescope", "pip", "setuptools", "wheel"):
            continue
        version = Version(dist.version)
        if name not in pinned:
            unpinned.append(f"{name}=={version}")
        elif Version(version.public) != pinned[name]:
            wrong.append(f"{name}: installed {version}, pinned {pinned[name]}")
    assert not wrong, f"installed versions differ from requirements-pinned.txt: {wrong}"
    assert not unpinned, f"installed but not pinned (add them: bash scripts/upgrade_pins.sh): {unpinned}"
