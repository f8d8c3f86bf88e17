"""The frequency penalty (issue 17; docs/training.md): ``λ·μ·Σ_i ψ(p_i)``, ``ψ(p) = max(p − c, 0)²/c``,
``p_i`` the fraction of the batch's tokens on which latent i fires, its gradient reaching θ through the
Heaviside straight-through estimator.

References: float64 formulas written out here (NumPy), finite differences of ψ, and finite differences of the
kernel-smoothed loss whose derivative the straight-through estimator is (on data built so that the smoothed
frequencies equal the true ones at θ), on the dense step and both sparse paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.losses import (
    DEFAULT_FREQUENCY_CAP,
    DEFAULT_FREQUENCY_PENALTY,
    DEFAULT_TARGET_FREQUENCY_CAP,
    LossOptions,
    frequency_excess,
    frequency_slope,
    frequency_term,
)
from saescope.train import sparse_kernels
from saescope.train.config import SAESpec
from saescope.train.fast_path import dense_training_step, sparse_training_step
from tests.loss_cases import params


def test_psi_and_its_slope_against_finite_differences():
    cap = 0.1
    p = torch.tensor([0.0, 0.05, 0.0999, 0.1001, 0.2, 0.55, 1.0], dtype=torch.float64)
    expected = np.maximum(p.numpy() - cap, 0) ** 2 / cap
    np.testing.assert_allclose(frequency_excess(p, cap).numpy(), expected, rtol=1e-15, atol=0)
    h = 1e-7
    inside = p[(p - cap).abs() > 1e-3]          # away from the kink at the cap
    fd = (frequency_excess(inside + h, cap) - frequency_excess(inside - h, cap)) / (2 * h)
    torch.testing.assert_close(frequency_slope(inside, cap), fd, rtol=1e-6, atol=1e-9)
    assert float(frequency_slope(torch.tensor(0.09), cap)) == 0.0


def test_frequency_term_under_split_rows_equals_the_whole_batch():
    """Two 'ranks' with their own rows, the counts summed: the row-weighted mean of their values is the whole
    batch's value, and both use the whole batch's slope (what makes data parallel equal one process)."""
    g = torch.Generator().manual_seed(0)
    fires = torch.rand(100, 12, generator=g) < torch.linspace(0.01, 0.6, 12)
    options = LossOptions(1.0, frequency_penalty=2.0, frequency_cap=0.1)
    whole = frequency_term(fires.sum(dim=0), 100, options)
    halves = [fires[:37], fires[37:]]
    total = torch.cat([fires.sum(dim=0).double(), torch.tensor([100.0], dtype=torch.float64)])
    parts = [frequency_term(h.sum(dim=0), len(h), options, reduce_counts=lambda _: total.clone()) for h in halves]
    for part in parts:
        torch.testing.assert_close(part.slope, whole.slope, rtol=0, atol=0)
    mean = sum(len(h) * part.value for h, part in zip(halves, parts)) / 100
    assert mean == pytest.approx(whole.value, rel=1e-12)
    p = fires.double().mean(dim=0).numpy()
    assert whole.value == pytest.approx(2.0 * float((np.maximum(p - 0.1, 0) ** 2 / 0.1).sum()), rel=1e-12)


def _sae(d=6, bandwidth=0.2):
    """W_enc = I, b_enc = 0, no pre-encoder bias: z = x, so the data sets every pre-activation exactly."""
    sae = JumpReLUSAE(d, d, dtype=torch.float64, seed=0, bandwidth=bandwidth, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.threshold.copy_(torch.linspace(0.5, 1.0, d, dtype=torch.float64))
    return sae


def _symmetric_batch(sae, frequencies, rows=40, seed=1):
    """Rows of z = x with latent i firing on ``frequencies[i]`` of them and window pairs placed in ± pairs
    (u and −u), so Σ_b S(u_b) = Σ_b H(u_b) for the smoothed step S: the smoothed frequency equals p at θ."""
    g = np.random.default_rng(seed)
    theta = sae.threshold.detach().numpy()
    eps = sae.config.bandwidth
    x = np.zeros((rows, len(theta)))
    for i, freq in enumerate(frequencies):
        n_on = int(round(freq * rows))
        u = np.concatenate([g.uniform(0.7, 2.0, n_on), -g.uniform(0.7, 2.0, rows - n_on)]) * eps
        k = min(3, n_on, rows - n_on)           # k tokens from each side moved into the window, as ± pairs
        w = g.uniform(0.05, 0.4, k) * eps
        u[:k], u[n_on:n_on + k] = w, -w
        x[:, i] = theta[i] + g.permutation(u)
    return torch.tensor(x)


STEP_PATHS = ["dense", "torch", "compiled"]


def _step(path, sae, x, options):
    if path == "dense":
        return dense_training_step(sae, x, options)
    if path == "compiled" and sparse_kernels.load() is None:
        pytest.skip("no C++ compiler here: the compiled kernels cannot be built")
    return sparse_training_step(params(sae), sae.normalize(x), None, options, kernels=path == "compiled")


@pytest.mark.parametrize("path", STEP_PATHS)
def test_threshold_gradient_equals_the_float64_formula(path):
    """∂(λ·F)/∂θ_i = −λμψ'(p_i)/(Bε)·Σ_b K(u_bi/ε), added to the plain loss's θ-gradient; nothing else moves."""
    sae = _sae()
    freqs = [0.05, 0.1, 0.3, 0.5, 0.75, 0.2]
    x = _symmetric_batch(sae, freqs)
    lam, mu, cap = 0.7, 2.5, 0.15
    on = _step(path, sae, x, LossOptions(lam, frequency_penalty=mu, frequency_cap=cap))
    off = _step(path, sae, x, LossOptions(lam))
    z, theta, eps, B = x.numpy(), sae.threshold.detach().numpy(), sae.config.bandwidth, x.shape[0]
    u = z - theta
    p = (u > 0).mean(axis=0)
    slope = 2 * np.maximum(p - cap, 0) / cap
    kernel = (np.abs(u / eps) < 0.5).sum(axis=0)
    expected = off.grads["threshold"].numpy() - lam * mu * slope * kernel / (B * eps)
    assert (slope * kernel > 0).sum() >= 3 and (slope == 0).sum() >= 1          # latents on both sides
    np.testing.assert_allclose(on.grads["threshold"].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert on.loss == pytest.approx(off.loss + lam * mu * float((np.maximum(p - cap, 0) ** 2 / cap).sum()),
                                    rel=1e-12)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(on.grads[name], off.grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("path", STEP_PATHS)
def test_threshold_gradient_equals_finite_differences_of_the_smoothed_loss(path):
    """The STE gradient is the derivative of the loss with H(u) smoothed to S(u) = clamp(u/ε + ½, 0, 1) (the
    integral of the rectangle kernel). With W_dec = 0 the reconstruction does not depend on θ, and on this
    batch S and H give the same frequencies at θ, so central differences of
    ``λ·mean_b Σ_i S(u_bi) + λμ Σ_i ψ(mean_b S(u_bi))`` must equal the step's θ-gradient."""
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    freqs = [0.25, 0.4, 0.5, 0.6, 0.75, 0.2]
    x = _symmetric_batch(sae, freqs, seed=3)
    lam, mu, cap = 0.3, 4.0, 0.1
    result = _step(path, sae, x, LossOptions(lam, frequency_penalty=mu, frequency_cap=cap))
    z, eps = x.numpy(), sae.config.bandwidth

    def smoothed(theta):
        s = np.clip((z - theta) / eps + 0.5, 0, 1)
        q = s.mean(axis=0)
        return lam * s.sum(axis=1).mean() + lam * mu * float((np.maximum(q - cap, 0) ** 2 / cap).sum())

    theta = sae.threshold.detach().numpy()
    h = 1e-6
    fd = np.array([(smoothed(theta + h * e) - smoothed(theta - h * e)) / (2 * h) for e in np.eye(len(theta))])
    assert np.abs(fd).min() > 0.1
    np.testing.assert_allclose(result.grads["threshold"].numpy(), fd, rtol=1e-6, atol=1e-8)


