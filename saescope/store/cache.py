"""``saescope cache``: run a language model over a text source once and store the activations of many sites.

The model runs on windows of ``context_len`` tokens (BOS first, :func:`saescope.corpus.pack_windows`), is
stopped after the deepest requested layer (:func:`saescope.sites.read_sites`), and every position except
BOS, EOS and padding becomes one row of the store (Gemma Scope §3), with its token id, document and position.
One *chunk* of the store writer is one window, so a re-run of the same command skips the windows already
stored (no forward pass for them) and continues where the killed run stopped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.store.index import StoreIndex
from saescope.store.writer import DEFAULT_SHARD_ROWS, StoreWriter


def _windows_from(model, documents, context_len: int, names: list[str]) -> Iterator:
    from saescope.corpus import pack_windows

    def remember(docs):
        for document in docs:
            names.append(document.id)
            yield document

    return pack_windows(remember(documents), model.tokenizer, context_len)


def prepare_sites(model, sites: Sequence[Site | str] | Site | str) -> tuple[list[Site], dict[str, int]]:
    """Parse and check ``sites`` against ``model`` (a :class:`~saescope.models.LoadedModel`); returns the sites and
    their widths. A transcoder input (``mlp_in``) needs the pre-MLP norm gain folded into the MLP input weights
    (Gemma Scope App. B): done here, in place (the model's outputs are unchanged). Shared by the store and the
    streaming source (:mod:`saescope.stream`), so both read the same vectors."""
    from saescope.sites import site_width

    if isinstance(sites, (str, Site)):
        sites = [sites]
    try:
        parsed = [Site.parse(s) for s in sites]
    except ValueError as exc:
        raise SaescopeError(str(exc)) from exc
    if not parsed:
        raise SaescopeError("give at least one site (e.g. --sites resid_post/layer_6)")
    if len({s.id for s in parsed}) != len(parsed):
        raise SaescopeError(f"a site is listed twice: {', '.join(s.id for s in parsed)}")
    widths = {s.id: site_width(model.model, s) for s in parsed}  # raises on a layer the model lacks
    if any(s.kind == "mlp_in" for s in parsed):
        from saescope.folding import fold_mlp_in_norm, mlp_in_is_folded

        if not mlp_in_is_folded(model.model):
            fold_mlp_in_norm(model.model)
    return parsed, widths


def window_rows(acts: dict[str, torch.Tensor], i: int, window, sites: Sequence[Site]) -> tuple[dict, dict]:
    """The training rows of window ``i`` of a forward pass: ``({site_id: [n, d]}, {token_ids, document_ids,
    positions})`` with BOS, EOS and padding dropped (Gemma Scope §3). The one rule the store and the stream share."""
    mask = window.mask
    rows = {site.id: acts[site.id][i][mask.to(acts[site.id].device)] for site in sites}
    meta = {"token_ids": window.input_ids[mask], "document_ids": window.document_ids[mask],
            "positions": window.positions[mask]}
    return rows, meta


@dataclass(frozen=True)
class StoreFormat:
    """How a store's rows are written: their ``dtype`` (float32, float16 or bfloat16) and the rows per shard file."""

    dtype: str = "float32"
    shard_rows: int = DEFAULT_SHARD_ROWS


def cache_activations(
    model,
    documents: Iterable | str,
    sites: Sequence[Site | str] | Site | str,
    out: str | Path,
    *,
    context_len: int = 1024,
    batch_size: int = 4,
    store_format: StoreFormat | None = None,
    max_tokens: int | None = None,
    text_name: str | None = None,
    held_out_fraction: float = 0.1,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
) -> StoreIndex:
    """Cache the activations of ``sites`` of ``model`` on ``documents`` into a store at ``out``.

    ``model``: a :class:`saescope.models.LoadedModel` (or a name/path for :func:`saescope.models.load_model`).
    ``documents``: a text spec (``"shakespeare"``, ``"python"``, ``"file:…"``, ``"hf:…"``) or an iterable of
    :class:`saescope.corpus.Document` in a fixed order (pass ``text_name`` to record what it was).
    ``batch_size`` is the number of windows per forward pass; ``max_tokens`` caps the stored rows.
    Re-running with the same arguments resumes an unfinished store (or returns a finished one untouched).
    Only the training part of the by-document split is cached (:func:`saescope.corpus.split_documents`):
    the documents with ``held_out_score(id) < held_out_fraction`` are kept for evaluation, never stored.
    ``store_format``: the rows' dtype and rows per shard (:class:`StoreFormat`; default float32, 65,536).
    ``part=(rank, world_size)``: store only windows ``rank, rank + world_size, …`` of the packed stream (one rank of
    :func:`saescope.store.ranks.cache_across_ranks`; document ids and windows stay those of the whole stream).
    """
    from saescope.corpus import documents_from_spec, split_documents
    from saescope.models import LoadedModel, load_model
    from saescope.sites import read_sites

    store_format = store_format or StoreFormat()
    rank, world_size = part
    if not 0 <= rank < world_size:
        raise SaescopeError(f"part=(rank, world_size) needs 0 <= rank < world_size, got {part}")
    if batch_size < 1:
        raise SaescopeError(f"batch_size (windows per forward pass) must be at least 1, got {batch_size}")
    if context_len < 2:
        raise SaescopeError(f"context_len must be at least 2 (BOS and one token), got {context_len}")
    if not isinstance(model, LoadedModel):
        model = load_model(model)
    if isinstance(documents, str):
        text_name = text_name or documents
        documents = documents_from_spec(documents)
    if not 0.0 <= held_out_fraction < 1.0:
        raise SaescopeError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    counts = {"all": 0, "train": 0}

    def counted(docs, key):
        for document in docs:
            counts[key] += 1
            yield document

    documents = counted(split_documents(counted(documents, "all"), held_out_fraction, part="train"), "train")
    parsed, widths = prepare_sites(model, sites)

    writer = StoreWriter(out, widths, dtype=store_format.dtype, shard_rows=store_format.shard_rows, model=model.name,
                         context_len=context_len, max_rows=max_tokens,
                         settings={"text": text_name or "custom documents", "held_out_fraction": held_out_fraction,
                                   "mlp_in_folded": any(s.kind == "mlp_in" for s in parsed),
                                   "model_dtype": str(model.dtype).removeprefix("torch.")})
    if writer.complete:
        return writer.index
    names: list[str] = []
    writer.document_name = lambda i: f"{i} ({names[i]})" if 0 <= i < len(names) else str(i)
    windows = _windows_from(model, documents, context_len, names)
    if world_size > 1:
        windows = itertools.islice(windows, rank, None, world_size)
    skip = writer.chunks_done
    bar = tqdm(total=max_tokens, initial=writer.rows, unit="tok", unit_scale=True, disable=not progress,
               desc=f"caching {len(parsed)} site(s) to {out}", dynamic_ncols=True)
    try:
        batch: list = []
        for number, window in enumerate(windows):
            if number < skip:
                continue  # stored by an earlier run of the same command
            batch.append(window)
            if len(batch) == batch_size:
                _forward_and_store(model, batch, parsed, writer, bar, read_sites)
                batch = []
                if writer.done:
                    break
        if batch and not writer.done:
            _forward_and_store(model, batch, parsed, writer, bar, read_sites)
    finally:
        bar.close()
    if writer.rows == 0 and counts["all"] > 0 and counts["train"] == 0:
        raise SaescopeError(
            f"all {counts['all']} document(s) fall in the held-out part of the by-document split "
            f"(held_out_fraction={held_out_fraction}), so nothing is left to cache; give more documents, or "
            "pass held_out_fraction=0 (--held-out-fraction 0) to cache them all and evaluate on other text")
    return writer.close()


def _forward_and_store(model, windows: list, sites: list[Site], writer: StoreWriter, bar, read_sites) -> None:
    input_ids = torch.stack([w.input_ids for w in windows])
    acts = read_sites(model.model, input_ids, sites)
    for i, window in enumerate(windows):
        rows, meta = window_rows(acts, i, window, sites)
        before = writer.rows
        writer.add(rows, **meta)
        bar.update(writer.rows - before)
        if writer.done:
            return
