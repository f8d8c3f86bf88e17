"""Gemma Scope 2 loss variants: the quadratic target-L0 penalty and the Matryoshka reconstruction, checked
against float64 formulas written out here and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from saescope import JumpReLUSAE
from saescope.sae.losses import check_prefixes, matryoshka_reconstruction, quadratic_l0_penalty
from tests.loss_cases import loss

C, LAM, BAND, TARGET = 2.5, 0.2, 0.4, 6.0
D_IN, D_SAE, N = 10, 24, 48


def random_sae(seed=0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(D_IN, D_SAE, norm_scale=C, dtype=torch.float64, bandwidth=BAND, seed=seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g, dtype=torch.float64) / math.sqrt(D_IN))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g, dtype=torch.float64) / math.sqrt(D_SAE))
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g, dtype=torch.float64) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g, dtype=torch.float64) * 0.1)
        sae.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64) * 0.5 + 0.05)
    return sae


def inputs(seed=1):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * C


def grads(sae, **kw):
    sae.zero_grad()
    out = sae.training_forward(inputs(), loss(LAM, **kw))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_quadratic_penalty_value_and_threshold_gradient_match_float64_formula():
    sae = random_sae()
    out, g = grads(sae, target_l0=TARGET)
    _, g_plain = grads(sae, target_l0=None)
    _, g_rec = grads_without_penalty(sae)
    z = out.pre_activations.detach()
    th = sae.threshold.detach()
    fires = (z > th).double()
    l0 = fires.sum(1)
    rec = (out.x - out.x_hat).pow(2).sum(1).detach()
    expected_loss = (rec + LAM * (2 / TARGET) * (l0 - TARGET) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), expected_loss, rtol=1e-12, atol=1e-12)
    # ∂/∂θ_i of mean_b λ(2/T)(L0_b − T)²  =  mean_b λ(4/T)(L0_b − T)·(−1/ε)·K((z_bi − θ_i)/ε)
    window = ((z - th).abs() < BAND / 2).double()
    assert window.sum() > 10 and fires.sum() > 10 and (1 - fires).sum() > 10
    d_pen = (LAM * (4 / TARGET) * (l0 - TARGET)[:, None] * (-1 / BAND) * window).mean(0)
    torch.testing.assert_close(g["threshold"], g_rec["threshold"] + d_pen, rtol=1e-10, atol=1e-12)
    # no gradient reaches the pre-activations through the step: every other gradient is the reconstruction's
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(g[name], g_rec[name], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(g["threshold"], g_plain["threshold"])


def test_batch_mean_quadratic_penalty_matches_float64_formula():
    """target_l0_over = "batch": λ(2/T)(mean_b L0_b − T)², its θ-gradient λ(4/T)(mean L0 − T)·mean_b ∂H_bi/∂θ_i."""
    sae = random_sae()
    out, g = grads(sae, target_l0=TARGET, target_l0_over="batch")
    _, g_token = grads(sae, target_l0=TARGET)
    _, g_rec = grads_without_penalty(sae)
    z, th = out.pre_activations.detach(), sae.threshold.detach()
    l0 = (z > th).double().sum(1)
    assert l0.std() > 1                       # tokens differ, so the two forms differ
    rec = (out.x - out.x_hat).pow(2).sum(1).detach()
    expected = rec.mean() + LAM * (2 / TARGET) * (l0.mean() - TARGET) ** 2
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-12, atol=1e-12)
    window = ((z - th).abs() < BAND / 2).double()
    d_pen = LAM * (4 / TARGET) * (l0.mean() - TARGET) * ((-1 / BAND) * window).mean(0)
    torch.testing.assert_close(g["threshold"], g_rec["threshold"] + d_pen, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(g["threshold"], g_token["threshold"])
    with pytest.raises(ValueError, match="target_l0_over"):
        loss(LAM, target_l0=TARGET, target_l0_over="window")


def grads_without_penalty(sae):
    sae.zero_grad()
    out = sae.training_forward(inputs(), 0.0)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_quadratic_penalty_is_zero_at_target_and_refuses_bad_targets():
    l0 = torch.tensor([6.0, 3.0, 9.0])
    torch.testing.assert_close(quadratic_l0_penalty(l0, 6.0), torch.tensor([0.0, 3.0, 3.0]))
    with pytest.raises(ValueError, match="positive"):
        quadratic_l0_penalty(l0, 0.0)


def test_matryoshka_with_one_full_prefix_is_the_plain_loss():
    sae = random_sae()
    out_m, g_m = grads(sae, matryoshka_prefixes=[D_SAE])
    out_p, g_p = grads(sae)
    torch.testing.assert_close(out_m.loss, out_p.loss, rtol=1e-14, atol=0)   # two code paths: rounding only
    for name in g_p:
        torch.testing.assert_close(g_m[name], g_p[name], rtol=1e-14, atol=1e-14)


PREFIXES, WEIGHTS = [4, 10, D_SAE], [0.5, 1.0, 2.0]


def reference_loss(params, x_raw):
    """Each prefix's reconstruction computed on its own (not cumulatively), float64."""
    W_enc, b_enc, W_dec, b_dec, th = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    x = x_raw / C
    z = (x - b_dec) @ W_enc + b_enc
    f = z * (z > th)
    total = 0
    for m, w in zip(PREFIXES, WEIGHTS):
        total = total + w * (x - (f[:, :m] @ W_dec[:m] + b_dec)).pow(2).sum(1)
    l0 = (z > th).double().sum(1)
    return (total + LAM * l0).mean()


