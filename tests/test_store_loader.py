"""ActivationLoader: determinism per seed, shuffling across shards, lockstep sites, exact resume, rank shares of
global batches (resumable on another number of ranks)."""

from __future__ import annotations

import pytest
import torch
from store_synthetic import SITES, expected_rows, produce

from saescope.errors import SaescopeError
from saescope.store import ActivationLoader, LoaderOutput

N_CHUNKS, SHARD_ROWS = 60, 100


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    index = produce(path, N_CHUNKS, SHARD_ROWS, "bfloat16")
    assert index.rows > 1000 and len(index.shards) > 10
    return path


@pytest.fixture(scope="module")
def want():
    return expected_rows(N_CHUNKS, torch.bfloat16)


def collect(loader, limit=None):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if limit is not None and i + 1 == limit:
            break
    return out


def loader(store, with_tokens=True, prefetch=True, **kw):
    kw = {"batch_size": 32, "shuffle_buffer": 300, "read_rows": 25, **kw}
    return ActivationLoader(store, output=LoaderOutput(with_tokens=with_tokens, prefetch=prefetch), **kw)


def test_batches_are_the_stored_rows_in_lockstep(store, want):
    batches = collect(loader(store, epochs=1))
    for batch in batches:
        rows = batch["rows"]
        for site in SITES:
            assert batch[site].dtype == torch.float32 and batch[site].shape == (32, SITES[site])
            assert torch.equal(batch[site], want[site][rows].float())  # same tokens for both sites
        for key in ("token_ids", "document_ids", "positions"):
            assert torch.equal(batch[key], want[key][rows].long())


def test_one_epoch_covers_every_row_once(store, want):
    n = want["token_ids"].shape[0]
    rows = torch.cat([b["rows"] for b in collect(loader(store, epochs=1, drop_last=False))])
    assert torch.equal(rows.sort().values, torch.arange(n))
    dropped = collect(loader(store, epochs=1))
    assert len(dropped) == n // 32


def test_same_seed_same_stream_other_seed_other_stream(store):
    a = torch.cat([b["rows"] for b in collect(loader(store, seed=3), limit=40)])
    b = torch.cat([b["rows"] for b in collect(loader(store, seed=3, prefetch=False), limit=40)])
    c = torch.cat([b["rows"] for b in collect(loader(store, seed=4), limit=40)])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_epochs_are_reshuffled_and_each_covers_all_rows(store, want):
    n = want["token_ids"].shape[0]
    ld = loader(store, epochs=3, drop_last=False)
    per_epoch = ld.batches_per_epoch
    rows = [b["rows"] for b in collect(ld)]
    assert len(rows) == 3 * per_epoch
    epochs = [torch.cat(rows[i * per_epoch:(i + 1) * per_epoch]) for i in range(3)]
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(n))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_shuffling_mixes_shards(store):
    ld = loader(store, epochs=1, batch_size=64, shuffle_buffer=400)
    shard_of = torch.arange(ld.rows) // SHARD_ROWS
    batch = next(iter(ld))
    shards = shard_of[batch["rows"]]
    # 400 rows in the buffer come from 16 pieces of 25 rows, spread over the shards at random
    assert len(shards.unique()) >= 6
    # and not in stored order inside a batch
    assert not torch.equal(batch["rows"], batch["rows"].sort().values)
    # a batch is not dominated by one shard's rows (a sequential reader gives 64 rows of one shard)
    assert shards.bincount().max() <= 24
    # the shard of the first row differs between seeds
    firsts = {int(shard_of[next(iter(loader(store, seed=s)))["rows"][0]]) for s in range(8)}
    assert len(firsts) > 2


