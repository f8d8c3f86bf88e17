"""Kill a real process at a chosen line of its output (SIGKILL: no handler, no clean-up) — the resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Sequence


def run_and_kill(args: Sequence[str], env: dict[str, str], kill_on: Callable[[str], bool]) -> bool:
    """Run ``args``; SIGKILL the process at the first line of its stdout for which ``kill_on(line)`` holds.

    Returns True when it was killed, False when it finished first (then its exit status must be 0)."""
    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if kill_on(line):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, f"{args[1:]} exited with {proc.returncode}"
    return False