def test_matryoshka_loss_and_gradients_match_float64_reference():
    sae = random_sae()
    out, g = grads(sae, matryoshka_prefixes=PREFIXES, matryoshka_weights=WEIGHTS)
    params = {n: p.detach().clone() for n, p in sae.named_parameters()}
    x = inputs()
    torch.testing.assert_close(out.loss.detach(), reference_loss(params, x), rtol=1e-12, atol=1e-12)
    # smooth parameters: central finite differences (a step too small to move any z across θ)
    h = 1e-6
    for name in ("W_dec", "b_dec", "W_enc", "b_enc"):
        p = params[name]
        for idx in [tuple(torch.randint(0, s, (1,)).item() for s in p.shape) for _ in range(6)]:
            plus = dict(params)
            minus = dict(params)
            plus[name] = p.clone()
            minus[name] = p.clone()
            plus[name][idx] += h
            minus[name][idx] -= h
            fd = (reference_loss(plus, x) - reference_loss(minus, x)) / (2 * h)
            torch.testing.assert_close(g[name][idx], fd, rtol=1e-5, atol=1e-8)
    # θ: the JumpReLU pseudo-derivative −(θ/ε)K through every prefix that holds the latent, plus λ·∂L0/∂θ
    W_dec, b_dec, th = params["W_dec"], params["b_dec"], params["threshold"]
    xn = x / C
    z = (xn - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    f = z * (z > th)
    window = ((z - th).abs() < BAND / 2).double()
    d_f = torch.zeros_like(f)   # ∂(per-token loss)/∂f
    for m, w in zip(PREFIXES, WEIGHTS):
        resid = xn - (f[:, :m] @ W_dec[:m] + b_dec)
        d_f[:, :m] += w * (-2 * resid @ W_dec[:m].T)
    d_th = (d_f * (-th / BAND) * window + LAM * (-1 / BAND) * window).mean(0)
    assert window.sum() > 10
    torch.testing.assert_close(g["threshold"], d_th, rtol=1e-10, atol=1e-12)


def test_matryoshka_cumulative_sum_equals_separate_prefixes():
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)
    W_dec, b_dec = torch.randn(7, 3, generator=g), torch.randn(3, generator=g)
    got = matryoshka_reconstruction(x, f, W_dec, b_dec, [2, 5, 7], [1.0, 0.0, 3.0])
    want = (x - (f[:, :2] @ W_dec[:2] + b_dec)).pow(2).sum(1) + 3 * (x - (f @ W_dec + b_dec)).pow(2).sum(1)
    torch.testing.assert_close(got, want)


def test_bad_prefixes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="strictly increasing"):
        check_prefixes([4, 4, 8], None, 8)
    with pytest.raises(ValueError, match=r"full width d_sae=8.*\[2, 4, 8\]"):
        check_prefixes([2, 4], None, 8)
    with pytest.raises(ValueError, match="one non-negative weight per prefix"):
        check_prefixes([2, 8], [1.0], 8)