@pytest.mark.parametrize("stop_after", [1, 9, 10, 27])  # inside blocks, at a block edge, across an epoch
def test_resume_from_state_dict_gives_the_same_continuation(store, stop_after):
    full = collect(loader(store, seed=7, epochs=2))
    first = loader(store, seed=7, epochs=2)
    taken = collect(first, limit=stop_after)
    state = first.state_dict()
    second = loader(store, seed=7, epochs=2)
    second.load_state_dict(state)
    rest = collect(second)
    assert len(taken) + len(rest) == len(full)
    for got, ref in zip(taken + rest, full):
        assert torch.equal(got["rows"], ref["rows"])
        assert torch.equal(got["resid_post/layer_1"], ref["resid_post/layer_1"])
    other = loader(store, seed=8, epochs=2)
    with pytest.raises(SaescopeError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_streams_are_disjoint_and_cover_every_row(store, want, world_size):
    n = want["token_ids"].shape[0]
    rows = []
    for rank in range(world_size):
        ld = loader(store, epochs=1, rank=rank, world_size=world_size, drop_last=False)
        rows.append(torch.cat([b["rows"] for b in collect(ld)]))
    everything = torch.cat(rows)
    assert everything.numel() == n
    assert torch.equal(everything.sort().values, torch.arange(n))
    counts = {loader(store, rank=r, world_size=world_size).batches_per_epoch for r in range(world_size)}
    assert len(counts) == 1  # with drop_last every rank takes the same number of steps
    lengths = [len(collect(loader(store, epochs=1, rank=r, world_size=world_size))) for r in range(world_size)]
    assert len(set(lengths)) == 1


def test_single_site_reading_and_facts(store, want):
    ld = ActivationLoader(store, "mlp_out/layer_1", batch_size=50, epochs=1)
    batch = next(iter(ld))
    assert set(batch) == {"mlp_out/layer_1"}
    x = want["mlp_out/layer_1"].double()
    assert ld.norm_scale("mlp_out/layer_1") == pytest.approx(x.square().sum(1).mean().sqrt().item(), rel=1e-12)
    assert ld.d("mlp_out/layer_1") == 5


def test_bad_requests_are_refused(store, tmp_path):
    with pytest.raises(SaescopeError, match="not in the store"):
        ActivationLoader(store, "attn_out/layer_1")
    with pytest.raises(SaescopeError, match="too few"):
        ActivationLoader(store, batch_size=10**7)
    with pytest.raises(SaescopeError, match="rank"):
        ActivationLoader(store, rank=2, world_size=2)
    with pytest.raises(SaescopeError, match="smaller than the 4 data ranks"):
        ActivationLoader(store, batch_size=3, rank=0, world_size=4)
    with pytest.raises(SaescopeError, match="no activation store"):
        ActivationLoader(tmp_path / "nothing")
    from saescope.store import StoreWriter

    StoreWriter(tmp_path / "unfinished", SITES)
    with pytest.raises(SaescopeError, match="unfinished"):
        ActivationLoader(tmp_path / "unfinished")


def test_a_new_iterator_supersedes_the_old_one_and_continues_the_stream(store, want):
    ld = loader(store, seed=5, epochs=1, shuffle_buffer=64)  # many blocks, so both buffer sets are in use
    reference = [b["rows"] for b in collect(loader(store, seed=5, epochs=1, shuffle_buffer=64))]
    old = iter(ld)
    first = [next(old)["rows"] for _ in range(3)]
    rest = [b["rows"] for b in ld]  # continues from batch 3
    assert all(torch.equal(a, b) for a, b in zip(first + rest, reference)) and len(first + rest) == len(reference)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)


# ---------------------------------------------------------------------- data-parallel shares of global batches
def _ranks(store, world_size, **kw):
    return [loader(store, rank=r, world_size=world_size, **kw) for r in range(world_size)]


