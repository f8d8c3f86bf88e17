"""StoreWriter: contents vs an independent reader, shards, dtypes, max_rows, errors, resume after an OSError."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from store_synthetic import SITES, chunk, expected_rows, produce, read_store_with_safetensors

from saescope.errors import SaescopeError
from saescope.store import StoreIndex, StoreWriter, shards, verify_store


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_holds_every_row_in_order(tmp_path, dtype):
    index = produce(tmp_path / "s", n_chunks=30, shard_rows=64, dtype=dtype)
    want = expected_rows(30, getattr(torch, dtype))
    got = read_store_with_safetensors(tmp_path / "s")
    assert index.complete and index.rows == want["token_ids"].shape[0] > 300
    for key, value in want.items():
        assert got[key].dtype == value.dtype or key in ("token_ids", "positions")
        assert torch.equal(got[key].to(value.dtype), value), key
    assert [s.rows for s in index.shards[:-1]] == [64] * (len(index.shards) - 1)
    assert 0 < index.shards[-1].rows <= 64
    assert index.chunks_done == 30 and index.skip_rows == 0
    assert {s: e.d for s, e in index.sites.items()} == SITES
    assert index.dtype == dtype and index.model == "synthetic" and index.context_len == 64
    verify_store(tmp_path / "s")


def test_norm_scale_is_root_mean_squared_norm_in_float64(tmp_path):
    index = produce(tmp_path / "s", n_chunks=20, shard_rows=50, dtype="bfloat16")
    want = expected_rows(20, torch.bfloat16)
    for site in SITES:
        x = want[site].double()
        c = x.square().sum(dim=1).mean().sqrt().item()
        assert index.sites[site].norm_scale == pytest.approx(c, rel=1e-12)
        assert (x / index.sites[site].norm_scale).square().sum(1).mean().item() == pytest.approx(1.0, rel=1e-12)


def test_max_rows_cuts_the_last_chunk(tmp_path):
    index = produce(tmp_path / "s", n_chunks=30, shard_rows=64, max_rows=333)
    got = read_store_with_safetensors(tmp_path / "s")
    want = expected_rows(30, max_rows=333)
    assert index.rows == 333
    assert torch.equal(got["resid_post/layer_1"], want["resid_post/layer_1"])
    assert torch.equal(got["document_ids"], want["document_ids"])


def test_non_finite_activation_names_site_document_and_position(tmp_path):
    writer = StoreWriter(tmp_path / "s", SITES, shard_rows=16)
    acts, meta = chunk(3)
    acts["mlp_out/layer_1"][7, 2] = float("nan")
    acts["mlp_out/layer_1"][9, 0] = float("inf")
    with pytest.raises(SaescopeError) as err:
        writer.add(acts, **meta)
    message = str(err.value)
    assert "mlp_out/layer_1" in message and "document 3" in message and "position 8" in message
    assert "2 row(s)" in message
    # bfloat16 storage: a float32 value beyond bfloat16's range also counts (it becomes inf when stored)
    writer = StoreWriter(tmp_path / "b", SITES, shard_rows=16, dtype="bfloat16")
    acts, meta = chunk(3)
    acts["resid_post/layer_1"][4, 1] = 3.4e38
    with pytest.raises(SaescopeError, match=r"resid_post/layer_1, document 3, position 5"):
        writer.add(acts, **meta)


def test_settings_mismatch_and_foreign_folder_are_refused(tmp_path):
    produce(tmp_path / "s", n_chunks=5, shard_rows=16)
    with pytest.raises(SaescopeError, match="other settings.*shard_rows"):
        StoreWriter(tmp_path / "s", SITES, shard_rows=32, model="synthetic", context_len=64,
                    settings={"text": "synthetic"})
    with pytest.raises(SaescopeError, match="text"):
        StoreWriter(tmp_path / "s", SITES, shard_rows=16, model="synthetic", context_len=64,
                    settings={"text": "other"})
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(SaescopeError, match="not an activation store"):
        StoreWriter(tmp_path / "f", SITES)
    with pytest.raises(SaescopeError, match="storage dtype"):
        StoreWriter(tmp_path / "g", SITES, dtype="float16")
    with pytest.raises(SaescopeError, match="cannot name a folder"):
        StoreWriter(tmp_path / "g", {"../x": 3})


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")])
def test_oserror_mid_run_gives_clear_message_and_store_resumes_identically(tmp_path, monkeypatch, code, words):
    reference = tmp_path / "ref"
    produce(reference, n_chunks=40, shard_rows=48)

    real = shards.atomic_write_bytes
    calls = {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if calls["n"] == 9:  # in the middle of some shard's set of files
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data[: len(data) // 2])  # a half-written temp file, as a full disk leaves it
            raise OSError(code, "simulated")
        return real(path, data)

    monkeypatch.setattr(shards, "atomic_write_bytes", failing)
    with pytest.raises(SaescopeError) as err:
        produce(tmp_path / "s", n_chunks=40, shard_rows=48)
    message = str(err.value)
    assert words in message and "run the same command again" in message and "shard_0" in message
    assert not StoreIndex.load(tmp_path / "s").complete
    monkeypatch.setattr(shards, "atomic_write_bytes", real)
    produce(tmp_path / "s", n_chunks=40, shard_rows=48)
    assert tree(tmp_path / "s") == tree(reference)


def test_index_is_updated_after_each_shard_and_names_the_resume_point(tmp_path):
    writer = StoreWriter(tmp_path / "s", SITES, shard_rows=50)
    fed = 0
    for c in range(12):
        acts, meta = chunk(c)
        writer.add(acts, **meta)
        fed += meta["token_ids"].shape[0]
        on_disk = json.loads((tmp_path / "s" / "index.json").read_text())
        assert on_disk["rows"] == 50 * (fed // 50)
        # chunks_done / skip_rows point at the first row not yet on disk
        starts = [0]
        for k in range(c + 1):
            starts.append(starts[-1] + chunk(k)[1]["token_ids"].shape[0])
        done, skip = on_disk["chunks_done"], on_disk["skip_rows"]
        assert starts[done] + skip == on_disk["rows"]
        assert (skip == 0 and done == c + 1) or skip < starts[done + 1] - starts[done]
