"""The README's 5-minute tour, run as printed, in order, on the embedded Gemma 3 270M with fewer tokens.

Each command of the tour's bash block is run by bash in a fresh folder with ``saescope`` on the PATH. Only
budgets are changed: ``--max-tokens``/``--total-tokens``/``--tokens``/``--width`` get small values (and the width's
folder label with them), ``evaluate`` gets a few short windows, ``scope`` two layers (the first and the last)
instead of all, one evaluation window and a smaller shuffle buffer, and ``browse`` — a server that runs until stopped — gets
a free port, answers a typed text with HTTP 200, and is stopped. Everything else (paths, flags, the order, no
``--model`` after ``train --store``) is the README's own text.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from saescope.formats.gemma_scope import width_name

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"--max-tokens": "12288", "--total-tokens": "8192",   # 2 steps of the default batch of 4096
          "--tokens": "12288"}                                  # scope: 12 steps of its batch of 1024
WIDTH = 512


def tour_commands(readme: str) -> list[str]:
    """The tour's commands: the bash block under '## A 5-minute tour', continuation lines joined, comments
    dropped, ``a && b`` split into two commands."""
    section = readme[readme.index("## A 5-minute tour"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def small_budget(command: str, port: int) -> str:
    for flag, value in TOKENS.items():
        command = re.sub(rf"{flag} \d+", f"{flag} {value}", command)
    command = re.sub(r"--width (\d+)", f"--width {WIDTH}", command)
    command = re.sub(r"width_\d+[km]?/", f"width_{width_name(WIDTH)}/", command)
    words = shlex.split(command)
    if words[:2] == ["saescope", "evaluate"]:
        command += " --windows 2 --context-len 128"
    if words[:2] == ["saescope", "scope"]:
        command = command.replace("--layers all", "--layers 0,17") + " --eval-windows 1 --buffer-rows 4096"
    if words[:2] == ["saescope", "browse"]:
        command += f" --port {port}"
    return command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=120) as resp:
        return resp.status, resp.read().decode()


def _browse_and_type(command: str, cwd: Path, env: dict, port: int) -> None:
    server = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                status, index = _get(base + "/")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"browse did not start: {server.stdout.read().decode()}") from None
                time.sleep(0.5)
        assert status == 200 and "/sae/0" in index
        status, page = _get(base + "/sae/0/analyze?text=" + urllib.parse.quote("To be, or not to be"))
        assert status == 200 and "<table id='tokens'>" in page
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_commands_are_parsed_from_the_readme():
    commands = tour_commands((ROOT / "README.md").read_text())
    assert [shlex.split(c)[1] for c in commands] == ["sites", "cache", "train", "train", "train", "evaluate",
                                                     "report", "dashboards", "browse", "steer", "export", "scope"]
    assert not any("..." in c for c in commands)                 # nothing a newcomer would have to fill in
    assert not any("--model" in c for c in commands[2:])         # the store's model is recorded


@pytest.mark.integration
def test_readme_tour_runs_as_typed(tmp_path):
    commands = tour_commands((ROOT / "README.md").read_text())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    port = _free_port()
    for command in commands:
        command = small_budget(command, port)
        if command.startswith("saescope browse"):
            _browse_and_type(command, tmp_path, env, port)
            continue
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    suite = tmp_path / "runs" / "x" / "suite" / "resid_post" / "layer_6" / f"width_{width_name(WIDTH)}"
    assert len(list(suite.glob("average_l0_*"))) == 2
    assert (tmp_path / "runs" / "x" / "eval" / "table.json").is_file()
    assert (tmp_path / "runs" / "x" / "report" / "index.html").is_file()
    assert (tmp_path / "runs" / "tc" / "suite" / "transcoder" / "layer_6").is_dir()
    assert any((tmp_path / "release").rglob("params.safetensors"))
    scope = tmp_path / "runs" / "scope"
    assert not list(scope.rglob("*.npy")) and not (scope / "activations").exists()       # streamed: no store
    for layer in (0, 17):
        assert any((scope / "release" / "resid_post_all").glob(f"layer_{layer}_width_*_l0_small"))
        assert any((scope / "release" / "transcoder_all").glob(f"layer_{layer}_width_*_l0_big"))
