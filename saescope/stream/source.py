"""Train straight from the language model: a batch source fed by forward passes, no activation store on disk.

:class:`ModelChunks` turns text into training rows exactly as ``saescope cache`` does — the training side of the
by-document split (:func:`saescope.corpus.split_documents`), packed into windows of ``context_len`` tokens
(:func:`saescope.corpus.pack_windows`), one forward pass over ``windows_per_pass`` windows reading every site at
once and stopping after the deepest layer asked for (:func:`saescope.sites.read_sites`), BOS/EOS/padding dropped
(:func:`saescope.store.cache.window_rows`). Forward passes always group windows ``[kW, (k+1)W)``, counted from
the first window, so a producer restarted at any window computes the very same passes (and, on one machine with
one thread count, the very same bits) as an uninterrupted one; the store does the same when written in one go,
which is why streaming and cached training can be compared exactly.

:class:`StreamingSource` puts those rows through the block shuffle of :mod:`saescope.stream.shuffle` and
estimates the norm scale ``C`` of each site from the first ``norm_sample_rows`` rows of the stream (Gemma Scope
App. A, :mod:`saescope.store.norm_scale`; the store computes it over all its rows, a stream cannot).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from saescope.config import Site
from saescope.corpus import DEFAULT_CONTEXT_LEN, Document
from saescope.errors import SaescopeError
from saescope.stream.shuffle import BlockShuffle, Chunk

DEFAULT_NORM_SAMPLE_ROWS = 8192
"""Rows (tokens) of the start of the stream from which ``C`` is estimated."""


class ModelChunks:
    """A chunk producer (see :mod:`saescope.stream.shuffle`) running ``model`` over ``documents``.

    ``documents``: a text spec (``"shakespeare"``, ``"file:…"``, …) or a callable returning the documents in
    a fixed order (called again at every restart). ``prefetch``: forward passes computed ahead in a background
    thread (0: none), so the next pass overlaps the SAE steps on the current rows; the rows are the same.
    """

    def __init__(self, model, documents: str | Callable[[], Iterable[Document]], sites: Sequence[Site | str], *,
                 context_len: int = DEFAULT_CONTEXT_LEN, windows_per_pass: int = 4, held_out_fraction: float = 0.1,
                 prefetch: int = 0):
        from saescope.store.cache import prepare_sites

        if windows_per_pass < 1:
            raise SaescopeError(f"windows_per_pass must be at least 1, got {windows_per_pass}")
        if context_len < 2:
            raise SaescopeError(f"context_len must be at least 2 (BOS and one token), got {context_len}")
        if not 0.0 <= held_out_fraction < 1.0:
            raise SaescopeError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        if prefetch < 0:
            raise SaescopeError(f"prefetch must be 0 or more forward passes, got {prefetch}")
        self.model = model
        self.text_name = documents if isinstance(documents, str) else "custom documents"
        if isinstance(documents, str):
            from saescope.corpus import documents_from_spec

            documents_from_spec(documents)             # check the spec now, before any long work
            spec = documents
            self.documents: Callable[[], Iterable[Document]] = lambda: documents_from_spec(spec)
        else:
            self.documents = documents
        self.sites, self.dims = prepare_sites(model, sites)
        self.context_len, self.windows_per_pass = int(context_len), int(windows_per_pass)
        self.held_out_fraction = float(held_out_fraction)
        self.prefetch = int(prefetch)
        self.forward_seconds = 0.0       # time spent in forward passes (this process)

    def identity(self) -> dict[str, Any]:
        return {"model": getattr(self.model, "name", None), "text": self.text_name, "context_len": self.context_len,
                "windows_per_pass": self.windows_per_pass, "held_out_fraction": self.held_out_fraction,
                "sites": [s.id for s in self.sites], "model_dtype": str(self.model.dtype).removeprefix("torch.")}

    def _windows(self):
        from saescope.corpus import pack_windows, split_documents

        train = split_documents(self.documents(), self.held_out_fraction, part="train")
        return pack_windows(train, self.model.tokenizer, self.context_len)

    def _passes(self, start_window: int) -> Iterator[list[Chunk]]:
        import time

        from saescope.sites import read_sites
        from saescope.store.cache import window_rows

        group = start_window // self.windows_per_pass
        windows = itertools.islice(self._windows(), group * self.windows_per_pass, None)
        number = group * self.windows_per_pass
        while True:
            batch = list(itertools.islice(windows, self.windows_per_pass))
            if not batch:
                return
            t = time.perf_counter()
            acts = read_sites(self.model.model, torch.stack([w.input_ids for w in batch]), self.sites)
            chunks = []
            for i, window in enumerate(batch):
                rows, meta = window_rows(acts, i, window, self.sites)
                chunks.append(Chunk(number + i, rows, meta["token_ids"], meta["document_ids"], meta["positions"]))
            self.forward_seconds += time.perf_counter() - t
            number += len(batch)
            yield chunks

    def __call__(self, start_window: int) -> Iterator[Chunk]:
        passes = self._passes(start_window) if self.prefetch == 0 else _prefetched(self._passes(start_window),
                                                                                  self.prefetch)
        try:
            for chunks in passes:
                for chunk in chunks:
                    if chunk.window >= start_window:
                        yield chunk
        finally:
            passes.close()          # stops and joins a prefetching thread


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a daemon thread, at most ``depth`` ahead (torch releases the GIL in its kernels)."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # re-raised in the consumer
            put(exc)

    thread = threading.Thread(target=work, daemon=True, name="saescope-forward")
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()           # at most the forward pass in flight; no thread outlives its consumer


class StreamingSource(BlockShuffle):
    """The trainer's batch source straight from ``model`` (see the module docstring and :class:`BlockShuffle`).

    ``norm_scales()`` gives ``C`` per site from the first ``norm_sample_rows`` rows (App. A); pass them to
    :func:`saescope.train.train`. ``log``: called once with a line giving the shuffle buffer's memory.
    """

    def __init__(self, chunks: ModelChunks, batch_size: int, *, buffer_rows: int = 65536, seed: int = 0,
                 shuffle: bool = True, max_rows: int | None = None, norm_sample_rows: int = DEFAULT_NORM_SAMPLE_ROWS,
                 trace: str | Path | None = None, log: Callable[[str], None] | None = None):
        if norm_sample_rows < 1:
            raise SaescopeError(f"norm_sample_rows must be at least 1, got {norm_sample_rows}")
        super().__init__(chunks, [s.id for s in chunks.sites], batch_size, buffer_rows=buffer_rows, seed=seed,
                         shuffle=shuffle, max_rows=max_rows, identity=chunks.identity(), trace=trace)
        self.chunks = chunks
        self.dims = dict(chunks.dims)
        self.norm_sample_rows = int(norm_sample_rows)
        self.log = log
        self._logged = False

    def expected_buffer_bytes(self) -> int:
        """Bytes of the shuffle buffer (float32 rows of every site; the buffer takes the model's dtype)."""
        item = torch.empty(0, dtype=self.chunks.model.dtype).element_size()
        return self.block_rows * sum(self.dims.values()) * item

    def norm_scales(self) -> dict[str, float]:
        """``C = √E‖x‖²`` per site over the first ``norm_sample_rows`` training rows (fewer if the text is
        shorter), accumulated in float64 (App. A; the same functions as the store)."""
        from saescope.store.norm_scale import norm_scale_from_sums, sum_squared_norms

        sums = {s: 0.0 for s in self.sites}
        if (self._block, self._batch, self._filled) == (0, 0, 0) and self.norm_sample_rows <= self.block_rows:
            # the sample is the start of the first block: fill it now (in stream order until it is permuted) and
            # train on it next, so the sample costs no forward pass of its own
            rows = min(self._fill(), self.norm_sample_rows)
            return {s: norm_scale_from_sums(sum_squared_norms(self._buffer[s][:rows]) if rows else 0.0, rows, site=s)
                    for s in self.sites}
        rows = 0
        for chunk in self.chunks(0):
            take = min(int(chunk.document_ids.shape[0]), self.norm_sample_rows - rows)
            for s in self.sites:
                sums[s] += sum_squared_norms(chunk.rows[s][:take])
            rows += take
            if rows >= self.norm_sample_rows:
                break
        return {s: norm_scale_from_sums(sums[s], rows, site=s) for s in self.sites}

    def __iter__(self):
        for batch in super().__iter__():
            if not self._logged and self.log is not None:
                self._logged = True
                self.log(f"streaming {len(self.sites)} site(s) from {self.chunks.identity()['model']}: shuffle "
                         f"buffer of {self.block_rows:,} rows holds {self.buffer_bytes / 2**20:,.1f} MiB")
            yield batch


__all__ = ["DEFAULT_NORM_SAMPLE_ROWS", "ModelChunks", "StreamingSource"]
