"""Caching across ranks (saescope.store.ranks.cache_across_ranks): two gloo processes store the same rows as one
process, in one store whose index merges the ranks' parts; a killed rank resumes; the loader reads the result."""

from __future__ import annotations

import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from store_synthetic import read_store_with_safetensors
from test_store_cache import DOCS, tiny_loaded

from saescope.errors import SaescopeError
from saescope.store import ActivationLoader, StoreFormat, StoreIndex, cache_activations, ranks, verify_store

SITES = ["resid_post/layer_0", "resid_post/layer_1"]
KW = {"context_len": 16, "batch_size": 1, "store_format": StoreFormat(shard_rows=12), "held_out_fraction": 0.0, "progress": False}


def _worker(rank: int, world: int, init_file: str, out: str, max_tokens, crash: bool):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        docs = DOCS
        if crash:                       # the job is killed while each rank is at a different document
            def crashing(n=4 + 2 * rank):
                yield from DOCS[:n]
                raise RuntimeError("killed")
            docs = crashing()
        try:
            ranks.cache_across_ranks(tiny_loaded(), docs, SITES, out, max_tokens=max_tokens, **KW)
        except RuntimeError:
            if not crash:
                raise
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, out, world=2, max_tokens=None, crash=False):
    mp.spawn(_worker, args=(world, str(tmp_path / f"rdv_{uuid.uuid4().hex[:8]}"), str(out), max_tokens, crash),
             nprocs=world, join=True)


def _by_token(rows):
    key = rows["document_ids"].to(torch.int64) * 100_000 + rows["positions"].to(torch.int64)
    order = torch.argsort(key)
    return {k: v[order] for k, v in rows.items()}


def test_two_ranks_store_the_rows_of_one_process(tmp_path):
    one = cache_activations(tiny_loaded(), DOCS, SITES, tmp_path / "one", **KW)
    _spawn(tmp_path, tmp_path / "two")
    index = verify_store(tmp_path / "two")
    assert index.complete and index.settings["ranks"] == 2 and index.rows == one.rows
    parts = [StoreIndex.load(tmp_path / "two" / ranks.rank_store_folder(2, r)) for r in range(2)]
    assert all(p.rows > 0 for p in parts) and sum(p.rows for p in parts) == one.rows
    a = _by_token(read_store_with_safetensors(tmp_path / "one"))
    b = _by_token(read_store_with_safetensors(tmp_path / "two"))
    assert not torch.equal(read_store_with_safetensors(tmp_path / "two")["document_ids"], a["document_ids"])
    for key in ("token_ids", "document_ids", "positions"):
        assert torch.equal(a[key], b[key]), key
    for site in SITES:
        torch.testing.assert_close(b[site], a[site], rtol=1e-5, atol=1e-5)
        assert index.sites[site].norm_scale == pytest.approx(one.sites[site].norm_scale, rel=1e-6)
    batches = list(ActivationLoader(tmp_path / "two", SITES, 8, epochs=1, read_rows=4, shuffle_buffer=16))
    assert sum(b[SITES[0]].shape[0] for b in batches) == one.rows // 8 * 8
    # one process cannot resume or reuse it
    with pytest.raises(SaescopeError, match="other settings"):
        cache_activations(tiny_loaded(), DOCS, SITES, tmp_path / "two", **KW)


def test_a_killed_rank_resumes_its_part(tmp_path):
    _spawn(tmp_path, tmp_path / "s", crash=True)
    assert not (tmp_path / "s" / "index.json").exists()          # no merged index until every part is complete
    parts = [StoreIndex.load(tmp_path / "s" / ranks.rank_store_folder(2, r)) for r in range(2)]
    assert not any(p.complete for p in parts) and all(p.rows > 0 for p in parts)
    _spawn(tmp_path, tmp_path / "s")                              # the same command again
    ref = cache_activations(tiny_loaded(), DOCS, SITES, tmp_path / "one", **KW)
    a = _by_token(read_store_with_safetensors(tmp_path / "one"))
    b = _by_token(read_store_with_safetensors(tmp_path / "s"))
    assert StoreIndex.load(tmp_path / "s").rows == ref.rows
    assert torch.equal(a["token_ids"], b["token_ids"])
    torch.testing.assert_close(b[SITES[1]], a[SITES[1]], rtol=1e-5, atol=1e-5)


def test_max_tokens_is_split_over_ranks(tmp_path):
    _spawn(tmp_path, tmp_path / "s", max_tokens=37)
    index = StoreIndex.load(tmp_path / "s")
    assert index.rows == 37 and index.settings["max_rows"] == 37
    assert [StoreIndex.load(tmp_path / "s" / ranks.rank_store_folder(2, r)).rows for r in range(2)] == [18, 19]


def test_torchrun_cli_cache_on_a_saved_tiny_model(tmp_path):
    """`torchrun --nproc-per-node 2 -m saescope cache ...`: one merged store with the rows of a one-process run."""
    import os
    import subprocess
    import sys

    from tiny_models import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{chr(29 + i): i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    fast.save_pretrained(folder)
    (tmp_path / "text.txt").write_text("to be or not to be, that is the question\n" * 6)
    args = ["cache", str(folder), "--sites", "resid_post/layer_1", "--text", f"file:{tmp_path / 'text.txt'}",
            "--context-len", "16", "--shard-rows", "30", "--held-out-fraction", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "saescope", *args, "--out", str(tmp_path / "two")],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-m", "saescope", *args, "--out", str(tmp_path / "one")],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stdout + one.stderr
    index = verify_store(tmp_path / "two")
    assert index.settings["ranks"] == 2 and index.rows == StoreIndex.load(tmp_path / "one").rows
    a = _by_token(read_store_with_safetensors(tmp_path / "one"))
    b = _by_token(read_store_with_safetensors(tmp_path / "two"))
    assert torch.equal(a["token_ids"], b["token_ids"])
    torch.testing.assert_close(b["resid_post/layer_1"], a["resid_post/layer_1"], rtol=1e-5, atol=1e-5)
