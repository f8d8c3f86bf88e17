"""Unit-norm decoder rows (Gemma Scope §3; recipe §2 "Constraint").

Each row ``d_i`` of ``W_dec [d_sae, d_in]`` is a latent direction kept at unit norm: before each optimizer
step the gradient component parallel to the row is removed, ``g_i ← g_i − (g_i·d_i / ‖d_i‖²) d_i``, and
after the step each row is renormalised, ``d_i ← d_i / ‖d_i‖``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def project_out_parallel_gradient(W_dec: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Remove from each row of ``grad`` its component along the matching row of ``W_dec`` (in place)."""
    norms_sq = torch.linalg.vecdot(W_dec, W_dec).clamp_min(torch.finfo(W_dec.dtype).tiny)
    parallel = torch.linalg.vecdot(grad, W_dec) / norms_sq
    grad.addcmul_(parallel.unsqueeze(1), W_dec, value=-1.0)
    return grad


@torch.no_grad()
def normalize_rows(W_dec: torch.Tensor) -> torch.Tensor:
    """Rescale each row of ``W_dec`` to unit L2 norm (in place); all-zero rows are left alone."""
    norms = W_dec.norm(dim=1, keepdim=True)
    W_dec.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
    return W_dec
