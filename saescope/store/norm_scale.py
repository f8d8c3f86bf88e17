"""The norm scale ``C`` of a site (Gemma Scope Appendix A): ``x = x_raw / C`` with ``E‖x‖² = 1``.

Solving ``E‖x_raw / C‖² = 1`` gives ``C = sqrt(E‖x_raw‖²)``: the root of the mean squared norm. The
store accumulates ``Σ‖x‖²`` per shard in float64 while writing, so ``C`` is computed over every stored row
at no extra pass; :func:`estimate_norm_scale` gives the same number from any sample.
"""

from __future__ import annotations

import math

import torch

from saescope.errors import SaescopeError


def sum_squared_norms(x: torch.Tensor) -> float:
    """``Σ_rows ‖x_row‖²`` in float64 (``x``: [n, d])."""
    return float(x.to(torch.float64).square().sum())


def norm_scale_from_sums(sum_sq_norm: float, rows: int, *, site: str = "site") -> float:
    """``C = sqrt(Σ‖x‖² / n)`` so that ``E‖x/C‖² = 1`` (Appendix A)."""
    if rows <= 0:
        raise SaescopeError(f"cannot estimate the norm scale of {site}: no rows")
    mean_sq = sum_sq_norm / rows
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise SaescopeError(f"cannot estimate the norm scale of {site}: mean squared norm is {mean_sq} "
                            "(all-zero or non-finite activations)")
    return math.sqrt(mean_sq)


def estimate_norm_scale(x_sample: torch.Tensor, *, site: str = "site") -> float:
    """Estimate ``C`` from a sample ``[n, d]`` of raw activations so that ``E‖x/C‖² = 1`` (Appendix A)."""
    if x_sample.ndim != 2:
        raise SaescopeError(f"estimate_norm_scale wants [rows, d] activations, got shape {tuple(x_sample.shape)}")
    return norm_scale_from_sums(sum_squared_norms(x_sample), x_sample.shape[0], site=site)
