"""The README's two commands stay true: CI runs the test command exactly, the main command's subcommand exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from saescope.cli import app

ROOT = Path(__file__).resolve().parents[1]


def two_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_gives_exactly_two_commands():
    commands = two_commands()
    assert len(commands) == 2, commands
    assert all(c.startswith("bash scripts/setup.sh && ") for c in commands)


def test_ci_runs_the_readme_test_command_unchanged():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert two_commands()[1] == ci_lines[-1]
    assert "set -euo pipefail" in ci_lines     # a failing test fails CI
    assert "pytest" in two_commands()[1]


def test_main_command_names_a_real_subcommand():
    main = two_commands()[0].split("&&", 1)[1]
    argv = shlex.split(main)
    assert argv[0] == ".venv/bin/saescope"
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
