"""Loss terms of JumpReLU training, per token (averaged over the batch by the caller).

- ``l0_penalty``: the JumpReLU paper / Gemma Scope penalty ``λ·L0`` (recipe §1), ``L0 = Σ_i H(z_i − θ_i)``
  from the Heaviside straight-through estimator, so its gradient reaches θ only.
- ``quadratic_l0_penalty``: Gemma Scope 2's penalty around a target (recipe §6):
  ``(2 / L0_target)·(L0 − L0_target)²`` per token; it pushes each token's L0 toward the target from both
  sides, so a user asks for a sparsity instead of sweeping λ. Its θ-gradient is
  ``(4 / L0_target)·(L0 − L0_target)·∂L0/∂θ``.
- ``target_l0_over = "batch"`` (an option, not the recipe's reading): the same quadratic penalty on the batch's
  mean L0, ``(2 / L0_target)·(mean_b L0_b − L0_target)²``, the same value for every token; it holds the mean L0 at
  the target and leaves tokens free to use more or fewer latents (docs/training.md), and its θ-gradient is the
  per-token form's with every token's factor ``(4 / L0_target)·(mean_b L0_b − L0_target)``.
- ``matryoshka_reconstruction``: the reconstruction error summed over nested prefixes of the latents
  (Matryoshka SAEs, Bussmann et al. 2025; Gemma Scope 2 trains some SAEs this way): the first ``m_k``
  latents alone must reconstruct the input, for each prefix size ``m_k``, weighted by ``w_k``. With one
  prefix equal to ``d_sae`` and weight 1 it is the plain ``‖x − x̂‖²``.
- ``frequency_loss`` / ``frequency_term``: a penalty on latents that fire on more than a fraction ``c`` of the
  batch's tokens (Gemma Scope 2 names "a frequency penalty against high-frequency features"; its form is not
  public, this one is ours: docs/training.md), ``μ·Σ_i max(p_i − c, 0)²/c``; its gradient reaches θ only,
  through the same straight-through estimator as the L0 penalty.
- ``LossOptions``: every option of the loss, one frozen object that every training step reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch


def l0_penalty(l0: torch.Tensor, sparsity_coefficient: float) -> torch.Tensor:
    """``λ·L0`` per token."""
    return sparsity_coefficient * l0


def quadratic_l0_penalty(l0: torch.Tensor, target_l0: float) -> torch.Tensor:
    """``(2 / L0_target)·(L0 − L0_target)²`` per token (Gemma Scope 2)."""
    if not target_l0 > 0:
        raise ValueError(f"target_l0 must be positive, got {target_l0}")
    return (2.0 / target_l0) * (l0 - target_l0).pow(2)


def batch_quadratic_l0_penalty(l0: torch.Tensor, target_l0: float) -> torch.Tensor:
    """``(2 / L0_target)·(mean_b L0_b − L0_target)²`` for every token of the batch ``l0 [B]``."""
    return quadratic_l0_penalty(l0.mean(), target_l0).expand_as(l0)


TARGET_L0_OVER = ("token", "batch")
"""Where the quadratic target-L0 penalty is taken: each token's L0 (the recipe's reading of Gemma Scope 2) or the
batch's mean L0."""


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


# ---------------------------------------------------------------------- the frequency penalty
DEFAULT_FREQUENCY_PENALTY = 10.0
"""μ of the frequency penalty when a spec sets ``target_l0`` and leaves ``frequency_penalty`` out (docs/training.md)."""
DEFAULT_FREQUENCY_CAP = 0.1
"""c stored where the penalty is off (λ·L0 specs, baselines), and the evaluator's "dense" threshold."""
DEFAULT_TARGET_FREQUENCY_CAP = 0.05
"""c of a target-L0 spec that leaves ``frequency_cap`` out: half the evaluator's dense threshold, so a latent
firing on 10% of tokens already feels slope ``ψ'(0.1) = 2`` (at c = 0.1 it felt 0; docs/training.md)."""


