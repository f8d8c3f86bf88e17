"""Dashboards: the one-pass streaming selection equals brute force over all rows; the logit effect equals a
float64 computation by hand; every corpus string is escaped in the HTML."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dash_helpers import SCRIPT, documents, make_model, make_sae, make_tokenizer, write_store

from saescope.dashboards import (
    DashboardSettings,
    build_dashboards,
    compute_latent_stats,
    load_latent,
    load_summary,
)
from saescope.dashboards.logit_effect import logit_effect
from saescope.dashboards.store_reader import iter_site_rows, read_token_table
from saescope.errors import SaescopeError

SITE = "resid_post/layer_0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    store = tmp / "store"
    write_store(store, model, tokenizer, SITE, documents(60), shard_rows=50)
    from saescope.store import StoreIndex

    sae = make_sae(32, 48, SITE, norm_scale=StoreIndex.load(store).sites[SITE].norm_scale)
    return tmp, tokenizer, model, store, sae


def brute_force(sae, store):
    x = torch.cat([b for _, b in iter_site_rows(store, SITE, block_rows=10_000)])
    with torch.no_grad():
        return sae.encode(x)


@pytest.mark.parametrize("block_rows", [7, 64, 5000])
def test_streaming_topk_equals_brute_force(setup, block_rows):
    _, _, _, store, sae = setup
    settings = DashboardSettings(top_k=5, n_samples=6, context_before=3, context_after=2, block_rows=block_rows)
    stats = compute_latent_stats(sae, store, settings=settings, progress=False)
    f = brute_force(sae, store).double()
    n = f.shape[0]
    assert stats.rows_seen == n
    fired = 0
    for i in range(sae.d_sae):
        col = f[:, i]
        firing = (col > 0).nonzero().flatten().tolist()
        fired += bool(firing)
        assert int(stats.count[i]) == len(firing)
        assert math.isclose(float(stats.sum[i]), float(col.sum()), rel_tol=1e-5, abs_tol=1e-6)
        # top-k: by value descending, ties by earlier row. The blocked pass and this one-block product sum in
        # another order, so two values within float32 rounding may swap (seen on AVX2 with 7-row blocks): the
        # rows must be the reference's except where the reference values of the two rows are that close.
        order = sorted(firing, key=lambda r: (-float(col[r]), r))[:5]
        got = [r for r in stats.top_rows[i].tolist() if r >= 0]
        assert len(got) == len(order) and len(set(got)) == len(got) and set(got) <= set(firing)
        tol = 1e-5 * float(col.abs().max()) + 1e-6
        for r_got, r_ref in zip(got, order):
            assert r_got == r_ref or abs(float(col[r_got]) - float(col[r_ref])) <= tol, (i, got, order)
        assert torch.allclose(stats.top_values[i, :len(got)].double(), col[order], rtol=1e-5)
        assert torch.allclose(stats.top_values[i, :len(got)].double(), col[got], rtol=1e-5)
        # windows hold the latent's activation at rows row-3 .. row+2 (0 outside the store)
        for j, r in enumerate(got):
            for o in range(-3, 3):
                want = float(col[r + o]) if 0 <= r + o < n else 0.0
                assert stats.top_windows[i, j, o + 3] == pytest.approx(want, rel=1e-5, abs=1e-6)
        # the sample: min(count, n_samples) distinct firing rows with their true activations
        rows = [r for r in stats.sample_rows[i].tolist() if r >= 0]
        assert len(rows) == min(6, len(firing)) and len(set(rows)) == len(rows)
        assert set(rows) <= set(firing)
        vals = stats.sample_values[i, :len(rows)].double()
        assert torch.allclose(vals, col[rows], rtol=1e-5)
        # histogram over the fixed log bins == numpy's
        pos = col[col > 0].numpy()
        edges = stats.edges
        idx = np.clip(np.floor((np.log10(pos) - np.log10(edges[0])) / np.diff(np.log10(edges))[0]), 0,
                      len(edges) - 2).astype(int)
        assert stats.histogram[i].tolist() == np.bincount(idx, minlength=len(edges) - 1).tolist()
    assert 10 < fired <= sae.d_sae  # the test data actually exercises the selection


def test_samples_are_uniform_over_firings(setup):
    """The reservoir keeps each firing with equal chance: over seeds, rows are picked ~n_samples/count each."""
    _, _, _, store, sae = setup
    f = brute_force(sae, store)
    i = int((f > 0).sum(0).argmax())
    count = int((f[:, i] > 0).sum())
    hits = torch.zeros(f.shape[0])
    seeds = 40
    for seed in range(seeds):
        s = DashboardSettings(top_k=1, n_samples=10, block_rows=300, seed=seed)
        stats = compute_latent_stats(sae, store, settings=s, progress=False)
        for r in stats.sample_rows[i].tolist():
            hits[r] += 1
    assert hits[f[:, i] <= 0].sum() == 0
    rate = hits[f[:, i] > 0] / seeds
    assert rate.mean().item() == pytest.approx(10 / count, rel=1e-6)
    # high-activation rows are not favoured: the rows above the median get about half the picks
    vals = f[f[:, i] > 0, i]
    above = rate[vals > vals.median()].sum() / rate.sum()
    assert 0.35 < float(above) < 0.65


def test_logit_effect_matches_float64(setup):
    _, _, model, _, sae = setup
    d = sae.W_dec.detach()[:5] * sae.norm_scale
    got = logit_effect(model, SITE, d)
    gamma = model.model.norm.weight.detach().double()  # Llama RMSNorm gain: w (no offset)
    want = (d.double() * gamma) @ model.lm_head.weight.detach().double().T
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # Gemma's RMSNorm multiplies by (1 + w): check the offset with a tiny Gemma 3
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           final_logit_softcapping=30.0)
    gemma = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        gemma.model.norm.weight.normal_()
    dirs = torch.randn(3, 16)
    got = logit_effect(gemma, "resid_post/layer_1", dirs)
    want = (dirs.double() * (1 + gemma.model.norm.weight.double())) @ gemma.lm_head.weight.double().T
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # attn_out is mapped through W_O and the post-attention norm gain first
    dirs = torch.randn(2, 16)
    got = logit_effect(gemma, "attn_out/layer_0", dirs)
    layer = gemma.model.layers[0]
    resid = (dirs.double() @ layer.self_attn.o_proj.weight.double().T) * (
        1 + layer.post_attention_layernorm.weight.double())
    want = (resid * (1 + gemma.model.norm.weight.double())) @ gemma.lm_head.weight.double().T
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert logit_effect(gemma, "mlp_in/layer_0", torch.randn(2, 16)) is None


def test_build_writes_escaped_html_and_records(setup):
    tmp, tokenizer, model, store, sae = setup
    settings = DashboardSettings(top_k=4, n_samples=8, context_before=4, context_after=2, block_rows=40)
    out = build_dashboards(sae, store, tokenizer, model, out=tmp / "dash", settings=settings, progress=False)
    summary = load_summary(out)
    assert summary["d_sae"] == 48 and len(summary["latents"]) == 48
    table = read_token_table(store)
    f = brute_force(sae, store)
    # find a latent whose top contexts include the <script> token and check its page shows it as text
    script_id = tokenizer.convert_tokens_to_ids(SCRIPT)
    script_row = int(np.nonzero(table.token_ids == script_id)[0][0])
    i = int(f[script_row].argmax())
    record = load_latent(out, summary, i)
    assert record["index"] == i and record["count"] == int((f[:, i] > 0).sum())
    texts = ["".join(ex["tokens"]) for ex in record["top"] + [e for g in record["quantiles"] for e in g["examples"]]]
    for ex in record["top"]:
        r = ex["row"]
        assert ex["tokens"][ex["focus"]].strip() == tokenizer.convert_ids_to_tokens(int(table.token_ids[r]))
        assert ex["acts"][ex["focus"]] == pytest.approx(float(f[r, i]), rel=1e-5)
        # the context never crosses into another document
        lo = r - ex["focus"]
        assert set(table.document_ids[lo:lo + len(ex["tokens"])].tolist()) == {table.document_ids[r]}
    page = (out / "latents" / f"{i}.html").read_text()
    assert "<script>alert" not in page
    if any(SCRIPT in t for t in texts):
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    # the whole folder never contains the raw script tag, and the index lists every latent
    for file in (out / "latents").glob("*.html"):
        assert "<script>alert" not in file.read_text()
    index = (out / "index.html").read_text()
    assert index.count("<tr data-index=") == 48 and "http" not in index
    # logit effect records match the float64 ranking
    eff = (sae.W_dec.detach()[i].double() * sae.norm_scale * model.model.norm.weight.double()) \
        @ model.lm_head.weight.double().T
    top_ids = eff.topk(settings.logit_k).indices.tolist()
    assert [t.strip() for t, _ in record["logits"]["top"]] == tokenizer.convert_ids_to_tokens(top_ids)
    json.dumps(record)


def test_script_token_is_escaped_in_a_context(setup):
    """Force the <script> token into a top context: a latent whose encoder reads exactly that row."""
    tmp, tokenizer, _model, store, _sae = setup
    table = read_token_table(store)
    script_row = int(np.nonzero(table.token_ids == tokenizer.convert_tokens_to_ids(SCRIPT))[0][0])
    x = torch.cat([b for _, b in iter_site_rows(store, SITE, 10_000)])
    probe = make_sae(32, 2, SITE, seed=5)  # norm scale 1: raw rows
    with torch.no_grad():
        probe.W_enc[:, 0] = x[script_row] / x[script_row].norm() ** 2 * 5
        probe.threshold.fill_(4.0)
    out = build_dashboards(probe, store, tokenizer, None, out=tmp / "probe",
                           settings=DashboardSettings(top_k=1, n_samples=0), progress=False)
    record = load_latent(out, load_summary(out), 0)
    assert record["top"][0]["row"] == script_row
    page = (out / "latents" / "0.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script>alert" not in page


def test_bad_input_is_refused(setup):
    tmp, _tokenizer, _, store, sae = setup
    other = make_sae(16, 4, SITE)
    with pytest.raises(SaescopeError, match="d_in=16"):
        compute_latent_stats(other, store, progress=False)
    with pytest.raises(SaescopeError, match="not in the store"):
        compute_latent_stats(sae, store, "resid_post/layer_1", progress=False)
    with pytest.raises(SaescopeError, match="no activation store"):
        compute_latent_stats(sae, tmp / "nowhere", progress=False)
    with pytest.raises(ValueError):
        DashboardSettings(block_rows=2, context_after=4)
