"""Batch sources: anything that yields ``dict[site_id, Tensor[batch, d]]`` of raw activations.

The trainer accepts any iterable with that protocol; if it also has ``state_dict()`` and
``load_state_dict(state)`` (as ``saescope.store.loader.ActivationLoader`` does), checkpoints record its
position so a resumed run sees exactly the batches it would have seen.

:class:`TensorBatchSource` serves activations already in memory, shuffled per epoch with its own seeded
generator, and is resumable at any batch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

from saescope.config import Site
from saescope.errors import SaescopeError


class TensorBatchSource:
    """Batches of ``batch_size`` rows from in-memory tensors ``{site_id: [N, d]}`` (rows aligned across sites).

    Each epoch visits the rows in a fresh permutation drawn from ``seed + epoch`` (``shuffle=False``: in
    order); the last incomplete batch of an epoch is dropped. ``epochs=None`` repeats forever.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None):
        if not tensors:
            raise SaescopeError("TensorBatchSource needs at least one site")
        self.tensors = {Site.parse(k).id: v for k, v in tensors.items()}
        counts = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(counts.values())) != 1:
            raise SaescopeError(f"every site needs the same number of rows (one per token); got {counts}")
        self.rows = next(iter(counts.values()))
        if batch_size <= 0 or batch_size > self.rows:
            raise SaescopeError(f"batch_size {batch_size} must be between 1 and the {self.rows} rows available")
        self.batch_size = batch_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.epoch = 0
        self.position = 0          # batches already served in the current epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.rows // self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.rows)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.rows, generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch:
                index = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
                self.position += 1
                yield {site: t[index] for site, t in self.tensors.items()}
            self.epoch += 1
            self.position = 0

    def norm_scale(self, site_id: str) -> float:
        """``C = √E‖x‖²`` over all rows (Gemma Scope App. A), so that ``E‖x/C‖² = 1``."""
        t = self.tensors[Site.parse(site_id).id].to(torch.float64)
        return float(t.pow(2).sum(dim=1).mean().sqrt())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rows": self.rows,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("rows"), state.get("batch_size"), state.get("seed")) != (self.rows, self.batch_size,
                                                                                 self.seed):
            raise SaescopeError(f"the checkpoint's data position was recorded for rows={state.get('rows')}, "
                                f"batch_size={state.get('batch_size')}, seed={state.get('seed')} but this source "
                                f"has rows={self.rows}, batch_size={self.batch_size}, seed={self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BatchStream:
    """The trainer's view of a batch source: the next batch, one batch read ahead when asked for (to learn the
    widths or to initialise from the first batch, which is then trained on), and the position a checkpoint
    records — the source's position *before* a batch read ahead, so that resuming serves that batch again."""

    def __init__(self, source: Any):
        self.source = source
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None
        self._ahead: dict[str, torch.Tensor] | None = None
        self._ahead_position: Any = None

    @property
    def resumable(self) -> bool:
        """Whether the source reports and restores its position (``state_dict`` / ``load_state_dict``)."""
        return hasattr(self.source, "state_dict") and hasattr(self.source, "load_state_dict")

    def _iter(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._iterator is None:
            self._iterator = iter(self.source)
        return self._iterator

    def peek(self) -> dict[str, torch.Tensor]:
        """The next batch, kept for the following :meth:`next`."""
        if self._ahead is None:
            self._ahead_position = (copy.deepcopy(self.source.state_dict()) if hasattr(self.source, "state_dict")
                                    else None)
            try:
                self._ahead = next(self._iter())
            except StopIteration as exc:
                raise SaescopeError("the batch source yielded no batches") from exc
        return self._ahead

    def next(self) -> dict[str, torch.Tensor] | None:
        """The next batch, or None when the source has run out."""
        if self._ahead is not None:
            batch, self._ahead = self._ahead, None
            return batch
        try:
            return next(self._iter())
        except StopIteration:
            return None

    def position(self) -> Any:
        """The source's position for a checkpoint (None for a source without ``state_dict``)."""
        if not hasattr(self.source, "state_dict"):
            return None
        return self._ahead_position if self._ahead is not None else self.source.state_dict()

    def seek(self, position: Any, batches_served: int) -> None:
        """Continue from a checkpoint: restore the source's ``position``, or, for a source without one, replay
        it past the ``batches_served`` batches (exact, but reads the skipped data)."""
        self._iterator, self._ahead = None, None
        if position is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(position)
            self._iter()
            return
        iterator = self._iter()
        for _ in range(batches_served):
            next(iterator)
