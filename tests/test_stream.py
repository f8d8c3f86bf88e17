"""Streaming from the model: the block shuffle against a reference order, streamed rows = the store's rows bit for
bit, streaming training = training on the store's rows in the same order, and a SIGKILLed streaming run that
resumes with no batch lost or repeated and ends with the SAEs of an uninterrupted run."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_helpers import run_and_kill
from store_synthetic import read_store_with_safetensors
from stream_helpers import (
    BATCH,
    BUFFER,
    CONTEXT_LEN,
    SITES,
    WINDOWS_PER_PASS,
    documents,
    final_weights,
    tiny_loaded,
    train_config,
)

from saescope.errors import SaescopeError
from saescope.store import StoreFormat, cache_activations
from saescope.store.norm_scale import estimate_norm_scale
from saescope.stream import BlockShuffle, Chunk, ModelChunks, StreamingSource
from saescope.train import train
from saescope.train.sources import TensorBatchSource

HERE = Path(__file__).parent


# ------------------------------------------------------------------------------- the block shuffle itself
def synthetic_producer(sizes, d=3):
    """Window w has sizes[w] rows whose first column is a global row number (so rows can be identified)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])

    def produce(start_window):
        for w in range(start_window, len(sizes)):
            ids = torch.arange(starts[w], starts[w + 1], dtype=torch.float64)
            rows = torch.stack([ids] + [ids * (k + 2) for k in range(d - 1)], dim=1)
            yield Chunk(w, {"a": rows, "b": -rows[:, :2]}, ids.long(), torch.full((len(ids),), w),
                        torch.arange(len(ids)))
    return produce, int(starts[-1])


def reference_batches(total, batch, block_rows, seed, max_rows=None):
    """The documented order, written out: rows cut in blocks, block b permuted by default_rng([seed, b])."""
    total = total if max_rows is None else min(total, max_rows)
    out = []
    for b, start in enumerate(range(0, total, block_rows)):
        rows = np.arange(start, min(start + block_rows, total))
        order = rows[np.random.default_rng([seed, b]).permutation(len(rows))]
        out += [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
    return out


SIZES = [5, 0, 7, 3, 11, 1, 9, 4, 0, 6, 8, 2, 13, 5, 7]


@pytest.mark.parametrize("max_rows", [None, 50])
def test_block_shuffle_serves_the_documented_order(max_rows):
    produce, total = synthetic_producer(SIZES)
    source = BlockShuffle(produce, ["a", "b"], 4, buffer_rows=18, seed=3, max_rows=max_rows)
    assert source.block_rows == 16
    got = [batch["a"][:, 0].long().numpy() for batch in source]
    want = reference_batches(total, 4, 16, 3, max_rows)
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    flat = np.concatenate(got)
    assert len(set(flat.tolist())) == len(flat)               # no row twice


def test_block_shuffle_keeps_sites_in_lockstep_and_resumes_at_every_batch():
    produce, total = synthetic_producer(SIZES)
    full = list(BlockShuffle(produce, ["a", "b"], 4, buffer_rows=12, seed=1))
    for batch in full:
        assert torch.equal(batch["b"], -batch["a"][:, :2])
    for k in range(len(full) + 1):
        first = BlockShuffle(produce, ["a", "b"], 4, buffer_rows=12, seed=1)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))     # through JSON, as a checkpoint stores it
        second = BlockShuffle(produce, ["a", "b"], 4, buffer_rows=12, seed=1)
        second.load_state_dict(state)
        rest = list(second)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            assert torch.equal(a["a"], b["a"]) and torch.equal(a["b"], b["b"])


def test_block_shuffle_refuses_another_streams_position():
    produce, _ = synthetic_producer(SIZES)
    state = BlockShuffle(produce, ["a"], 4, buffer_rows=12, seed=1).state_dict()
    with pytest.raises(SaescopeError, match="seed"):
        BlockShuffle(produce, ["a"], 4, buffer_rows=12, seed=2).load_state_dict(state)


