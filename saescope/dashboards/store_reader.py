"""Read an activation store *in order* (unshuffled), block by block, with bounded memory.

The training loader (:class:`saescope.store.ActivationLoader`) shuffles; dashboards need rows in store
order so that a row's neighbours are the tokens around it in its document (the writer stores rows in
document/position order). This module reads row blocks of one site straight from the shard files (one
``readinto`` per shard run, no mmap) and the per-row token metadata, which is small (16 bytes a row).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saescope.errors import SaescopeError
from saescope.store.index import TOKENS_FOLDER, StoreIndex
from saescope.store.shards import STORAGE_DTYPES, read_layout, read_rows_into


@dataclass
class TokenTable:
    """Token id, document id and position of every row of a store (row ``r`` of the store is index ``r``)."""

    token_ids: np.ndarray  # int64 [rows]
    document_ids: np.ndarray  # int64 [rows]
    positions: np.ndarray  # int64 [rows]

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def window(self, row: int, before: int, after: int) -> tuple[int, int]:
        """``[lo, hi)`` rows around ``row`` in the same document with consecutive positions."""
        n = len(self)
        doc, pos = self.document_ids[row], self.positions[row]
        lo = row
        while lo > 0 and row - lo < before and self.document_ids[lo - 1] == doc \
                and self.positions[lo - 1] == pos - (row - lo + 1):
            lo -= 1
        hi = row + 1
        while hi < n and hi - row - 1 < after and self.document_ids[hi] == doc \
                and self.positions[hi] == pos + (hi - row):
            hi += 1
        return lo, hi


def open_store(path: str | Path, site: str) -> StoreIndex:
    """Load a complete store's index and check it holds ``site``."""
    index = StoreIndex.load(path)
    if not index.complete:
        raise SaescopeError(f"the activation store at {path} is unfinished ({index.rows} rows so far); run the "
                            "same `saescope cache` command again to finish it")
    if site not in index.sites:
        raise SaescopeError(f"site {site!r} is not in the store at {path}; it holds {', '.join(index.sites)}")
    return index


def read_token_table(path: str | Path) -> TokenTable:
    """Every row's token id, document id and position, in store order."""
    root = Path(path)
    index = StoreIndex.load(root)
    parts: dict[str, list[np.ndarray]] = {"token_ids": [], "document_ids": [], "positions": []}
    for shard in index.shards:
        rel = shard.files[TOKENS_FOLDER].path
        layout = read_layout(root / rel)
        with open(root / rel, "rb", buffering=0) as handle:
            for name, chunks in parts.items():
                out = torch.empty(shard.rows, dtype=layout[name].dtype)
                read_rows_into(handle, layout[name], 0, shard.rows, out)
                chunks.append(out.numpy().astype(np.int64))
    cat = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in parts.items()}
    return TokenTable(**cat)


def iter_site_rows(path: str | Path, site: str, block_rows: int = 2048,
                   max_rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, activations[n, d] float32)`` blocks of ``site`` in store order.

    Memory is one block (``block_rows × d``) whatever the store size. ``max_rows`` stops early.
    """
    if block_rows < 1:
        raise SaescopeError(f"block_rows must be at least 1, got {block_rows}")
    root = Path(path)
    index = open_store(root, site)
    d = index.sites[site].d
    dtype = STORAGE_DTYPES[index.dtype]
    total = index.rows if max_rows is None else min(index.rows, int(max_rows))
    row = 0
    for shard in index.shards:
        if row >= total:
            return
        rel = shard.files[site].path
        layout = read_layout(root / rel)["activations"]
        if layout.shape != (shard.rows, d):
            raise SaescopeError(f"{root / rel}: holds {list(layout.shape)}, the index says [{shard.rows}, {d}]")
        with open(root / rel, "rb", buffering=0) as handle:
            for a in range(0, shard.rows, block_rows):
                b = min(shard.rows, a + block_rows, a + total - row)
                if b <= a:
                    return
                buf = torch.empty((b - a, d), dtype=dtype)
                read_rows_into(handle, layout, a, b, buf)
                yield row, buf.to(torch.float32)
                row += b - a
