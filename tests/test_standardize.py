"""Standardization (Gemma Scope Appendix A, eqs. 7-11) in float64."""

import math

import torch

from saescope import JumpReLUSAE
from saescope.sae.standardize import fold_norm_scale

C = 4.25


def _trained_like(norm_scale=C, apply_b_dec=True, seed=0, d_in=16, d_sae=40):
    gen = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, norm_scale=norm_scale, dtype=torch.float64, apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64) / math.sqrt(d_in))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_sae))
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.2)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen, dtype=torch.float64) * 0.3)
        sae.threshold.copy_(torch.rand(d_sae, generator=gen, dtype=torch.float64) * 0.4 + 0.05)
    return sae


def _x(n=200, d_in=16):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * C


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_raw_latents_are_C_times_training_latents_and_reconstruction_is_unchanged():
    sae = _trained_like()
    x = _x()
    f = sae.encode(x)
    x_hat = sae.decode(f)
    raw = sae.standardize()
    assert raw.config.standardized and raw.norm_scale == 1.0 and not raw.config.apply_b_dec_to_input
    assert 0.1 < (f > 0).double().mean() < 0.9
    assert _rel(raw.encode(x), C * f) < 1e-6
    assert _rel(raw.decode(raw.encode(x)), x_hat) < 1e-6
    # the same sparsity pattern, latent by latent: two computations of z decide z > θ alike wherever no z
    # lies within float64 rounding of θ (checked, so the exact comparison holds on every CPU)
    assert (sae.pre_activations(x) - sae.threshold).abs().min() > 1e-9
    assert torch.equal(raw.encode(x) > 0, f > 0)
    # eqs. 7-9 written out
    assert torch.allclose(raw.b_enc, C * sae.b_enc - C * (sae.b_dec @ sae.W_enc))
    assert torch.allclose(raw.b_dec, C * sae.b_dec)
    assert torch.allclose(raw.threshold, C * sae.threshold)
    assert torch.equal(raw.W_enc, sae.W_enc) and torch.equal(raw.W_dec, sae.W_dec)


def test_transcoder_style_sae_without_pre_encoder_bias():
    sae = _trained_like(apply_b_dec=False)
    x = _x()
    raw = sae.standardize()
    assert _rel(raw.encode(x), C * sae.encode(x)) < 1e-6
    assert _rel(raw(x), sae(x)) < 1e-6
    assert torch.allclose(raw.b_enc, C * sae.b_enc)


def test_twice_with_unit_scale_is_the_identity():
    sae = _trained_like(norm_scale=1.0)
    once = sae.standardize()
    twice = once.standardize()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(once, name), getattr(twice, name)), name
    x = _x()
    assert torch.equal(once(x), twice(x))


def test_standardize_leaves_the_original_untouched():
    sae = _trained_like()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    sae.standardize()
    for n, p in sae.named_parameters():
        assert torch.equal(p, before[n])
    assert sae.norm_scale == C


def test_fold_norm_scale_keeps_pre_encoder_bias():
    sae = _trained_like()
    x = _x()
    folded = fold_norm_scale(sae)
    assert folded.norm_scale == 1.0 and folded.config.apply_b_dec_to_input
    assert _rel(folded.encode(x), C * sae.encode(x)) < 1e-6
    assert _rel(folded(x), sae(x)) < 1e-6
    # the formula SAELens computes with apply_b_dec_to_input: JumpReLU((x − b_dec) W_enc + b_enc)
    z = (x - folded.b_dec) @ folded.W_enc + folded.b_enc
    assert _rel(torch.where(z > folded.threshold, z, 0 * z), C * sae.encode(x)) < 1e-6
