"""One store cached by every rank of a process group (``torchrun ... -m saescope cache``).

Each rank runs the model on its share of the windows and writes its own resumable part of the store
(``<out>/ranks/rank_<r>_of_<W>/``); when all parts are complete rank 0 writes the one ``index.json`` that names
their shards (:func:`merge_rank_stores`). The training side of torch.distributed is :mod:`saescope.distributed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from saescope.distributed import all_gather_object
from saescope.errors import SaescopeError
from saescope.store.index import ShardEntry, StoreIndex, exists
from saescope.store.norm_scale import norm_scale_from_sums


def rank_store_folder(world_size: int, rank: int) -> str:
    """Where rank ``rank`` of ``world_size`` writes its part, relative to the store root."""
    return f"ranks/rank_{rank:03d}_of_{world_size:03d}"


def cache_across_ranks(model, documents, sites, out, *, max_tokens: int | None = None, progress: bool = True,
                       **kwargs: Any):
    """``saescope cache`` on every rank of the process group (``torchrun ... -m saescope cache``).

    Every rank packs the same windows from the same documents; rank ``r`` of ``W`` runs the model on windows
    ``r, r + W, …`` only and stores them with :func:`saescope.store.cache_activations` in its own resumable
    part ``<out>/ranks/rank_<r>_of_<W>/`` (so a killed run resumes per rank). When all parts are complete,
    rank 0 writes ``<out>/index.json``: one store whose shards are the parts' shards in rank order, with the
    norm scale ``C`` from the summed ``Σ‖x‖²`` of all of them (App. A). Document ids are those of the whole
    stream, so rows trace back to the text as in a one-process store (which holds the same rows, in another
    order). ``max_tokens`` is split evenly over the ranks. Outside torch.distributed this is
    ``cache_activations``.
    """
    from saescope.corpus import documents_from_spec
    from saescope.store.cache import cache_activations

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cache_activations(model, documents, sites, out, max_tokens=max_tokens, progress=progress, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    if exists(out):
        index = StoreIndex.load(out)
        if index.settings.get("ranks") != world:
            raise SaescopeError(f"{out} already holds a store made by {index.settings.get('ranks') or 1} "
                                f"process(es), not {world}; run with that many, or choose a new --out")
        return index                            # complete (the merged index is written last)
    if isinstance(documents, str):
        kwargs["text_name"] = kwargs.get("text_name") or documents
        documents = documents_from_spec(documents)
    share = None if max_tokens is None else max_tokens * (rank + 1) // world - max_tokens * rank // world
    if share == 0:
        raise SaescopeError(f"max_tokens={max_tokens} is less than one token per rank ({world} ranks)")
    error = None
    try:
        cache_activations(model, documents, sites, out / rank_store_folder(world, rank), max_tokens=share,
                          progress=progress and rank == 0, part=(rank, world), **kwargs)
    except SaescopeError as exc:
        error = str(exc)
    errors = all_gather_object(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise SaescopeError("; ".join(f"rank {r}: {e}" for r, e in failed))
    if rank == 0:
        merge_rank_stores(out, world)
    dist.barrier()
    return StoreIndex.load(out)


def merge_rank_stores(out, world_size: int):
    """Write ``<out>/index.json`` over the complete parts ``<out>/ranks/rank_<r>_of_<W>/`` (their files stay
    where they are; the index names them by path)."""

    out = Path(out)
    parts = [(rank_store_folder(world_size, r), StoreIndex.load(out / rank_store_folder(world_size, r)))
             for r in range(world_size)]
    for folder, part in parts:
        if not part.complete:
            raise SaescopeError(f"the part {out / folder} is unfinished; run the same command again")
    first = parts[0][1]
    merged = first.model_copy(deep=True)
    caps = [part.settings.get("max_rows") for _, part in parts]
    merged.settings = {**first.settings, "ranks": world_size,
                       "max_rows": None if None in caps else sum(caps)}
    merged.shards = [ShardEntry(rows=shard.rows, sum_sq_norm=dict(shard.sum_sq_norm),
                                files={name: entry.model_copy(update={"path": f"{folder}/{entry.path}"})
                                       for name, entry in shard.files.items()})
                     for folder, part in parts for shard in part.shards]
    merged.rows = sum(part.rows for _, part in parts)
    merged.chunks_done = sum(part.chunks_done for _, part in parts)
    merged.skip_rows = 0
    for site_id, entry in merged.sites.items():
        total = sum(shard.sum_sq_norm[site_id] for shard in merged.shards)
        entry.norm_scale = norm_scale_from_sums(total, merged.rows, site=site_id)
    merged.complete = True
    merged.save(out)
    return merged
