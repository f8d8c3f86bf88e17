"""Straight-through estimators for the JumpReLU SAE.

JumpReLU paper (Rajamanoharan et al. 2024, arXiv 2407.14435, section 4 and eqs. 11-12), as summarised in
the recipe (``shared/reference/gemma-scope-recipe.md`` §1). With the rectangle kernel
``K(u) = 1{|u| < 1/2}`` and bandwidth ``ε``:

- ``∂JumpReLU_θ(z)/∂z := H(z − θ)``,          ``∂JumpReLU_θ(z)/∂θ := −(θ/ε)·K((z − θ)/ε)``
- ``∂H(z − θ)/∂z := 0``,                       ``∂H(z − θ)/∂θ := −(1/ε)·K((z − θ)/ε)``

So θ receives gradient from both the reconstruction term (through JumpReLU) and the sparsity term
(through H), and only from tokens whose pre-activation lies within ε/2 of θ; the pre-activations receive
gradient only where the latent fires, and none through the step.

The step uses the strict inequality ``H(u) = 1{u > 0}``, as in the paper's pseudo-code (``z > θ``).
The threshold may be kept in float32 while ``z`` is in a lower precision (SAELens PR #728: an Adam step on
θ rounds away in bfloat16); the comparison is made in float32 in that case.
"""

from __future__ import annotations

import torch


def rectangle_kernel(u: torch.Tensor) -> torch.Tensor:
    """``K(u) = 1{|u| < 1/2}`` (JumpReLU paper, section 4), returned in ``u``'s dtype."""
    return (u.abs() < 0.5).to(u.dtype)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient over the leading dimensions so it matches ``shape`` (the threshold's)."""
    while grad.dim() > len(shape):
        grad = grad.sum(dim=0)
    for i, n in enumerate(shape):
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(dim=i, keepdim=True)
    return grad


def _centred(z: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``z − θ`` in the wider of the two dtypes, and that dtype."""
    dtype = torch.promote_types(z.dtype, threshold.dtype)
    return z.to(dtype) - threshold.to(dtype), dtype


class JumpReLUFunction(torch.autograd.Function):
    """``JumpReLU_θ(z) = z·H(z − θ)`` with the paper's pseudo-derivatives (see module docstring)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        u, _ = _centred(z, threshold)
        fired = u > 0
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = float(bandwidth)
        return z * fired.to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        u, dtype = _centred(z, threshold)
        grad_z = grad_out * (u > 0).to(grad_out.dtype)
        # ∂/∂θ = −(θ/ε)·K((z − θ)/ε), chained with the incoming gradient and summed over tokens.
        local = -(threshold.to(dtype) / eps) * rectangle_kernel(u / eps)
        grad_threshold = _reduce_to(grad_out.to(dtype) * local, threshold.shape).to(threshold.dtype)
        return grad_z, grad_threshold, None


class HeavisideFunction(torch.autograd.Function):
    """``H(z − θ)`` with ``∂/∂z := 0`` and ``∂/∂θ := −(1/ε)·K((z − θ)/ε)`` (see module docstring)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        u, _ = _centred(z, threshold)
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = float(bandwidth)
        return (u > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        u, dtype = _centred(z, threshold)
        local = -(1.0 / eps) * rectangle_kernel(u / eps)
        grad_threshold = _reduce_to(grad_out.to(dtype) * local, threshold.shape).to(threshold.dtype)
        # No gradient flows to the pre-activations through the step.
        return torch.zeros_like(z), grad_threshold, None


def jumprelu(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU with straight-through pseudo-derivatives (rectangle kernel, bandwidth ``ε``)."""
    return JumpReLUFunction.apply(z, threshold, bandwidth)


def heaviside(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Heaviside step ``H(z − θ)`` with straight-through pseudo-derivatives."""
    return HeavisideFunction.apply(z, threshold, bandwidth)
