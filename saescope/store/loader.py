"""Stream shuffled batches from an activation store with bounded memory (Gemma Scope §3: activations are
generated once, stored, shuffled and read by many SAEs).

How one epoch is ordered (all of it a pure function of ``seed``, the epoch and the store — never of the number
of processes — so any position can be recomputed and resumed exactly, on any number of ranks):

1. Every shard is cut into *pieces* of ``read_rows`` consecutive rows; the pieces of all shards are permuted
   (so both the shard order and the place inside each shard are random).
2. The permuted pieces form one virtual sequence of all ``N`` rows, cut into blocks of ``shuffle_buffer`` rows
   rounded down to a whole number of batches (at least one batch): the shuffle block. Each block is permuted
   and cut into the global batches of ``batch_size`` rows, so no batch spans two blocks.
3. Data parallel (``world_size`` ranks): every rank computes the same global batches; rank ``r`` takes the rows
   of each global batch whose place in the store order (the block's virtual sequence) is
   ``[r·B // W, (r+1)·B // W)`` among the batch's ``B`` rows. So the ranks' rows of step ``t`` are, together,
   exactly one process's batch ``t``, and a rank needs only about ``1/W`` of each block: it reads the one
   contiguous span of the block that holds its rows (plus the few rows of its neighbours mixed in at the
   span's edges), not the whole block.

The position (:meth:`ActivationLoader.state_dict`) is the global batch count, the same on every rank, so a run
resumed on another number of ranks continues the same sequence of global batches.

All sites of a store share shard boundaries, so the same rows are read for every requested site: a
transcoder gets ``mlp_in`` and ``mlp_out`` of the same tokens in the same batch positions (lockstep).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saescope.errors import SaescopeError
from saescope.store.index import TOKENS_FOLDER, StoreIndex
from saescope.store.shards import STORAGE_DTYPES, TensorLayout, read_layout, read_rows_into, sha256_file

TOKEN_KEYS = ("token_ids", "document_ids", "positions")


def verify_store(path: str | Path) -> StoreIndex:
    """Check every shard file's size and sha256 against the index; raise SaescopeError naming a bad file."""
    root = Path(path)
    index = StoreIndex.load(root)
    for k, shard in enumerate(index.shards):
        for name, entry in shard.files.items():
            file = root / entry.path
            if not file.is_file():
                raise SaescopeError(f"shard {k} of {name}: {file} is missing")
            if file.stat().st_size != entry.bytes or sha256_file(file) != entry.sha256:
                raise SaescopeError(f"shard {k} of {name}: {file} does not match its checksum in the index "
                                    "(the file was changed or damaged)")
    return index


@dataclass(frozen=True)
class LoaderOutput:
    """What each batch of an :class:`ActivationLoader` carries and how it is delivered. None of it changes
    which rows come in which order (the stream's identity, :meth:`ActivationLoader.state_dict`).

    ``with_tokens=True`` adds ``token_ids``, ``document_ids``, ``positions`` and ``rows`` (the global row number
    in the store) to each batch; ``device`` moves every batch there (non-blocking); ``prefetch`` reads the
    next block's rows in a background thread while the current block is served.
    """

    with_tokens: bool = False
    device: str | torch.device | None = None
    prefetch: bool = True