def test_frequency_penalty_defaults_with_target_l0():
    """On by default with a target L0 (Gemma Scope 2's recipe), off with λ·L0; an old λ spec keeps its
    fingerprint (the new fields at their defaults are left out) and its folder name."""
    target = SAESpec(site="resid_post/layer_1", width=4096, target_l0=10)
    plain = SAESpec(site="resid_post/layer_1", width=4096, sparsity_coefficient=1e-3)
    assert target.frequency_penalty == DEFAULT_FREQUENCY_PENALTY and plain.frequency_penalty == 0.0
    assert target.loss_options(0.5).frequency and not plain.loss_options(0.5).frequency
    assert target.loss_options(0.5).frequency_cap == DEFAULT_TARGET_FREQUENCY_CAP == 0.05
    assert "frequency_penalty" not in plain.fingerprint_dict() and "frequency_cap" not in plain.fingerprint_dict()
    assert plain.name.endswith("lambda_0.001") and target.name.endswith("target_l0_10")
    off = SAESpec(site="resid_post/layer_1", width=4096, target_l0=10, frequency_penalty=0)
    assert not off.loss_options(0.5).frequency and off.name.endswith("target_l0_10_freq_0")
    assert off.fingerprint_dict() != target.fingerprint_dict()
    # a small SAE whose mean frequency target_l0/width is near the cap: the cap moves to 2× that mean
    small = SAESpec(site="resid_post/layer_1", width=64, target_l0=8)
    assert small.frequency_cap == pytest.approx(0.25) and small.name.endswith("target_l0_8")
    assert SAESpec(site="resid_post/layer_1", width=4096, target_l0=60).frequency_cap == 0.05      # 2 × 0.015 < 0.05
    assert SAESpec(site="resid_post/layer_1", width=4096, target_l0=150).frequency_cap == pytest.approx(300 / 4096)
    # the old default, given explicitly, is named apart (runs made before the change keep their settings)
    assert SAESpec(site="resid_post/layer_1", width=4096, target_l0=60, frequency_cap=0.1).name.endswith(
        "target_l0_60_freq_10_cap_0.1")
    assert plain.frequency_cap == DEFAULT_FREQUENCY_CAP                   # off: the stored value is unchanged
    with pytest.raises(ValueError, match="would fight the target"):
        SAESpec(site="resid_post/layer_1", width=64, target_l0=8, frequency_cap=0.1)


def test_bad_frequency_settings_are_rejected():
    with pytest.raises(ValueError, match="frequency_cap"):
        LossOptions(0.1, frequency_penalty=1.0, frequency_cap=1.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        LossOptions(0.1, frequency_penalty=-1.0)
    with pytest.raises(ValueError):
        SAESpec(site="resid_post/layer_1", width=64, target_l0=10, frequency_cap=0)