@pytest.mark.parametrize("world_size,batch_size", [(2, 32), (3, 32), (4, 30)])
def test_rank_shares_make_up_the_one_process_batches(store, want, world_size, batch_size):
    """Step t of every rank, together, is one process's batch t (the same rows; 32 over 3 ranks: 10/11/11)."""
    kw = {"seed": 4, "epochs": 2, "batch_size": batch_size, "shuffle_buffer": 100}
    whole = collect(loader(store, **kw))
    shares = [collect(ld) for ld in _ranks(store, world_size, **kw)]
    assert all(len(s) == len(whole) for s in shares) and len(whole) == 2 * (want["token_ids"].shape[0] // batch_size)
    for t, batch in enumerate(whole):
        parts = [s[t] for s in shares]
        assert [len(p["rows"]) for p in parts] == [(r + 1) * batch_size // world_size - r * batch_size // world_size
                                                  for r in range(world_size)]
        assert torch.equal(torch.cat([p["rows"] for p in parts]).sort().values, batch["rows"].sort().values)
        for part in parts:
            for site in SITES:
                assert torch.equal(part[site], want[site][part["rows"]].float())


@pytest.mark.parametrize("before,after,stop", [(1, 3, 7), (2, 1, 40), (4, 2, 12)])
def test_a_position_resumes_on_another_number_of_ranks(store, before, after, stop):
    """The position is global: a state taken on `before` ranks continues on `after` ranks with the next global
    batch, across the epoch boundary, no row skipped or repeated."""
    kw = {"seed": 9, "epochs": 2, "shuffle_buffer": 100}
    whole = collect(loader(store, **kw))
    first = _ranks(store, before, **kw)
    for ld in first:
        collect(ld, limit=stop)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states)
    assert states[0]["epoch"] * first[0].batches_per_epoch + states[0]["batch"] == stop
    second = _ranks(store, after, **kw)
    for ld in second:
        ld.load_state_dict(states[0])
    rest = [collect(ld) for ld in second]
    assert all(len(r) == len(whole) - stop for r in rest)
    for t, batch in enumerate(whole[stop:]):
        assert torch.equal(torch.cat([r[t]["rows"] for r in rest]).sort().values, batch["rows"].sort().values)


def test_each_rank_reads_about_its_share(store, monkeypatch):
    """A rank reads one span of each shuffle block, not the whole block: over 4 ranks about 1.3× the rows one
    process reads (not 4×), and each rank's read buffers hold about a quarter of a block."""
    import saescope.store.loader as loader_module

    counts = []
    real = loader_module.read_rows_into

    def counting(handle, layout, start, stop, out):
        if out.dim() == 2 and out.shape[1] == SITES["resid_post/layer_1"]:
            counts[-1] += stop - start
        return real(handle, layout, start, stop, out)

    monkeypatch.setattr(loader_module, "read_rows_into", counting)
    kw = {"seed": 2, "epochs": 1, "batch_size": 128, "shuffle_buffer": 1024, "with_tokens": False}
    one = loader(store, **kw)
    counts.append(0)
    collect(one)
    spans = []
    for ld in _ranks(store, 4, **kw):
        counts.append(0)
        collect(ld)
        spans.append(max(b["resid_post/layer_1"].shape[0] for b in ld._buffers))
    assert counts[0] == one.batches_per_epoch * 128       # one process: exactly the rows it yields
    assert sum(counts[1:]) < 1.5 * counts[0]
    assert max(spans) < 0.5 * one.block_rows


def test_old_one_process_positions_resume_only_where_the_order_is_unchanged(store):
    ld = loader(store, seed=1, shuffle_buffer=320)         # 320 = 10 batches: the old and new blocks agree
    old = {k: v for k, v in ld.state_dict().items() if k != "order"} | {"rank": 0, "world_size": 1, "batch": 3}
    ld.load_state_dict(old)
    assert ld.state_dict()["batch"] == 3
    with pytest.raises(SaescopeError, match="older saescope"):
        ld.load_state_dict(old | {"world_size": 2})
    other = loader(store, seed=1)                          # shuffle_buffer 300: old blocks of 300, new of 288
    with pytest.raises(SaescopeError, match="older saescope"):
        other.load_state_dict({k: v for k, v in other.state_dict().items() if k != "order"})