def frequency_excess(p: torch.Tensor, cap: float) -> torch.Tensor:
    """``ψ(p) = max(p − c, 0)² / c`` per latent, ``p`` its firing frequency on the batch (docs/training.md).

    Zero for every latent at or below the cap, so it leaves the ordinary latents alone; above it, it grows like
    the quadratic L0 penalty ``(2/L0_t)(L0 − L0_t)²`` does above its target (one-sided, scaled by the cap)."""
    return (p - cap).clamp(min=0).pow(2) / cap


def frequency_slope(p: torch.Tensor, cap: float) -> torch.Tensor:
    """``ψ'(p) = 2·max(p − c, 0) / c``: the factor the frequency penalty puts on a latent's θ-gradient."""
    return 2.0 * (p - cap).clamp(min=0) / cap


@dataclass(frozen=True)
class FrequencyTerm:
    """The frequency penalty's parts for one step, from the latents' firing counts on the (global) batch.

    ``value = μ·[Σ_i ψ(p̂_i) + Σ_i ψ'(p̂_i)(p_i − p̂_i)]`` (the second sum is 0 in one process; under data
    parallelism ``p_i`` is this rank's frequency and ``p̂_i`` the global batch's, so the row-weighted mean of the
    ranks' values is the global one), and ``slope_i = μ·ψ'(p̂_i)``: the gradient is ``λ·Σ_i slope_i·∂p_i/∂θ_i``
    with ``∂p_i/∂θ_i`` from the Heaviside straight-through estimator (float64 throughout)."""

    value: float
    slope: torch.Tensor            # float64 [d_sae]


CountReducer = Callable[[torch.Tensor], torch.Tensor]
"""Sums a float64 vector ``[firing count of each latent…, rows]`` over the ranks that split a batch's rows."""


def frequency_term(counts: torch.Tensor, rows: int, options: LossOptions,
                   reduce_counts: CountReducer | None = None) -> FrequencyTerm:
    """:class:`FrequencyTerm` from this process's firing counts per latent over its ``rows`` tokens."""
    local = torch.cat([counts.to(torch.float64), torch.tensor([float(rows)], dtype=torch.float64,
                                                               device=counts.device)])
    both = local if reduce_counts is None else reduce_counts(local.clone())
    p_local = local[:-1] / local[-1]
    p_hat = both[:-1] / both[-1]
    mu, cap = options.frequency_penalty, options.frequency_cap
    slope = mu * frequency_slope(p_hat, cap)
    value = mu * float(frequency_excess(p_hat, cap).sum()) + float((slope * (p_local - p_hat)).sum())
    return FrequencyTerm(value=value, slope=slope)


def frequency_loss(active: torch.Tensor, options: LossOptions, reduce_counts: CountReducer | None = None
                   ) -> torch.Tensor:
    """The frequency penalty as an autograd term: ``active [B, d_sae]`` is ``H(z − θ)`` from the straight-through
    estimator (:func:`saescope.sae.ste.heaviside`); the result's value is :attr:`FrequencyTerm.value` and its
    gradient ``Σ_i slope_i·∂p_i/∂θ_i`` with ``p_i = mean_b active_bi``."""
    counts = (active.detach() > 0).sum(dim=0)
    term = frequency_term(counts, active.shape[0], options, reduce_counts)
    p = active.mean(dim=0)
    slope = term.slope.to(device=p.device, dtype=p.dtype)
    return (slope * (p - p.detach())).sum() + term.value