class ActivationLoader:
    """Iterate ``{site_id: Tensor[rows, d] float32}`` batches, shuffled, deterministic per ``seed``.

    ``batch_size`` is the *global* batch: with ``world_size`` ranks, rank ``rank`` yields its
    ``[rank·B // W, (rank+1)·B // W)`` share of every global batch (see the module docstring), and the ranks'
    shares of step ``t`` together are the one-process batch ``t``. ``epochs=None`` repeats forever.
    ``output`` (:class:`LoaderOutput`): the token columns, the device and prefetching. :meth:`state_dict` / :meth:`load_state_dict` resume mid-epoch, on any number
    of ranks, with exactly the batches an uninterrupted run would give. ``drop_last`` (the default) drops the
    epoch's last incomplete global batch.
    """

    ORDER = 2
    """Version of the row order (1: each rank read its own range of the store; 2: shares of global batches)."""

    def __init__(
        self,
        path: str | Path,
        sites: Sequence[str] | str | None = None,
        batch_size: int = 4096,
        *,
        seed: int = 0,
        shuffle_buffer: int = 65536,
        read_rows: int = 2048,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        output: LoaderOutput | None = None,
    ):
        self.path = Path(path)
        self.index = StoreIndex.load(self.path)
        if not self.index.complete:
            raise SaescopeError(f"the activation store at {self.path} is unfinished "
                                f"({self.index.rows} rows so far); run the same `saescope cache` command again "
                                "to finish it before reading")
        if sites is None:
            sites = list(self.index.sites)
        elif isinstance(sites, str):
            sites = [sites]
        sites = [str(s) for s in sites]
        for site_id in sites:
            if site_id not in self.index.sites:
                raise SaescopeError(f"site {site_id!r} is not in the store at {self.path}; "
                                    f"it holds {', '.join(self.index.sites)}")
        if not sites:
            raise SaescopeError("choose at least one site to read")
        for name, value in (("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer),
                            ("read_rows", read_rows), ("world_size", world_size)):
            if int(value) < 1:
                raise SaescopeError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise SaescopeError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < world_size:
            raise SaescopeError(f"batch_size {batch_size} (global rows per step) is smaller than the {world_size} "
                                "data ranks sharing it; use a larger batch or fewer processes")
        if epochs is not None and epochs < 1:
            raise SaescopeError(f"epochs must be at least 1 (or None for no limit), got {epochs}")
        self.sites = sites
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.read_rows = int(read_rows)
        self.epochs = epochs
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        output = LoaderOutput() if output is None else output
        self.with_tokens = bool(output.with_tokens)
        self.device = None if output.device is None else torch.device(output.device)
        self.prefetch = bool(output.prefetch)
        self._storage_dtype = STORAGE_DTYPES[self.index.dtype]
        self._shard_rows = np.array([s.rows for s in self.index.shards], dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(self._shard_rows)])
        self.rows = int(self._shard_start[-1])
        self._layouts: dict[str, dict[str, TensorLayout]] = {}
        self._epoch = 0
        self._batch = 0
        self._buffers: list[dict[str, torch.Tensor]] = []
        self._reader: _Prefetcher | None = None
        if self.batches_per_epoch == 0:
            raise SaescopeError(
                f"the store has {self.rows} rows, too few for one batch of {self.batch_size}; "
                "use a smaller batch size or cache more tokens")

    # -- facts about the store ---------------------------------------------------------------------------
    def norm_scale(self, site_id: str) -> float:
        """The site's ``C`` (Appendix A): divide raw rows by it so that ``E‖x‖² = 1``."""
        value = self.index.sites[site_id].norm_scale
        assert value is not None  # a complete store always has it
        return value

    def d(self, site_id: str) -> int:
        return self.index.sites[site_id].d

    @property
    def block_rows(self) -> int:
        """Rows of one shuffle block: ``shuffle_buffer`` rounded down to whole global batches (at least one)."""
        return max(1, self.shuffle_buffer // self.batch_size) * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        if self.drop_last:
            return self.rows // self.batch_size
        return -(-self.rows // self.batch_size)

    # -- resume ------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"rows": self.rows, "sites": list(self.sites), "batch_size": self.batch_size, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "read_rows": self.read_rows, "drop_last": self.drop_last,
                "order": self.ORDER}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: epoch and global batches already yielded in it, plus the settings that define
        it. The same on every rank: it does not depend on ``rank`` or ``world_size``."""
        return {"epoch": self._epoch, "batch": self._batch, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "order" not in state:
            # saved before ORDER 2: one rank's stream of the same order iff it was one process and the old
            # shuffle blocks (shuffle_buffer rows) are the new ones (whole batches)
            if state.get("world_size", 1) != 1 or min(self.shuffle_buffer, self.rows) != min(self.block_rows,
                                                                                           self.rows):
                raise SaescopeError(
                    "cannot resume the activation loader: the saved position was written by an older saescope "
                    f"whose row order differs for these settings (world_size {state.get('world_size')}, "
                    f"shuffle_buffer {state.get('shuffle_buffer')} not a multiple of batch_size "
                    f"{state.get('batch_size')}); start a new run")
            state["order"] = self.ORDER
        mine = self._identity()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise SaescopeError("cannot resume the activation loader: the saved position belongs to another "
                                f"stream ({'; '.join(diff)})")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    # -- the order of an epoch ---------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _pieces(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Permuted pieces of the epoch: (shard, first row in shard, rows) arrays."""
        shard, first, count = [], [], []
        for k, n in enumerate(self._shard_rows.tolist()):
            starts = np.arange(0, n, self.read_rows, dtype=np.int64)
            shard.append(np.full(len(starts), k, dtype=np.int64))
            first.append(starts)
            count.append(np.minimum(self.read_rows, n - starts))
        shard_a, first_a, count_a = np.concatenate(shard), np.concatenate(first), np.concatenate(count)
        order = self._rng(epoch, 0).permutation(len(shard_a))
        return shard_a[order], first_a[order], count_a[order]

    def _segments(self, pieces, v0: int, v1: int) -> list[tuple[int, int, int]]:
        """(shard, start row, stop row) runs covering virtual rows ``[v0, v1)`` of the epoch."""
        shard, first, count = pieces
        vstart = np.concatenate([[0], np.cumsum(count)])
        i = int(np.searchsorted(vstart, v0, side="right")) - 1
        out = []
        v = v0
        while v < v1:
            off = v - int(vstart[i])
            take = min(int(count[i]) - off, v1 - v)
            a = int(first[i]) + off
            out.append((int(shard[i]), a, a + take))
            v += take
            i += 1
        return out

    def _layout(self, rel: str) -> dict[str, TensorLayout]:
        if rel not in self._layouts:
            self._layouts[rel] = read_layout(self.path / rel)
        return self._layouts[rel]

    def _buffer_sets(self, count: int) -> list[dict[str, torch.Tensor]]:
        """``count`` read buffers, reused by every block and epoch (no fresh pages per block); each grows to the
        largest span read into it (at most one shuffle block; about ``1/world_size`` of one for a rank)."""
        while len(self._buffers) < count:
            self._buffers.append({})
        return self._buffers[:count]

    def _ensure_rows(self, buffers: dict[str, torch.Tensor], n: int) -> None:
        """Grow ``buffers`` in place to hold ``n`` rows of every site (and of the token columns)."""
        if buffers and next(iter(buffers.values())).shape[0] >= n:
            return
        buffers.clear()
        buffers.update({site: torch.empty((n, self.d(site)), dtype=self._storage_dtype) for site in self.sites})
        if self.with_tokens:
            buffers.update(token_ids=torch.empty(n, dtype=torch.int32),
                           document_ids=torch.empty(n, dtype=torch.int64), positions=torch.empty(n, dtype=torch.int32))

    def _share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows of one global batch (block positions, kept in the batch's shuffled order): those whose
        place among the batch's rows sorted by block position is in ``[r·m // W, (r+1)·m // W)``."""
        if self.world_size == 1:
            return rows
        m = len(rows)
        lo, hi = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
        mine = np.zeros(m, dtype=bool)
        mine[np.argsort(rows, kind="stable")[lo:hi]] = True
        return rows[mine]

    def _plan_block(self, epoch: int, block: int, first: int, stop: int) -> tuple[int, int, list[np.ndarray]]:
        """Global batches ``[first, stop)`` of the epoch, all in block ``block``: this rank's rows of each, as
        positions in the span ``[lo, hi)`` of the block that holds them all."""
        v0 = block * self.block_rows
        n = min(self.rows, v0 + self.block_rows) - v0
        perm = self._rng(epoch, 1, v0).permutation(n)
        shares = []
        for g in range(first, stop):
            j = g * self.batch_size - v0
            shares.append(self._share(perm[j:j + self.batch_size]))
        used = [s for s in shares if len(s)]
        lo = min(int(s.min()) for s in used) if used else 0
        hi = max(int(s.max()) for s in used) + 1 if used else 0
        return v0 + lo, v0 + hi, [s - lo for s in shares]

    def _read_block(self, pieces, epoch: int, block: int, first: int, stop: int,
                    buffers: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Read this rank's span of block ``block`` (global batches ``[first, stop)``) into ``buffers``; return
        views of it plus each batch's rows in it (``__shares__``)."""
        v0, v1, shares = self._plan_block(epoch, block, first, stop)
        n = v1 - v0
        self._ensure_rows(buffers, max(n, 1))
        segs = self._segments(pieces, v0, v1)
        data: dict[str, Any] = {key: buf[:n] for key, buf in buffers.items()}
        by_shard: dict[int, list[tuple[int, int, int]]] = {}
        pos = 0
        for k, a, b in segs:
            by_shard.setdefault(k, []).append((a, b, pos))
            pos += b - a
        names = list(self.sites) + ([TOKENS_FOLDER] if self.with_tokens else [])
        for name in names:
            targets = {"activations": data[name]} if name != TOKENS_FOLDER else \
                {key: data[key] for key in TOKEN_KEYS}
            for k, runs in by_shard.items():
                rel = self.index.shards[k].files[name].path
                layout = self._layout(rel)
                with open(self.path / rel, "rb", buffering=0) as handle:
                    for a, b, p in runs:
                        for tname, t in targets.items():
                            read_rows_into(handle, layout[tname], a, b, t[p:p + b - a])
        if self.with_tokens:
            data["rows"] = torch.cat([torch.arange(int(self._shard_start[k]) + a, int(self._shard_start[k]) + b)
                                      for k, a, b in segs] or [torch.zeros(0, dtype=torch.int64)])
        data["__shares__"] = shares
        return data

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self._epoch < self.epochs:
            yield from self._iter_epoch(self._epoch)
            self._epoch += 1
            self._batch = 0

    def _iter_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        n_batches = self.batches_per_epoch
        if self._batch >= n_batches:
            return
        pieces = self._pieces(epoch)
        per_block = self.block_rows // self.batch_size
        plan = [(k, max(self._batch, k * per_block), min(n_batches, (k + 1) * per_block))
                for k in range(self._batch // per_block, -(-n_batches // per_block))]
        if self._reader is not None:  # an earlier iterator of this loader: stop it, its buffers are reused
            self._reader.stop()
            self._reader.closed = True
        reader = self._reader = _Prefetcher(self, pieces, epoch, plan, self.prefetch)
        extra = (*TOKEN_KEYS, "rows") if self.with_tokens else ()
        try:
            for _ in plan:
                block = reader.next()
                for idx in block["__shares__"]:
                    if reader.closed:
                        raise RuntimeError("this iterator of the ActivationLoader was superseded by a newer one "
                                           "(they share the read buffers); keep iterating the newest")
                    batch = {key: _gather(block[key], idx) for key in (*self.sites, *extra)}
                    for key in self.sites:
                        if batch[key].dtype != torch.float32:
                            batch[key] = batch[key].to(torch.float32)
                    for key in extra:
                        batch[key] = batch[key].to(torch.int64)
                    if self.device is not None:
                        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    self._batch += 1
                    yield batch
        finally:
            reader.stop()
            if self._reader is reader:
                self._reader = None


def _gather(source: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """A fresh copy of ``source[idx]`` (rows). numpy's ``take`` is a plain row copy; on a busy 2-core CPU it
    runs several times faster than torch's threaded ``index_select``."""
    if source.dtype == torch.bfloat16:
        return torch.from_numpy(np.take(source.view(torch.int16).numpy(), idx, axis=0)).view(torch.bfloat16)
    return torch.from_numpy(np.take(source.numpy(), idx, axis=0))


class _Prefetcher:
    """Read the next block's span in a background thread while the current one is consumed.

    Two buffer sets are reused in turn (the ``k``-th block read goes to set ``k % 2``): the consumer copies
    every batch out of a block before asking for the next one, so the set being refilled is never still in
    use. Peak memory is therefore two spans (each at most one shuffle block), whatever the size of the store."""

    def __init__(self, loader: ActivationLoader, pieces, epoch: int, plan: list[tuple[int, int, int]],
                 enabled: bool):
        self._loader, self._pieces, self._epoch, self._plan = loader, pieces, epoch, plan
        self._next, self._enabled = 0, enabled
        self._sets = loader._buffer_sets(2 if enabled and len(plan) > 1 else 1)
        self._thread: threading.Thread | None = None
        self._result: dict | None = None
        self._error: BaseException | None = None
        self.closed = False
        if enabled:
            self._start()

    def _read(self, i: int) -> dict[str, Any]:
        block, first, stop = self._plan[i]
        return self._loader._read_block(self._pieces, self._epoch, block, first, stop,
                                        self._sets[i % len(self._sets)])

    def _work(self, i: int) -> None:
        try:
            self._result = self._read(i)
        except BaseException as exc:
            self._error = exc

    def _start(self) -> None:
        if self._next >= len(self._plan):
            return
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._work, args=(self._next,), daemon=True)
        self._thread.start()
        self._next += 1

    def next(self) -> dict[str, Any]:
        if not self._enabled:  # read now, into the one buffer set (its previous block is fully consumed)
            if self._next >= len(self._plan):
                raise RuntimeError("activation loader read past the end of its range")
            self._next += 1
            return self._read(self._next - 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("activation loader read past the end of its range")
        block = self._result
        self._result = None
        self._start()
        return block

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
