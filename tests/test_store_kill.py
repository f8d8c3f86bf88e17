"""Crash safety: SIGKILL a real caching process at many moments (mid-chunk, just before and just after an
atomic rename), re-run the same command, and get exactly the store an uninterrupted run writes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from kill_helpers import run_and_kill
from store_synthetic import expected_rows, produce, read_store_with_safetensors

from saescope.store import StoreIndex, verify_store

HERE = Path(__file__).parent
N_CHUNKS, SHARD_ROWS = 120, 64


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_until(out: Path, trigger: str, occurrence: int, pause: bool = True) -> bool:
    """Start the synthetic producer; SIGKILL it at the ``occurrence``-th line starting with ``trigger``.

    Returns False when the process finished before reaching that line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    seen = [0]

    def reached(line: str) -> bool:
        seen[0] += line.startswith(trigger)
        return seen[0] == occurrence and line.startswith(trigger)

    return run_and_kill([sys.executable, str(HERE / "store_synthetic.py"), str(out), str(N_CHUNKS),
                         str(SHARD_ROWS), "bfloat16", "pause" if pause else "-"], env, reached)


@pytest.mark.parametrize("kills", [
    [("chunk", 17), ("chunk", 40), ("chunk", 3)],                       # between chunks / mid-buffer
    [("before-replace", 2), ("before-replace", 7), ("before-replace", 5)],  # temp file written, not renamed
    [("replaced", 1), ("replaced", 4), ("replaced", 3), ("replaced", 8)],   # shard renamed, index not yet
])
def test_sigkill_then_rerun_gives_the_uninterrupted_store(tmp_path, kills):
    reference = tmp_path / "ref"
    produce(reference, N_CHUNKS, SHARD_ROWS, "bfloat16")
    out = tmp_path / "killed"
    killed_mid_run = 0
    for trigger, occurrence in kills:
        if run_until(out, trigger, occurrence):
            killed_mid_run += 1
            assert not StoreIndex.load(out).complete
    assert killed_mid_run == len(kills)
    assert not run_until(out, "never", 1, pause=False)  # the same command again, to the end
    assert tree(out) == tree(reference)
    # no row lost, none duplicated: the content equals the chunks in order
    got = read_store_with_safetensors(out)
    want = expected_rows(N_CHUNKS, torch.bfloat16)
    for key, value in want.items():
        assert torch.equal(got[key].to(value.dtype), value), key
    verify_store(out)
