"""Bounded memory: peak RSS of writing and of reading a store twice as large is about the same (it depends on
the shard size and the shuffle buffer, not on the corpus size). Each measurement runs in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "store_rss.py"


def measure(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_the_store(tmp_path):
    rows = 40_000  # 256 float32 per row: ~41 MB for 1x, ~82 MB for 2x; shards 2 MB, shuffle buffer 4 MB
    w1 = measure("write", tmp_path / "x1", rows)
    w2 = measure("write", tmp_path / "x2", 2 * rows)
    r1 = measure("read", tmp_path / "x1", 4096)
    r2 = measure("read", tmp_path / "x2", 4096)
    assert r1["rows"] == rows - rows % 512 and r2["rows"] == 2 * rows - (2 * rows) % 512
    grown_mib = (w2["bytes"] - w1["bytes"]) / 2**20
    assert grown_mib > 39
    for one, two in ((w1, w2), (r1, r2)):
        work1 = one["peak_rss_mib"] - one["base_rss_mib"]
        work2 = two["peak_rss_mib"] - two["base_rss_mib"]
        # the 2x store costs < 1/4 of its extra size in extra memory (a reader holding the store would
        # need +40 MB), and the work itself stays well under the store size
        assert work2 - work1 < grown_mib / 4, (one, two)
        assert work2 < 0.6 * w2["bytes"] / 2**20, (one, two)
