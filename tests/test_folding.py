"""Folding the pre-MLP norm gain into the MLP input matrices (Gemma Scope App. B)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import N_LAYERS, tiny_ids, tiny_model

from saescope.folding import fold_mlp_in_norm, mlp_in_is_folded
from saescope.sites import decoder_layers, read_sites


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "llama", "gpt2", "qwen2", "qwen3", "mistral", "gemma3_multimodal", "gemma"])
def test_folding_keeps_logits(arch):
    model = tiny_model(arch)
    ids = tiny_ids(batch=3, seq=12)
    before = _logits(model, ids)
    assert not mlp_in_is_folded(model)
    assert fold_mlp_in_norm(model) is model
    assert mlp_in_is_folded(model)
    after = _logits(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    fold_mlp_in_norm(model)  # a second fold is a no-op
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "llama"])
def test_folded_mlp_in_is_the_gain_free_normalized_input(arch):
    """After folding, mlp_in = x / rms(x) where x is the residual stream entering the MLP (App. B)."""
    model = tiny_model(arch, dtype=torch.float64)
    ids = tiny_ids()
    layer = 1
    clean = read_sites(model, ids, [f"resid_post/layer_{layer}", f"mlp_out/layer_{layer}",
                                    f"mlp_in/layer_{layer}"])
    resid_mid = clean[f"resid_post/layer_{layer}"] - clean[f"mlp_out/layer_{layer}"]
    fold_mlp_in_norm(model)
    folded = read_sites(model, ids, f"mlp_in/layer_{layer}")[f"mlp_in/layer_{layer}"]
    norm = decoder_layers(model)[layer].pre_feedforward_layernorm if arch.startswith("gemma") else \
        decoder_layers(model)[layer].post_attention_layernorm
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    expected = resid_mid / torch.sqrt(resid_mid.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clean[f"mlp_in/layer_{layer}"], folded, atol=1e-3)


def test_gemma_gain_convention_is_one_plus_w():
    model = tiny_model("gemma3")
    fold_mlp_in_norm(model)
    for block in decoder_layers(model):
        assert torch.equal(block.pre_feedforward_layernorm.weight, torch.zeros(32))  # (1 + 0) = 1
        assert not torch.equal(block.post_feedforward_layernorm.weight, torch.zeros(32))  # post-norms untouched
    model = tiny_model("llama")
    fold_mlp_in_norm(model)
    for block in decoder_layers(model):
        assert torch.equal(block.post_attention_layernorm.weight, torch.ones(32))


def test_gpt2_layernorm_bias_moves_into_c_fc_bias():
    model = tiny_model("gpt2")
    assert len(decoder_layers(model)) == N_LAYERS
    fold_mlp_in_norm(model)
    for block in decoder_layers(model):
        assert torch.equal(block.ln_2.bias, torch.zeros(32))
        assert torch.equal(block.ln_2.weight, torch.ones(32))
