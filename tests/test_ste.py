"""The straight-through estimators against the JumpReLU paper's pseudo-derivatives written out in float64."""

import pytest
import torch

from saescope.sae.ste import heaviside, jumprelu, rectangle_kernel

EPS = 0.01


def _points(theta: torch.Tensor) -> torch.Tensor:
    """Pre-activations [8, d] around each threshold: far above/below and inside the window on both sides."""
    offsets = torch.tensor([0.5, -0.5, 0.3 * EPS, -0.3 * EPS, 0.49 * EPS, -0.49 * EPS, 0.6 * EPS, -0.6 * EPS],
                           dtype=torch.float64)
    return theta[None, :] + offsets[:, None]


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(0)
    theta = torch.rand(5, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    z = _points(theta)
    grad_out = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    return z, theta, grad_out


def _expected_window(z, theta):
    # K((z − θ)/ε) = 1{|z − θ| < ε/2}, written without the library's kernel
    return ((z - theta).abs() < EPS / 2).to(torch.float64)


def test_rectangle_kernel_closed_form():
    u = torch.tensor([-0.75, -0.5, -0.49, 0.0, 0.49, 0.5, 0.75], dtype=torch.float64)
    assert rectangle_kernel(u).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_jumprelu_forward_and_pseudo_derivatives(case):
    z, theta, g = case
    z = z.clone().requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    out = jumprelu(z, th, EPS)
    fired = (z.detach() > theta).to(torch.float64)
    assert torch.equal(out.detach(), z.detach() * fired)
    (out * g).sum().backward()
    # ∂J/∂z := H(z − θ)
    assert torch.allclose(z.grad, g * fired, rtol=0, atol=1e-15)
    # ∂J/∂θ := −(θ/ε) K((z − θ)/ε), summed over the batch
    expected = (g * (-(theta / EPS)) * _expected_window(z.detach(), theta)).sum(0)
    assert torch.allclose(th.grad, expected, rtol=1e-12, atol=1e-12)
    # the case really covers every region: inside the window on both sides, and outside it
    window = _expected_window(z.detach(), theta)
    assert window.sum() > 0 and (window == 0).sum() > 0
    assert ((window > 0) & (fired > 0)).any() and ((window > 0) & (fired == 0)).any()
    assert (th.grad != 0).all()


def test_heaviside_forward_and_pseudo_derivatives(case):
    z, theta, g = case
    z = z.clone().requires_grad_(True)
    th = theta.clone().requires_grad_(True)
    out = heaviside(z, th, EPS)
    assert torch.equal(out.detach(), (z.detach() > theta).to(torch.float64))
    (out * g).sum().backward()
    # ∂H/∂z := 0 (no gradient to the pre-activations through the step)
    assert torch.count_nonzero(z.grad) == 0
    # ∂H/∂θ := −(1/ε) K((z − θ)/ε)
    expected = (g * (-1.0 / EPS) * _expected_window(z.detach(), theta)).sum(0)
    assert torch.allclose(th.grad, expected, rtol=1e-12, atol=1e-12)


def test_latent_just_below_threshold_still_moves_theta():
    """dictionary_learning #55: the L0 term must come from H(z − θ), so f = 0 just below θ still gives θ gradient."""
    theta = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[0.2 - EPS / 4]], dtype=torch.float64, requires_grad=True)
    f = jumprelu(z, theta, EPS)
    assert f.item() == 0.0
    heaviside(z, theta, EPS).sum().backward()
    assert theta.grad.item() == pytest.approx(-1.0 / EPS)
    # whereas the post-activation version H(f − θ) sees f = 0, far from θ, and gives nothing
    theta2 = theta.detach().clone().requires_grad_(True)
    heaviside(f.detach(), theta2, EPS).sum().backward()
    assert theta2.grad.item() == 0.0


def test_float32_threshold_with_bfloat16_preactivations():
    """θ kept in float32 (SAELens PR #728): gradients come back in float32 and the step compares in float32."""
    theta = torch.full((3,), 0.001, dtype=torch.float32, requires_grad=True)
    z = torch.tensor([[0.00102, 0.0009, 0.5]], dtype=torch.bfloat16, requires_grad=True)
    out = jumprelu(z, theta, 0.001)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert theta.grad.dtype == torch.float32
    assert z.grad.dtype == torch.bfloat16
    expected_fire = (z.detach().float() > theta.detach()).tolist()[0]
    assert [bool(v) for v in (out.detach()[0] != 0).tolist()] == expected_fire
