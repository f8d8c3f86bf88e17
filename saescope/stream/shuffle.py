"""A bounded, resumable block shuffle over a stream of token rows (the streaming counterpart of the store loader).

A *chunk producer* yields, in a fixed order, one :class:`Chunk` per token window: the window's training rows of
every site (BOS, EOS and padding already dropped), with each row's document and position. Started at window
``w`` it yields the chunks of windows ``w, w + 1, …`` — identical to those an uninterrupted producer yields there.

The rows of the stream, in order, are cut into *blocks* of ``block_rows`` rows (``buffer_rows`` rounded down to
whole batches, at least one batch), so a window may straddle two blocks. Block ``b`` is held in memory (one
buffer for all sites, so a transcoder's input and target rows stay in lockstep), permuted with
``numpy.random.default_rng([seed, b])`` and served as ``block_rows / batch_size`` batches. Memory: ``block_rows ×
Σ_sites d × 4`` bytes for the buffer (:attr:`BlockShuffle.buffer_bytes`), plus one forward pass.

Resume (:meth:`BlockShuffle.state_dict`): the position is the block number, the batches of it already served,
and where the block starts and ends in the stream (window, rows of that window before it). Loading it restarts
the producer at the block's first window, refills the same block and skips the batches already served; the
buffer itself is not saved (a block of 18 sites × 65,536 rows × 640 floats would be 3 GB). So every row is
served exactly once over any sequence of interruptions, the cost of a resume is at most one block of forward
passes, and the rows are bitwise those of an uninterrupted run whenever the producer is deterministic (the same
model, dtype, device and thread count computing the same forward-pass groups; see
:class:`saescope.stream.source.ModelChunks`).

The stream ends when the producer does or after ``max_rows`` rows; the last block may then be short, and its
rows after the last whole batch are never served (``drop_last``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from saescope.errors import SaescopeError


class Chunk(NamedTuple):
    """The training rows of one window: ``rows[site_id] [n, d]``; ``document_ids`` / ``positions`` ``[n]``."""

    window: int
    rows: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    document_ids: torch.Tensor
    positions: torch.Tensor


ChunkProducer = Callable[[int], Iterator[Chunk]]
"""``producer(start_window)`` → the chunks of windows ``start_window, start_window + 1, …`` in order."""


class BlockShuffle:
    """Iterate ``{site_id: Tensor[batch_size, d]}`` batches from ``producer`` through a block shuffle buffer.

    ``identity``: JSON-able facts that define the stream (model, text, context length, …); a saved position is
    only loaded into a source with the same identity and settings. ``trace``: a JSON-lines file to which every
    served batch appends ``{"batch": k, "window": [...], "document": [...], "position": [...]}`` (an audit of what was trained on;
    used by the resume tests). ``shuffle=False`` serves each block in stream order.
    """

    ORDER = 1

    def __init__(self, producer: ChunkProducer, sites: list[str], batch_size: int, *, buffer_rows: int = 65536,
                 seed: int = 0, shuffle: bool = True, max_rows: int | None = None,
                 identity: dict[str, Any] | None = None, trace: str | Path | None = None):
        if batch_size < 1:
            raise SaescopeError(f"batch_size must be at least 1, got {batch_size}")
        if buffer_rows < 1:
            raise SaescopeError(f"the shuffle buffer must hold at least 1 row, got {buffer_rows}")
        if max_rows is not None and max_rows < batch_size:
            raise SaescopeError(f"max_rows {max_rows} is less than one batch of {batch_size} rows")
        if not sites:
            raise SaescopeError("choose at least one site to stream")
        self.producer = producer
        self.sites = list(sites)
        self.batch_size = int(batch_size)
        self.block_rows = max(1, int(buffer_rows) // self.batch_size) * self.batch_size
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.max_rows = None if max_rows is None else int(max_rows)
        self.identity = dict(identity or {})
        self.trace = None if trace is None else Path(trace)
        self._block = 0            # the block being served
        self._batch = 0            # batches of it already served
        self._start = (0, 0)       # (window, rows of that window before the block)
        self._end: tuple[int, int] | None = None    # where the block ends, once it is filled
        self._filled = 0           # rows in the buffer for the current block (0: not filled)
        self._buffer: dict[str, torch.Tensor] = {}
        self._meta: dict[str, torch.Tensor] = {}
        self._chunks: Iterator[Chunk] | None = None  # the producer, continued across blocks
        self._carry: tuple[Chunk, int] | None = None  # a chunk partly used by the previous block
        self.finished = False
        self.windows_read = 0      # producer chunks consumed this session (forward passes done)

    # -- facts ------------------------------------------------------------------------------------------
    @property
    def batches_per_block(self) -> int:
        return self.block_rows // self.batch_size

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the shuffle buffer (0 until the first block is filled)."""
        return sum(t.numel() * t.element_size() for t in self._buffer.values())

    def _settings(self) -> dict[str, Any]:
        return {"sites": self.sites, "batch_size": self.batch_size, "block_rows": self.block_rows,
                "seed": self.seed, "shuffle": self.shuffle, "max_rows": self.max_rows, "order": self.ORDER,
                "identity": self.identity}

    # -- resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The corpus position: block, batches of it served, its start and end in the stream (window, offset)."""
        return {"block": self._block, "batch": self._batch, "start": list(self._start),
                "end": None if self._end is None else list(self._end), **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._settings()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise SaescopeError("cannot resume the streaming source: the saved position belongs to another stream "
                                f"({'; '.join(diff)}); use a new out_dir or the same settings")
        self._block, self._batch = int(state["block"]), int(state["batch"])
        self._start = (int(state["start"][0]), int(state["start"][1]))
        self._end = None if state.get("end") is None else (int(state["end"][0]), int(state["end"][1]))
        if self._end is not None and self._batch >= self.batches_per_block:
            self._next_block()            # the saved block was served whole: continue at the next one
        self._filled = 0
        self.close()
        self.finished = False

    def close(self) -> None:
        """Stop the producer (and any thread computing ahead for it); iterating again restarts it where needed."""
        if self._chunks is not None and hasattr(self._chunks, "close"):
            self._chunks.close()
        self._chunks, self._carry = None, None

    def _next_block(self) -> None:
        assert self._end is not None
        self._block, self._batch, self._start, self._end = self._block + 1, 0, self._end, None
        self._filled = 0

    # -- filling ----------------------------------------------------------------------------------------
    def _capacity(self) -> int:
        if self.max_rows is None:
            return self.block_rows
        return max(0, min(self.block_rows, self.max_rows - self._block * self.block_rows))

    def _allocate(self, chunk: Chunk) -> None:
        if not self._buffer:
            missing = sorted(set(self.sites) - set(chunk.rows))
            if missing:
                raise SaescopeError(f"the producer gave no rows for {', '.join(missing)}")
            self._buffer = {s: torch.empty(self.block_rows, chunk.rows[s].shape[1], dtype=chunk.rows[s].dtype,
                                           device=chunk.rows[s].device) for s in self.sites}  # the model's device
            self._meta = {key: torch.empty(self.block_rows, dtype=torch.int64)
                          for key in ("window", "document", "position")}

    def _fill(self) -> int:
        """Fill the buffer with the current block's rows; returns how many (less than a block at the end)."""
        capacity = self._capacity()
        if self._chunks is None:           # (re)start the producer at the block's first window
            self._chunks = self.producer(self._start[0])
            self._carry = None
            skip = self._start[1]
        else:
            skip = 0
        filled = 0
        window, used = self._start
        while filled < capacity:
            if self._carry is not None:
                chunk, offset = self._carry
                self._carry = None
            else:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self.windows_read += 1
                offset, skip = skip, 0
            n = int(chunk.document_ids.shape[0])
            take = min(n - offset, capacity - filled)
            if take > 0:
                self._allocate(chunk)
                for s in self.sites:
                    self._buffer[s][filled:filled + take] = chunk.rows[s][offset:offset + take]
                self._meta["window"][filled:filled + take] = chunk.window
                self._meta["document"][filled:filled + take] = chunk.document_ids[offset:offset + take]
                self._meta["position"][filled:filled + take] = chunk.positions[offset:offset + take]
                filled += take
            if offset + take < n:
                self._carry = (chunk, offset + take)
                window, used = chunk.window, offset + take
            else:
                window, used = chunk.window + 1, 0
        self._end = (window, used)
        self._filled = filled
        return filled

    def _order(self, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self._block]).permutation(n)

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while not self.finished:
            n = self._fill() if self._filled == 0 else self._filled
            batches = n // self.batch_size
            order = torch.from_numpy(self._order(n))
            while self._batch < batches:
                index = order[self._batch * self.batch_size:(self._batch + 1) * self.batch_size]
                number = self._block * self.batches_per_block + self._batch
                self._batch += 1
                batch = {s: self._buffer[s][index.to(self._buffer[s].device)] for s in self.sites}
                if self.trace is not None:
                    self._write_trace(number, index)
                yield batch
            if n < self.block_rows:        # the stream ended inside this block
                self.finished = True
                return
            self._next_block()

    def _write_trace(self, number: int, index: torch.Tensor) -> None:
        record = {"batch": number, **{key: t[index].tolist() for key, t in self._meta.items()}}
        with self.trace.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
