"""Keep test data clear of the step's decision edges, so exact comparisons of decisions hold on every CPU.

Tests compare ``fired`` / ``l0`` (and gradients that depend on STE-window membership) between two
computations of the pre-activations ``z`` — the dense step, the sparse path, the compiled kernels — which sum
in different orders with per-CPU kernel flags (AVX2, AVX-512, ARM). They agree to rounding (~1e-6 relative in
float32), so a decision ``z > θ`` or ``|z − θ| < ε/2`` is the same on both sides on every CPU only if no ``z``
lies within rounding of ``θ`` or ``θ ± ε/2``. :func:`clear_decision_edges` makes test data so (it nudges the
thresholds of the latents that have a ``z`` too close to an edge) and checks the premise.
"""

from __future__ import annotations

import torch


def margin(dtype: torch.dtype) -> float:
    """Distance from an edge beyond which two float computations of ``z`` cannot disagree on a decision."""
    return 1e-5 if dtype == torch.float32 else 1e-9


def edge_gap(module, x_raw: torch.Tensor, bandwidth: float) -> float:
    """Smallest distance of any pre-activation from θ or θ ± ε/2 of its latent (float64)."""
    z = module.pre_activations(x_raw).detach().to(torch.float64)
    u = z - module.threshold.detach().to(torch.float64)
    return float(torch.stack([u.abs(), (u - bandwidth / 2).abs(), (u + bandwidth / 2).abs()]).min())


def clear_decision_edges(module, x_raw: torch.Tensor, bandwidth: float) -> None:
    """Move each latent's θ by a few margins until none of its pre-activations lies within two margins of an
    edge; points planted at θ ± ε/4 stay well inside the window (a margin is ≪ ε). Asserts the result."""
    m = margin(module.threshold.dtype)
    with torch.no_grad():
        for _ in range(50):
            z = module.pre_activations(x_raw).detach().to(torch.float64)
            u = z - module.threshold.detach().to(torch.float64)
            close = ((u.abs() < 2 * m) | ((u - bandwidth / 2).abs() < 2 * m)
                     | ((u + bandwidth / 2).abs() < 2 * m)).any(dim=0)
            if not close.any():
                break
            module.threshold[close] += 5 * m
    gap = edge_gap(module, x_raw, bandwidth)
    assert gap > m, f"a pre-activation lies {gap:.2e} from a decision edge (θ or θ ± ε/2)"