# ----------------------------------------------------------------------- the model's rows vs the store's rows
def model_chunks(model, **kw):
    return ModelChunks(model, documents, SITES, context_len=CONTEXT_LEN, windows_per_pass=WINDOWS_PER_PASS,
                       held_out_fraction=0.2, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "store"
    cache_activations(tiny_loaded(), documents(), SITES, out, context_len=CONTEXT_LEN, batch_size=WINDOWS_PER_PASS,
                      held_out_fraction=0.2, store_format=StoreFormat(shard_rows=64), progress=False)
    return read_store_with_safetensors(out)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_streamed_rows_are_the_stores_rows_bit_for_bit(store, prefetch):
    chunks = list(model_chunks(tiny_loaded(), prefetch=prefetch)(0))
    for site in SITES:
        assert torch.equal(torch.cat([c.rows[site] for c in chunks]), store[site]), site
    assert torch.equal(torch.cat([c.token_ids for c in chunks]).int(), store["token_ids"].int())
    assert torch.equal(torch.cat([c.document_ids for c in chunks]), store["document_ids"].long())
    # a producer abandoned mid-stream stops its prefetching thread
    producer = model_chunks(tiny_loaded(), prefetch=prefetch)(0)
    next(producer)
    producer.close()
    assert not any(t.name == "saescope-forward" for t in threading.enumerate())
    # restarted at any window (inside a forward-pass group or at its start): the same chunks from there
    for start in (4, 6):
        again = list(model_chunks(tiny_loaded())(start))
        assert [c.window for c in again] == [c.window for c in chunks[start:]]
        assert all(torch.equal(a.rows[SITES[0]], b.rows[SITES[0]]) for a, b in zip(again, chunks[start:]))


@pytest.mark.parametrize("buffer_rows", [BUFFER, 300])     # sample beyond the first block / inside it
def test_norm_scale_is_estimated_from_the_first_rows(store, buffer_rows):
    source = StreamingSource(model_chunks(tiny_loaded()), BATCH, buffer_rows=buffer_rows, norm_sample_rows=150)
    scales = source.norm_scales()
    for site in SITES:
        assert scales[site] == pytest.approx(estimate_norm_scale(store[site][:150]), rel=1e-12)
    # estimating C (which may fill the first block early) leaves the batches unchanged
    fresh = StreamingSource(model_chunks(tiny_loaded()), BATCH, buffer_rows=buffer_rows, norm_sample_rows=150)
    assert source.state_dict()["block"] == 0
    for a, b in zip(source, fresh, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in SITES)


def test_streaming_training_equals_training_on_the_store_in_the_same_order(store, tmp_path):
    rows = store[SITES[0]].shape[0]
    tokens = (rows // BUFFER) * 96          # whole blocks only
    source = StreamingSource(model_chunks(tiny_loaded()), BATCH, buffer_rows=BUFFER, seed=7, max_rows=tokens)
    scales = source.norm_scales()
    train(train_config(tmp_path / "stream", tokens), source, scales, progress=False)
    # the store's rows put in the documented order by hand, then served in that order
    order = np.concatenate(reference_batches(rows, BATCH, 96, 7, tokens))
    in_order = {site: store[site][torch.from_numpy(order)] for site in SITES}
    cached = TensorBatchSource(in_order, BATCH, shuffle=False, epochs=1)
    train(train_config(tmp_path / "cached", tokens), cached, scales, progress=False)
    a, b = final_weights(tmp_path / "stream"), final_weights(tmp_path / "cached")
    assert a.keys() == b.keys() and len(a) >= 8
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------ a real killed process
def run_worker(out: Path, trace: Path, tokens: int, kill_at: int | None) -> bool:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    return run_and_kill([sys.executable, str(HERE / "stream_worker.py"), str(out), str(trace), str(tokens)], env,
                        lambda line: kill_at is not None and line.strip() == f"batch {kill_at}")


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkilled_streaming_run_resumes_without_losing_or_repeating_rows(tmp_path):
    tokens = 12 * 96                          # 12 blocks of 3 batches: 36 steps
    ref_trace, trace = tmp_path / "ref.jsonl", tmp_path / "killed.jsonl"
    assert not run_worker(tmp_path / "ref", ref_trace, tokens, None)
    # killed mid-block (batch 7: the checkpoint at step 6 is inside block 2), then again after a resume
    assert run_worker(tmp_path / "run", trace, tokens, 7)
    first = len(read_trace(trace))
    assert run_worker(tmp_path / "run", trace, tokens, 10)
    assert not run_worker(tmp_path / "run", trace, tokens, None)
    reference = read_trace(ref_trace)
    served = read_trace(trace)
    assert len(served) > len(reference) > 0 and first >= 8
    # every session starts at the batch its checkpoint records, and re-serves exactly what it served before
    by_batch: dict[int, dict] = {}
    for record in served:
        if record["batch"] in by_batch:
            assert by_batch[record["batch"]] == record
        by_batch[record["batch"]] = record
    assert sorted(by_batch) == list(range(36)) == [r["batch"] for r in reference]
    assert [by_batch[k] for k in range(36)] == reference
    # no token twice, none skipped: the 36 × 32 rows are the first 1,152 rows of the stream, once each
    seen = [(d, p) for r in reference for d, p in zip(r["document"], r["position"])]
    stream = [(int(d), int(p)) for c in model_chunks(tiny_loaded())(0) for d, p in zip(c.document_ids, c.positions)]
    assert len(seen) == len(set(seen)) == tokens and set(seen) == set(stream[:tokens])
    # and the SAEs are those of the uninterrupted run, bit for bit (same machine, one thread)
    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "run")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
