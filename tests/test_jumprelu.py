"""The JumpReLU SAE: initialisation, forward (eqs. 5-6) and the training loss gradients, each against float64
formulas written out here independently of the library."""

import math

import pytest
import torch

from saescope import JumpReLUSAE

C = 3.7
LAM = 0.3
BAND = 0.4   # a wide window so random data lands inside it on both sides of θ


def _random_sae(d_in=12, d_sae=20, dtype=torch.float64, seed=0, band=BAND):
    gen = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, norm_scale=C, dtype=dtype, bandwidth=band, seed=seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64) / math.sqrt(d_in))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_sae))
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen, dtype=torch.float64) * 0.1)
        sae.threshold.copy_(torch.rand(d_sae, generator=gen, dtype=torch.float64) * 0.5 + 0.05)
    return sae


def _inputs(n=64, d_in=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=torch.float64) * C


def test_initialisation_follows_the_recipe():
    sae = JumpReLUSAE(d_in=64, d_sae=256, norm_scale=5.0, seed=3)
    assert sae.W_enc.dtype == torch.float32 and sae.threshold.dtype == torch.float32
    assert tuple(sae.W_enc.shape) == (64, 256) and tuple(sae.W_dec.shape) == (256, 64)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-6)   # unit-norm decoder rows
    assert torch.equal(sae.W_enc, sae.W_dec.T)                                 # W_enc = W_decᵀ
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0
    assert torch.all(sae.threshold == 0.001)
    # He-uniform directions: not all equal, roughly isotropic
    assert sae.W_dec.std() > 0.05
    same = JumpReLUSAE(d_in=64, d_sae=256, seed=3)
    assert torch.equal(same.W_dec, sae.W_dec)


def test_bfloat16_sae_keeps_float32_threshold():
    sae = JumpReLUSAE(d_in=16, d_sae=32, dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.threshold.dtype == torch.float32
    out = sae.training_forward(torch.randn(4, 16), 0.1)
    out.loss.backward()
    assert sae.threshold.grad.dtype == torch.float32


def test_forward_matches_plain_float64():
    sae = _random_sae(dtype=torch.float32)
    x = _inputs().float()
    f = sae.encode(x)
    x_hat = sae(x)
    W_enc, b_enc, W_dec, b_dec, th = (getattr(sae, n).detach().double()
                                      for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    x64 = x.double()
    z = (x64 / C - b_dec) @ W_enc + b_enc                     # eq. 5, argument of JumpReLU
    f_ref = torch.where(z > th, z, torch.zeros_like(z))
    x_hat_ref = C * (f_ref @ W_dec + b_dec)                   # eq. 6
    assert 0 < (f_ref > 0).float().mean() < 1
    assert torch.allclose(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x_hat.double(), x_hat_ref, rtol=1e-5, atol=1e-4)


def test_input_width_is_checked():
    sae = JumpReLUSAE(d_in=8, d_sae=16)
    with pytest.raises(ValueError, match="d_in=8"):
        sae.encode(torch.zeros(2, 9))


def test_training_loss_and_every_gradient_against_float64_formulas():
    sae = _random_sae()
    x_raw = _inputs()
    out = sae.training_forward(x_raw, LAM)
    out.loss.backward()

    W_enc, b_enc, W_dec, b_dec, th = (getattr(sae, n).detach()
                                      for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    B = x_raw.shape[0]
    x = x_raw / C
    u = x - b_dec
    z = u @ W_enc + b_enc
    fired = (z > th).double()
    window = ((z - th).abs() < BAND / 2).double()          # K((z − θ)/ε)
    f = z * fired
    x_hat = f @ W_dec + b_dec
    r = x - x_hat
    l0 = fired.sum(1)
    loss = ((r ** 2).sum(1) + LAM * l0).mean()
    # the case covers both sides of θ inside the window, and outside it
    assert (window * fired).sum() > 5 and (window * (1 - fired)).sum() > 5 and (1 - window).sum() > 5

    assert torch.allclose(out.loss.detach(), loss, rtol=1e-12)
    assert torch.allclose(out.l0.detach(), l0) and torch.allclose(out.latents.detach(), f)

    d_xhat = -2 * r / B
    d_f = d_xhat @ W_dec.T
    d_z = d_f * fired                                        # ∂J/∂z = H(z − θ); ∂H/∂z = 0
    grads = {
        "W_dec": f.T @ d_xhat,
        "W_enc": u.T @ d_z,
        "b_enc": d_z.sum(0),
        "b_dec": d_xhat.sum(0) - (d_z @ W_enc.T).sum(0),
        # θ: reconstruction term through JumpReLU, −(θ/ε)K, and sparsity term through H, −(1/ε)K
        "threshold": (d_f * (-(th / BAND)) * window).sum(0) + (LAM / B) * ((-1.0 / BAND) * window).sum(0),
    }
    for name, expected in grads.items():
        got = getattr(sae, name).grad
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), name
    assert (sae.threshold.grad != 0).sum() > 0


def test_gradients_are_the_true_derivatives_away_from_the_threshold():
    """Where no pre-activation is near its threshold the STE gradients of the weights are exact: finite differences."""
    sae = _random_sae(band=1e-6)
    x_raw = _inputs(n=16)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]

    def loss_fn(*ps):
        with torch.no_grad():
            for p, v in zip(params, ps):
                p.copy_(v)
        return sae.training_forward(x_raw, LAM).loss

    base = [p.detach().clone() for p in params]
    sae.zero_grad()
    sae.training_forward(x_raw, LAM).loss.backward()
    analytic = [p.grad.clone() for p in params]
    gen = torch.Generator().manual_seed(5)
    h = 1e-6
    for i, p0 in enumerate(base):
        for _ in range(4):
            idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in p0.shape)
            plus = [b.clone() for b in base]
            minus = [b.clone() for b in base]
            plus[i][idx] += h
            minus[i][idx] -= h
            fd = (loss_fn(*plus) - loss_fn(*minus)).item() / (2 * h)
            assert fd == pytest.approx(analytic[i][idx].item(), rel=1e-5, abs=1e-7)