@dataclass(frozen=True)
class LossOptions:
    """The loss of one training step (recipe §1 and §6), read by every step implementation.

    ``loss = mean_b(R_b + λ·P_b) + λ·F`` with ``R_b`` the reconstruction error (summed over Matryoshka prefixes
    where set), ``P_b = L0_b`` or, with ``target_l0``, ``(2/L0_t)(L0_b − L0_t)²`` (``target_l0_over = "batch"``:
    ``(2/L0_t)(mean_b L0_b − L0_t)²`` for every b), and ``F`` the frequency
    penalty ``μ·Σ_i ψ(p_i)`` (:func:`frequency_excess`; off where ``frequency_penalty`` is 0).
    Adding an option: one field here, its math in each step path, and one case in tests/loss_cases.py."""

    sparsity_coefficient: float
    target_l0: float | None = None
    matryoshka_prefixes: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None
    frequency_penalty: float = 0.0
    frequency_cap: float = DEFAULT_FREQUENCY_CAP
    target_l0_over: str = "token"

    def __post_init__(self) -> None:
        if self.target_l0_over not in TARGET_L0_OVER:
            raise ValueError(f"target_l0_over must be one of {TARGET_L0_OVER}, got {self.target_l0_over!r}")
        lam = float(self.sparsity_coefficient)
        if not lam >= 0 or math.isinf(lam):
            raise ValueError(f"the sparsity coefficient λ must be finite and ≥ 0, got {self.sparsity_coefficient}")
        object.__setattr__(self, "sparsity_coefficient", lam)
        if self.target_l0 is not None:
            if not float(self.target_l0) > 0:
                raise ValueError(f"target_l0 must be positive, got {self.target_l0}")
            object.__setattr__(self, "target_l0", float(self.target_l0))
        if self.matryoshka_prefixes is None:
            if self.matryoshka_weights is not None:
                raise ValueError("matryoshka_weights needs matryoshka_prefixes")
        else:
            sizes, weights = check_prefixes(self.matryoshka_prefixes, self.matryoshka_weights,
                                            int(self.matryoshka_prefixes[-1]))
            object.__setattr__(self, "matryoshka_prefixes", tuple(sizes))
            if self.matryoshka_weights is not None:
                object.__setattr__(self, "matryoshka_weights", tuple(weights))
        if not float(self.frequency_penalty) >= 0 or math.isinf(self.frequency_penalty):
            raise ValueError(f"frequency_penalty μ must be finite and ≥ 0, got {self.frequency_penalty}")
        if not 0 < float(self.frequency_cap) < 1:
            raise ValueError(f"frequency_cap must be a fraction of tokens in (0, 1), got {self.frequency_cap}")
        object.__setattr__(self, "frequency_penalty", float(self.frequency_penalty))
        object.__setattr__(self, "frequency_cap", float(self.frequency_cap))

    @property
    def frequency(self) -> bool:
        """Whether the frequency penalty is on."""
        return self.frequency_penalty > 0

    def with_lambda(self, sparsity_coefficient: float) -> LossOptions:
        """The same options with this step's λ (the warm-up changes it every step)."""
        return replace(self, sparsity_coefficient=sparsity_coefficient)

    def check_width(self, d_sae: int) -> None:
        """Raise if the Matryoshka prefixes do not end at the SAE's width."""
        if self.matryoshka_prefixes is not None:
            check_prefixes(self.matryoshka_prefixes, self.matryoshka_weights, d_sae)

    @property
    def batch_target(self) -> bool:
        """Whether the target-L0 penalty is on the batch's mean L0 (``target_l0_over = "batch"``)."""
        return self.target_l0 is not None and self.target_l0_over == "batch"

    def token_penalty(self, l0: torch.Tensor) -> torch.Tensor:
        """``P_b``: ``L0_b``, or the quadratic target-L0 penalty (of ``L0_b``, or of the batch's mean L0)."""
        if self.target_l0 is None:
            return l0
        return (batch_quadratic_l0_penalty(l0, self.target_l0) if self.batch_target
                else quadratic_l0_penalty(l0, self.target_l0))


def as_loss_options(loss: LossOptions | float) -> LossOptions:
    """A bare λ is the Gemma Scope loss ``λ·L0`` with no other option."""
    return loss if isinstance(loss, LossOptions) else LossOptions(sparsity_coefficient=float(loss))
