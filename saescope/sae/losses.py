"""Loss terms of JumpReLU training, per token (averaged over the batch by the caller).

- ``l0_penalty``: the JumpReLU paper / Gemma Scope penalty ``λ·L0`` (recipe §1), ``L0 = Σ_i H(z_i − θ_i)``
  from the Heaviside straight-through estimator, so its gradient reaches θ only.
- ``quadratic_l0_penalty``: Gemma Scope 2's penalty around a target (recipe §6):
  ``(2 / L0_target)·(L0 − L0_target)²`` per token; it pushes each token's L0 toward the target from both
  sides, so a user asks for a sparsity instead of sweeping λ. Its θ-gradient is
  ``(4 / L0_target)·(L0 − L0_target)·∂L0/∂θ``.
- ``matryoshka_reconstruction``: the reconstruction error summed over nested prefixes of the latents
  (Matryoshka SAEs, Bussmann et al. 2025; Gemma Scope 2 trains some SAEs this way): the first ``m_k``
  latents alone must reconstruct the input, for each prefix size ``m_k``, weighted by ``w_k``. With one
  prefix equal to ``d_sae`` and weight 1 it is the plain ``‖x − x̂‖²``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def l0_penalty(l0: torch.Tensor, sparsity_coefficient: float) -> torch.Tensor:
    """``λ·L0`` per token."""
    return sparsity_coefficient * l0


def quadratic_l0_penalty(l0: torch.Tensor, target_l0: float) -> torch.Tensor:
    """``(2 / L0_target)·(L0 − L0_target)²`` per token (Gemma Scope 2)."""
    if not target_l0 > 0:
        raise ValueError(f"target_l0 must be positive, got {target_l0}")
    return (2.0 / target_l0) * (l0 - target_l0).pow(2)


def check_prefixes(prefixes: Sequence[int], weights: Sequence[float] | None, d_sae: int
                   ) -> tuple[list[int], list[float]]:
    """Validate Matryoshka prefix sizes (strictly increasing, ending at ``d_sae``) and their weights."""
    sizes = [int(m) for m in prefixes]
    if not sizes or any(m <= 0 for m in sizes) or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"matryoshka prefixes must be positive and strictly increasing, got {sizes}")
    if sizes[-1] != d_sae:
        raise ValueError(f"the last matryoshka prefix must be the full width d_sae={d_sae}, got {sizes[-1]}; "
                         f"write e.g. {sizes + [d_sae]}")
    w = [1.0] * len(sizes) if weights is None else [float(v) for v in weights]
    if len(w) != len(sizes) or any(v < 0 for v in w):
        raise ValueError(f"need one non-negative weight per prefix ({len(sizes)}), got {list(w)}")
    return sizes, w


def matryoshka_reconstruction(x: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                              prefixes: Sequence[int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """``Σ_k w_k ‖x − (f[:, :m_k] W_dec[:m_k] + b_dec)‖²`` per token, on the normalized scale.

    The partial reconstructions are built cumulatively (each prefix adds its new block of latents), so the
    cost is one full decoder product.
    """
    sizes, w = check_prefixes(prefixes, weights, W_dec.shape[0])
    total = x.new_zeros(x.shape[:-1])
    x_hat = b_dec.expand_as(x)
    start = 0
    for size, weight in zip(sizes, w):
        x_hat = x_hat + f[..., start:size] @ W_dec[start:size]
        start = size
        if weight:
            total = total + weight * (x - x_hat).pow(2).sum(dim=-1)
    return total
