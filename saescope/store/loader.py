"""Stream shuffled batches from an activation store with bounded memory (Gemma Scope §3: activations are
generated once, stored, shuffled and read by many SAEs).

How one epoch is ordered (all of it a pure function of ``seed``, the epoch and the store, so any position can
be recomputed and resumed exactly):

1. Every shard is cut into *pieces* of ``read_rows`` consecutive rows; the pieces of all shards are permuted
   (so both the shard order and the place inside each shard are random).
2. The permuted pieces form one virtual sequence of all ``N`` rows. Rank ``r`` of ``world_size`` takes the
   contiguous range ``[r·N // W, (r+1)·N // W)``: disjoint streams that together cover every row once.
3. A rank's range is read in blocks of ``shuffle_buffer`` rows (the shuffle buffer: the only large memory);
   each block is permuted and batches of ``batch_size`` rows are cut from the concatenated blocks.

All sites of a store share shard boundaries, so the same rows are read for every requested site: a
transcoder gets ``mlp_in`` and ``mlp_out`` of the same tokens in the same batch positions (lockstep).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
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


class ActivationLoader:
    """Iterate ``{site_id: Tensor[batch_size, d] float32}`` batches, shuffled, deterministic per ``seed``.

    ``epochs=None`` repeats forever. ``with_tokens=True`` adds ``token_ids``, ``document_ids``, ``positions``
    and ``rows`` (the global row number in the store) to each batch. :meth:`state_dict` /
    :meth:`load_state_dict` resume mid-epoch with exactly the batches an uninterrupted run would give.
    With ``drop_last`` (the default) every rank yields the same number of full batches per epoch.
    """

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
        with_tokens: bool = False,
        device: str | torch.device | None = None,
        prefetch: bool = True,
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
        self.with_tokens = bool(with_tokens)
        self.device = None if device is None else torch.device(device)
        self.prefetch = bool(prefetch)
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
                f"the store has {self.rows} rows, too few for one batch of {self.batch_size} per rank "
                f"with world_size {self.world_size}; use a smaller batch size or cache more tokens")

    # -- facts about the store ---------------------------------------------------------------------------
    def norm_scale(self, site_id: str) -> float:
        """The site's ``C`` (Appendix A): divide raw rows by it so that ``E‖x‖² = 1``."""
        value = self.index.sites[site_id].norm_scale
        assert value is not None  # a complete store always has it
        return value

    def d(self, site_id: str) -> int:
        return self.index.sites[site_id].d

    @property
    def rank_rows(self) -> tuple[int, int]:
        """This rank's ``[lo, hi)`` range of the epoch's virtual (permuted) row sequence."""
        return self.rank * self.rows // self.world_size, (self.rank + 1) * self.rows // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return (self.rows // self.world_size) // self.batch_size
        lo, hi = self.rank_rows
        return -(-(hi - lo) // self.batch_size)

    # -- resume ------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"rows": self.rows, "sites": list(self.sites), "batch_size": self.batch_size, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "read_rows": self.read_rows, "rank": self.rank,
                "world_size": self.world_size, "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: epoch and batches already yielded in it, plus the settings that define it."""
        return {"epoch": self._epoch, "batch": self._batch, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        """``count`` shuffle buffers, allocated once and reused by every epoch (no fresh pages per block)."""
        while len(self._buffers) < count:
            self._buffers.append(self._new_buffers())
        return self._buffers[:count]

    def _new_buffers(self) -> dict[str, torch.Tensor]:
        """One shuffle buffer: ``shuffle_buffer`` rows of every site (and of the token columns)."""
        n = min(self.shuffle_buffer, self.rows)
        out = {site: torch.empty((n, self.d(site)), dtype=self._storage_dtype) for site in self.sites}
        if self.with_tokens:
            out.update(token_ids=torch.empty(n, dtype=torch.int32), document_ids=torch.empty(n, dtype=torch.int64),
                       positions=torch.empty(n, dtype=torch.int32))
        return out

    def _read_block(self, pieces, epoch: int, block: int, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read block ``block`` of this rank's range into ``buffers``; return views plus its permutation."""
        lo, hi = self.rank_rows
        v0 = lo + block * self.shuffle_buffer
        v1 = min(hi, v0 + self.shuffle_buffer)
        n = v1 - v0
        segs = self._segments(pieces, v0, v1)
        data = {key: buf[:n] for key, buf in buffers.items()}
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
                                      for k, a, b in segs])
        data["__perm__"] = self._rng(epoch, 1, v0).permutation(n)
        return data

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self._epoch < self.epochs:
            yield from self._iter_epoch(self._epoch)
            self._epoch += 1
            self._batch = 0

    def _iter_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        lo, hi = self.rank_rows
        n_rank = hi - lo
        n_batches = self.batches_per_epoch
        if self._batch >= n_batches:
            return
        pieces = self._pieces(epoch)
        n_blocks = -(-n_rank // self.shuffle_buffer)
        pos = self._batch * self.batch_size
        block_no = pos // self.shuffle_buffer
        offset = pos - block_no * self.shuffle_buffer
        if self._reader is not None:  # an earlier iterator of this loader: stop it, its buffers are reused
            self._reader.stop()
            self._reader.closed = True
        reader = self._reader = _Prefetcher(self, pieces, epoch, block_no, n_blocks, self.prefetch)
        extra = (*TOKEN_KEYS, "rows") if self.with_tokens else ()
        try:
            block = reader.next()
            while self._batch < n_batches:
                if reader.closed:
                    raise RuntimeError("this iterator of the ActivationLoader was superseded by a newer one "
                                       "(they share the shuffle buffers); keep iterating the newest")
                size_now = min(self.batch_size, n_rank - self._batch * self.batch_size)
                parts = []
                filled = 0
                while filled < size_now:
                    size = len(block["__perm__"])
                    if offset == size:  # rows of the previous block are already copied out: reuse its buffer
                        block, offset = reader.next(), 0
                        continue
                    take = min(size_now - filled, size - offset)
                    idx = block["__perm__"][offset:offset + take]
                    parts.append({key: _gather(block[key], idx) for key in (*self.sites, *extra)})
                    offset += take
                    filled += take
                if len(parts) == 1:
                    batch = parts[0]
                else:
                    batch = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
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
    """Read the next shuffle block in a background thread while the current one is consumed.

    Two buffer sets are reused in turn (block ``k`` goes to set ``k % 2``): the consumer copies every row out
    of a block before asking for the next one, so the set being refilled is never still in use. Peak memory
    is therefore two shuffle buffers, whatever the size of the store."""

    def __init__(self, loader: ActivationLoader, pieces, epoch: int, first: int, n_blocks: int, enabled: bool):
        self._loader, self._pieces, self._epoch = loader, pieces, epoch
        self._next, self._n_blocks, self._enabled = first, n_blocks, enabled
        self._sets = loader._buffer_sets(2 if enabled and n_blocks - first > 1 else 1)
        self._thread: threading.Thread | None = None
        self._result: dict | None = None
        self._error: BaseException | None = None
        self.closed = False
        if enabled:
            self._start()

    def _work(self, block: int) -> None:
        try:
            buffers = self._sets[block % len(self._sets)]
            self._result = self._loader._read_block(self._pieces, self._epoch, block, buffers)
        except BaseException as exc:
            self._error = exc

    def _start(self) -> None:
        if self._next >= self._n_blocks:
            return
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._work, args=(self._next,), daemon=True)
        self._thread.start()
        self._next += 1

    def next(self) -> dict[str, torch.Tensor]:
        if not self._enabled:  # read now, into the one buffer set (its previous block is fully consumed)
            if self._next >= self._n_blocks:
                raise RuntimeError("activation loader read past the end of its range")
            self._next += 1
            return self._loader._read_block(self._pieces, self._epoch, self._next - 1, self._sets[0])
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
