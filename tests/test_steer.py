"""Steering (activation addition): the latent's own activation rises by exactly α·(W_enc[:,i]·W_dec[i]) at the
steered positions, generation follows, and the logits move toward the latent's top logit-effect tokens."""

from __future__ import annotations

import pytest
import torch
from dash_helpers import make_model, make_sae, make_tokenizer

from saescope.dashboards.logit_effect import logit_effect
from saescope.errors import SaescopeError
from saescope.steer import SteerSettings, steer, steered_forward, steering_vector

PROMPT = "the king said to his queen"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=3)
    return tokenizer, model


def _sae(site: str, norm_scale: float = 0.5):
    sae = make_sae(32, 24, site, seed=2, norm_scale=norm_scale)
    with torch.no_grad():
        sae.threshold.fill_(1e-3)
    return sae


def greedy_with_hook(model, tokenizer, module, hook, n_tokens):
    """Independent reference: greedy decoding with no KV cache and a forward hook on ``module``."""
    handle = module.register_forward_hook(hook)
    try:
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        out = []
        with torch.no_grad():
            for _ in range(n_tokens):
                token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    finally:
        handle.remove()
    return out


def test_steering_raises_the_latent_at_the_steered_positions(tiny):
    tokenizer, model = tiny
    sae = _sae("resid_post/layer_0")
    i, alpha = 7, 3.0
    result = steer(model, tokenizer, sae, i, PROMPT, SteerSettings(coefficient=alpha, max_new_tokens=6))
    assert len(result.steered_ids) == 6 and len(result.unsteered_ids) == 6
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    # teacher-force the steered continuation with and without the addition
    ids = torch.cat([prompt_ids, result.steered_ids])
    f_steer, _ = steered_forward(model, sae, i, ids, alpha)
    f_plain, _ = steered_forward(model, sae, i, ids, 0.0)
    later = slice(len(prompt_ids), None)
    assert (f_steer[later, i] > f_plain[later, i]).all()
    # float64 reference for the pre-activation shift: α·C·W_dec[i] at the input of eq. 5 is α·(W_dec[i]·W_enc[:,i])
    shift = alpha * float(sae.W_dec[i].detach().double() @ sae.W_enc[:, i].detach().double())
    both = (f_steer[:, i] > 0) & (f_plain[:, i] > 0)
    assert both.any()
    assert torch.allclose((f_steer[both, i] - f_plain[both, i]).double(), torch.full((int(both.sum()),), shift, dtype=torch.float64),
                          rtol=1e-4, atol=1e-4)


def test_generation_matches_an_uncached_reference_loop(tiny):
    tokenizer, model = tiny
    sae = _sae("resid_post/layer_0")
    i, alpha = 4, 5.0
    got = steer(model, tokenizer, sae, i, PROMPT, SteerSettings(coefficient=alpha, max_new_tokens=5)).steered_ids
    vec = steering_vector(sae, i)
    want = greedy_with_hook(model, tokenizer, model.model.layers[0],
                            lambda m, a, out: (out[0] + alpha * vec, *out[1:]) if isinstance(out, tuple)
                            else out + alpha * vec, 5)
    assert got.tolist() == want


def test_steering_shifts_logits_toward_top_logit_effect_tokens(tiny):
    tokenizer, model = tiny
    site = "resid_post/layer_1"  # the last block: the addition reaches the unembedding through the final norm
    sae = _sae(site)
    i = 11
    effect = logit_effect(model, site, steering_vector(sae, i)[None])[0]
    top = effect.topk(5).indices
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    _, plain = steered_forward(model, sae, i, ids, 0.0)
    _, steered = steered_forward(model, sae, i, ids, 4.0)
    change = torch.log_softmax(steered, -1) - torch.log_softmax(plain, -1)
    assert (change[:, top].mean(1) > change.mean(1) + 0.05).all()
    # a large α makes the top logit-effect token the greedy choice everywhere
    result = steer(model, tokenizer, sae, i, PROMPT, SteerSettings(coefficient=500.0, max_new_tokens=4))
    assert result.steered_ids.tolist() == [int(top[0])] * 4
    assert result.steered != result.unsteered
    # and a middle-layer site still moves the logits toward them on average
    mid = _sae("resid_post/layer_0")
    effect = logit_effect(model, "resid_post/layer_0", steering_vector(mid, i)[None])[0]
    _, plain = steered_forward(model, mid, i, ids, 0.0)
    _, steered = steered_forward(model, mid, i, ids, 4.0)
    change = torch.log_softmax(steered, -1) - torch.log_softmax(plain, -1)
    assert change[:, effect.topk(5).indices].mean() > change.mean()


def test_bad_input(tiny):
    tokenizer, model = tiny
    sae = _sae("resid_post/layer_0")
    with pytest.raises(SaescopeError, match="latent 99 does not exist"):
        steer(model, tokenizer, sae, 99, PROMPT, SteerSettings(coefficient=1.0))
    wrong = make_sae(16, 4, "resid_post/layer_0")
    with pytest.raises(SaescopeError, match="d_in=16"):
        steer(model, tokenizer, wrong, 0, PROMPT, SteerSettings(coefficient=1.0))
    with pytest.raises(SaescopeError, match="does not exist"):
        steer(model, tokenizer, make_sae(32, 4, "resid_post/layer_9"), 0, PROMPT, SteerSettings(coefficient=1.0))


def test_transcoder_steers_where_its_decoder_writes(tiny):
    """A transcoder reads mlp_in but its decoder writes mlp_out: steering adds there (Llama: the MLP output)."""
    tokenizer, model = tiny
    sae = make_sae(32, 6, "mlp_in/layer_0", seed=4)
    sae.config = sae.config.model_copy(update={"training": {"kind": "transcoder", "target_site": "mlp_out/layer_0"}})
    i, alpha = 2, 30.0
    got = steer(model, tokenizer, sae, i, PROMPT, SteerSettings(coefficient=alpha, max_new_tokens=4)).steered_ids
    vec = steering_vector(sae, i)
    want = greedy_with_hook(model, tokenizer, model.model.layers[0].mlp, lambda m, a, out: out + alpha * vec, 4)
    assert got.tolist() == want
    plain = steer(model, tokenizer, sae, i, PROMPT, SteerSettings(coefficient=0.0, max_new_tokens=4)).steered_ids
    assert got.tolist() != plain.tolist()
