"""The norm scale C (Gemma Scope Appendix A): E‖x_raw / C‖² = 1, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from saescope.errors import SaescopeError
from saescope.store.norm_scale import estimate_norm_scale, norm_scale_from_sums, sum_squared_norms


def test_exact_small_cases():
    assert estimate_norm_scale(torch.tensor([[3.0, 4.0]])) == 5.0
    assert estimate_norm_scale(torch.tensor([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(math.sqrt(12.5), rel=1e-15)
    rows = torch.nn.functional.normalize(torch.randn(100, 7, dtype=torch.float64), dim=1) * 2.5
    assert estimate_norm_scale(rows) == pytest.approx(2.5, rel=1e-12)  # every row has norm 2.5


def test_gaussian_closed_form_sigma_sqrt_d():
    g = torch.Generator().manual_seed(0)
    d, sigma, n = 64, 3.0, 200_000
    x = torch.randn(n, d, generator=g) * sigma
    c = estimate_norm_scale(x)
    # E‖x‖² = d σ², so C = σ √d; the sample mean of ‖x‖² (a σ²·χ²_d) has relative sd √(2/(d n))
    assert c == pytest.approx(sigma * math.sqrt(d), rel=4 * math.sqrt(2 / (d * n)) / 2)
    assert ((x.double() / c).square().sum(1).mean().item()) == pytest.approx(1.0, rel=1e-12)


def test_sums_combine_like_one_sample():
    x = torch.randn(1000, 16, dtype=torch.float64) + 5
    parts = x.split(137)
    total = sum(sum_squared_norms(p) for p in parts)
    assert norm_scale_from_sums(total, 1000) == pytest.approx(estimate_norm_scale(x), rel=1e-14)


@pytest.mark.parametrize("x, words", [
    (torch.zeros(0, 4), "no rows"),
    (torch.zeros(5, 4), "all-zero"),
    (torch.tensor([[1.0, float("inf")]]), "non-finite"),
    (torch.ones(4), r"\[rows, d\]"),
])
def test_refuses_degenerate_samples(x, words):
    with pytest.raises(SaescopeError, match=words):
        estimate_norm_scale(x, site="resid_post/layer_6")
