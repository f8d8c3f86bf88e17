"""The layer-cached spliced pass (start at the site's layer from cached inputs) equals the full spliced
pass from the embeddings (saescope.splice.run_with_splice), on tiny random Gemma 2/3, Llama and GPT-2."""

from __future__ import annotations

import pytest
import torch
import transformers

from saescope.evaluate.layer_cache import clean_pass, mean_centered_logit_gradient, spliced_losses
from saescope.sites import hooked
from saescope.splice import run_with_splice

VOCAB = 257


def _config(name: str):
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if name == "gemma3":
        return transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=5, final_logit_softcapping=15.0,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if name == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=8, sliding_window=5, final_logit_softcapping=30.0)
    if name == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)


@pytest.fixture(scope="module", params=["gemma3", "gemma2", "llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(request.param)).eval()


SITES = ["resid_post/layer_0", "attn_out/layer_1", "mlp_out/layer_1", "mlp_in/layer_2", "resid_post/layer_2"]


def test_layer_cached_splice_equals_full_splice(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 14), generator=g)
    mask = torch.rand(3, 14, generator=g) > 0.2
    mask[:, 0] = False
    cache = clean_pass(model, ids, SITES, chunk_size=10)
    clean = run_with_splice(model, ids, None, None, chunk_size=7).loss_per_token
    torch.testing.assert_close(cache.clean_loss, clean, atol=1e-5, rtol=0)
    for site in SITES:
        x = cache.sites[site]
        noise = torch.randn(x.shape, generator=g) * x.std()
        replacement = x + noise
        cached = spliced_losses(cache, site, replacement, mask)
        full = run_with_splice(model, ids, site, lambda a, r=replacement: r, splice_mask=mask).loss_per_token
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
        assert (cached - clean).abs().max() > 1e-3  # the splice changed the losses
        zero = spliced_losses(cache, site, torch.zeros_like(x))
        full_zero = run_with_splice(model, ids, site, torch.zeros_like).loss_per_token
        torch.testing.assert_close(zero, full_zero, atol=1e-5, rtol=0)
        # the clean activation spliced back in gives back the clean loss
        torch.testing.assert_close(spliced_losses(cache, site, x.clone(), mask), clean, atol=1e-5, rtol=0)


def test_mean_centered_logit_gradient_matches_full_autograd(model):
    """App. C.3's ∇_x 𝓛 from the cached layers and chunked unembedding == autograd on the whole model."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    counted = torch.rand(2, 10, generator=g) > 0.3
    for site in ["resid_post/layer_0", "attn_out/layer_1", "mlp_out/layer_2"]:
        cache = clean_pass(model, ids, [site], chunk_size=6)
        grad = mean_centered_logit_gradient(cache, site, counted)
        assert all(p.grad is None for p in model.parameters())  # no parameter gradients left behind
        leaf = cache.sites[site].detach().clone().requires_grad_(True)
        with hooked(model, [(site, lambda _a, leaf=leaf: leaf)]), torch.enable_grad():
            logits = model(ids, use_cache=False).logits[:, :-1].double()
            metric = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.mean(-1)
            (metric * counted).sum().backward()
        torch.testing.assert_close(grad, leaf.grad, atol=1e-5, rtol=1e-4)
        assert grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)
