"""Synthetic producer for the activation-store tests (imported by them, and run as a subprocess to be killed).

Chunk ``c`` is a pure function of ``c``: a random number of rows (0..39, so some chunks are empty) of two
sites, with token ids, document id ``c`` and positions. Usage as a script::

    python store_synthetic.py OUT N_CHUNKS SHARD_ROWS DTYPE [pause]

prints ``chunk <c>`` after each chunk; with ``pause`` it also sleeps a little per chunk and prints
``replaced <file>`` / ``before-replace <file>`` around every atomic rename, sleeping there too, so that a
parent can SIGKILL it at those exact moments.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

SITES = {"resid_post/layer_1": 12, "mlp_out/layer_1": 5}


def chunk(c: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + c)
    n = int(torch.randint(0, 40, (1,), generator=g))
    acts = {"resid_post/layer_1": torch.randn(n, 12, generator=g) * 3 + 1,
            "mlp_out/layer_1": torch.randn(n, 5, generator=g) * 0.5}
    meta = {"token_ids": torch.randint(0, 50_000, (n,), generator=g),
            "document_ids": torch.full((n,), c, dtype=torch.int64),
            "positions": torch.arange(1, n + 1)}
    return acts, meta


def expected_rows(n_chunks: int, dtype: torch.dtype = torch.float32, max_rows: int | None = None):
    """Everything the store must hold, concatenated in order (the reference for every content check)."""
    parts = [chunk(c) for c in range(n_chunks)]
    out = {s: torch.cat([a[s] for a, _ in parts]).to(dtype) for s in SITES}
    out.update({k: torch.cat([m[k] for _, m in parts]) for k in ("token_ids", "document_ids", "positions")})
    if max_rows is not None:
        out = {k: v[:max_rows] for k, v in out.items()}
    return out


def read_store_with_safetensors(root: Path) -> dict[str, torch.Tensor]:
    """Read a whole store with the safetensors library (independent of saescope's reader)."""
    import json

    index = json.loads((Path(root) / "index.json").read_text())
    out: dict[str, list[torch.Tensor]] = {}
    for shard in index["shards"]:
        for name, entry in shard["files"].items():
            with safe_open(str(Path(root) / entry["path"]), framework="pt") as f:
                for key in f.keys():
                    out.setdefault(name if key == "activations" else key, []).append(f.get_tensor(key))
    return {k: torch.cat(v) for k, v in out.items()}


def produce(out, n_chunks: int, shard_rows: int, dtype: str = "float32", max_rows: int | None = None,
            pause: bool = False):
    from saescope.store import StoreWriter

    writer = StoreWriter(out, SITES, dtype=dtype, shard_rows=shard_rows, model="synthetic", context_len=64,
                         settings={"text": "synthetic"}, max_rows=max_rows)
    for c in range(writer.chunks_done, n_chunks):
        if writer.done:
            break
        acts, meta = chunk(c)
        writer.add(acts, **meta)
        print(f"chunk {c}", flush=True)
        if pause:
            time.sleep(0.002)
    return writer.close()


def _pause_around_renames() -> None:
    from saescope.store import shards

    real = shards.os.replace

    def replace(src, dst):
        print(f"before-replace {dst}", flush=True)
        time.sleep(0.01)
        real(src, dst)
        print(f"replaced {dst}", flush=True)
        time.sleep(0.01)

    shards.os.replace = replace


if __name__ == "__main__":
    out, n_chunks, shard_rows, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    pause = len(sys.argv) > 5 and sys.argv[5] == "pause"
    if pause:
        _pause_around_renames()
    produce(out, n_chunks, shard_rows, dtype, pause=pause)
    print("done", flush=True)
