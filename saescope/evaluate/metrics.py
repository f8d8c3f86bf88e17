"""Evaluation metrics of Gemma Scope §4 and Appendix C, as streaming accumulators.

Every metric is accumulated over evaluation tokens in float64 so that any number of batches gives the
same answer as one pass over all tokens (up to rounding):

- L0: mean number of active latents per token, ``E‖f(x)‖₀`` (§4.1).
- FVU: ``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over the evaluation tokens, x̄ their mean (§4.1, "normalized loss").
  The denominator is accumulated as ``Σ‖x‖² − n‖x̄‖²`` from float64 sums.
- MSE: mean squared error per element, ``Σ‖x − x̂‖² / (n · d)``; cosine: mean over tokens of cos(x, x̂).
- Δ LM loss: mean next-token cross-entropy with the reconstruction spliced in minus the clean model's,
  over the same tokens (§4.1); loss recovered ``(L_zero − L_spliced) / (L_zero − L_clean)`` against
  zero-ablating the site; Δ loss by sequence position (App. C.2, Fig. 15).
- FVU along the top principal directions and on the rest (issue 17; docs/evaluation.md): with C the
  covariance of the evaluation targets around their mean and P_top the projector onto its top-k
  eigenvectors, ``fvu_top = Σ‖P_top(x − x̂)‖² / Σ‖P_top(x − x̄)‖²`` and ``fvu_rest`` the same with
  ``I − P_top``. Accumulated exactly from the float64 second moments ``Σ x xᵀ`` and ``Σ e eᵀ`` (e = x − x̂),
  so the directions come from all evaluation tokens and no second pass is needed. ``FVU = s · fvu_top +
  (1 − s) · fvu_rest`` with ``s = top_variance_share``, the share of the variance along P_top.
- Latent firing frequencies (§4.2, Fig. 4): per latent, the fraction of tokens where it is active; dead
  latents never fire, dense latents fire on more than 10% of tokens. Since ``L0 = Σ_i freq_i``, the
  dense latents' share of L0 is ``Σ_{dense} freq_i / Σ_i freq_i``.
- A percentile bootstrap interval of Δ LM loss over windows (sequences): windows are resampled with
  replacement, clean and spliced losses of a window together (paired), :func:`bootstrap_delta_loss`.
- Uniformity of active latent importance (App. C.3 / D.5 of arXiv 2408.05147v2): with the
  attribution-weighted latent activations ``y = f(x) ⊙ W_dec ∇_x 𝓛`` (𝓛 the mean-centred logit of the
  correct next token), ``p = |y| / Σ|y|`` over active latents, ``D_KL(p‖u) = log‖y‖₀ − S(p)`` and
  ``r_L0 = exp(−D_KL) = exp(S(p)) / ‖y‖₀`` (eq. 13), averaged over tokens.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of tokens counts as dense (the issue's definition)."""


# ---------------------------------------------------------------------------------------------- per token
def l0_per_token(f: torch.Tensor) -> torch.Tensor:
    """``‖f‖₀`` for each row of latents ``f [..., d_sae]``."""
    return (f != 0).sum(dim=-1)


def uniformity_per_token(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """App. C.3 eq. 13 for each row of attribution-weighted latent activations ``y [n, d_sae]``.

    Returns ``(r_l0, l0_y, valid)``: ``r_L0 = exp(S(p)) / ‖y‖₀`` with ``p = |y| / Σ|y|`` (entropy in nats,
    ``0 log 0 = 0``), ``‖y‖₀`` the number of non-zero entries, and ``valid`` the rows with ``‖y‖₀ > 0``
    (r_L0 is undefined on a token with no active latent; those rows hold NaN).
    """
    a = y.abs().to(torch.float64)
    total = a.sum(dim=-1, keepdim=True)
    count = (a > 0).sum(dim=-1)
    valid = count > 0
    p = a / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(dim=-1)
    r = torch.exp(entropy) / count.clamp_min(1).to(torch.float64)
    r = torch.where(valid, r, torch.full_like(r, float("nan")))
    return r, count, valid


def mean_centered_logit(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """App. C.3's 𝓛: the logit of the correct next token minus the mean logit over the vocabulary."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.mean(dim=-1)


# ---------------------------------------------------------------------------------------------- accumulators
@dataclass
class ReconstructionAccumulator:
    """L0, FVU, MSE, cosine similarity and firing counts of one SAE over evaluation tokens."""

    d_sae: int
    n_tokens: int = 0
    sum_l0: float = 0.0
    sum_squared_error: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_squared_norm: float = 0.0
    sum_cosine: float = 0.0
    d_out: int = 0
    fire_counts: torch.Tensor | None = None
    principal_directions: int = 1
    sum_xxT: torch.Tensor | None = None
    sum_eeT: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add tokens: targets ``x [n, d]``, reconstructions ``x_hat [n, d]``, latents ``f [n, d_sae]``."""
        if x.shape != x_hat.shape or x.shape[0] != f.shape[0] or f.shape[-1] != self.d_sae:
            raise ValueError(f"shapes do not match: x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)}, "
                             f"f {tuple(f.shape)} (d_sae {self.d_sae})")
        if x.shape[0] == 0:
            return
        x64, xh64 = x.to(torch.float64), x_hat.to(torch.float64)
        active = f != 0
        if self.sum_x is None:
            self.sum_x = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.fire_counts = torch.zeros(self.d_sae, dtype=torch.int64, device=f.device)
            self.d_out = x.shape[-1]
        self.n_tokens += x.shape[0]
        self.sum_l0 += float(active.sum())
        self.fire_counts += active.sum(dim=0)
        self.sum_squared_error += float(((x64 - xh64) ** 2).sum())
        self.sum_x += x64.sum(dim=0)
        self.sum_squared_norm += float((x64 ** 2).sum())
        if self.principal_directions > 0:
            e64 = x64 - xh64
            if self.sum_xxT is None:
                self.sum_xxT = torch.zeros(self.d_out, self.d_out, dtype=torch.float64, device=x.device)
                self.sum_eeT = torch.zeros_like(self.sum_xxT)
            self.sum_xxT.addmm_(x64.T, x64)
            self.sum_eeT.addmm_(e64.T, e64)
        cos = torch.nn.functional.cosine_similarity(x64, xh64, dim=-1, eps=1e-12)
        self.sum_cosine += float(cos.sum())

    def result(self) -> dict[str, Any]:
        if self.n_tokens == 0:
            raise ValueError("no evaluation tokens were seen (all positions masked?)")
        n = self.n_tokens
        mean = self.sum_x / n
        total_variance = self.sum_squared_norm - n * float((mean ** 2).sum())
        freq = (self.fire_counts.to(torch.float64) / n).cpu()
        out = {
            "n_tokens": n,
            "l0": self.sum_l0 / n,
            "fvu": self.sum_squared_error / total_variance if total_variance > 0 else float("nan"),
            "mse": self.sum_squared_error / (n * self.d_out),
            "cosine": self.sum_cosine / n,
            **density_summary(freq),
            "_frequencies": freq,
        }
        if self.principal_directions > 0 and self.sum_xxT is not None:
            out.update(principal_fvu(self.sum_xxT, self.sum_x, n, self.sum_eeT, self.principal_directions))
        return out


def principal_fvu(sum_xxT: torch.Tensor, sum_x: torch.Tensor, n: int, sum_eeT: torch.Tensor,
                  k: int) -> dict[str, Any]:
    """FVU along the top-``k`` principal directions of the targets and on the rest, from float64 sums.

    ``C = Σ x xᵀ − n x̄ x̄ᵀ`` (the scatter of the targets around their mean); ``U`` its top-``k``
    eigenvectors (largest eigenvalues ``λ_1..λ_k``); ``E = Σ e eᵀ`` with ``e = x − x̂``. Then
    ``Σ‖P_top e‖² = tr(Uᵀ E U)``, ``Σ‖P_top(x − x̄)‖² = λ_1 + … + λ_k``, and the rest is the trace minus
    those: ``fvu_top = tr(Uᵀ E U) / Σλ_top``, ``fvu_rest = (tr E − tr(Uᵀ E U)) / (tr C − Σλ_top)``.
    ``top_variance_share = Σλ_top / tr C``.
    """
    mean = sum_x / n
    scatter = sum_xxT - n * torch.outer(mean, mean)
    scatter = (scatter + scatter.T) / 2
    k = min(k, scatter.shape[0])
    eigenvalues, eigenvectors = torch.linalg.eigh(scatter)  # ascending
    u = eigenvectors[:, -k:]
    top_var = float(eigenvalues[-k:].sum())
    total_var = float(torch.diagonal(scatter).sum())
    top_err = float(torch.einsum("ij,ik,kj->", u, sum_eeT, u))
    total_err = float(torch.diagonal(sum_eeT).sum())
    rest_var = total_var - top_var
    return {
        "principal_directions": k,
        "top_variance_share": top_var / total_var if total_var > 0 else float("nan"),
        "fvu_top": top_err / top_var if top_var > 0 else float("nan"),
        "fvu_rest": (total_err - top_err) / rest_var if rest_var > 0 else float("nan"),
    }


def density_summary(frequencies: torch.Tensor, *, bins: int = 30, low: float = -8.0) -> dict[str, Any]:
    """Dead / dense counts and a histogram of ``log10`` firing frequency (Gemma Scope Fig. 4).

    Dead latents (frequency 0) are counted apart and left out of the histogram; the bins span
    ``[low, 0]`` in ``log10`` frequency, frequencies below ``10**low`` fall in the first bin.
    """
    freq = frequencies.to(torch.float64)
    alive = freq[freq > 0]
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(alive.log10().clamp(low, 0.0), bins=bins, min=low, max=0.0) if alive.numel() \
        else torch.zeros(bins, dtype=torch.float64)
    return {
        "d_sae": int(freq.numel()),
        "dead": int((freq == 0).sum()),
        "dense": int((freq > DENSE_FREQUENCY).sum()),
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > DENSE_FREQUENCY).double().mean()),
        "dense_l0_share": (float(freq[freq > DENSE_FREQUENCY].sum() / freq.sum()) if float(freq.sum()) > 0
                           else float("nan")),
        "log10_frequency_histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
    }


@dataclass
class LossAccumulator:
    """Clean, spliced and zero-ablated next-token losses over the same tokens, in total and per position.

    ``update`` takes per-token cross-entropies ``[batch, seq-1]`` (position t predicts token t+1; each row one
    window) and the boolean ``counted [batch, seq-1]`` of the terms that count. ``zero`` may be given for
    some batches only (the evaluator zero-ablates a capped number of tokens per site and domain: it is one
    more spliced pass per site): loss recovered ``(L_zero − L_spliced) / (L_zero − L_clean)`` then uses the
    clean, spliced and zero-ablated losses of exactly those tokens (``zero_ablation_tokens``).
    """

    n_positions: int = 0
    n: int = 0
    sum_clean: float = 0.0
    sum_spliced: float = 0.0
    sum_zero: float = 0.0
    has_zero: bool = False
    n_zero: int = 0
    sum_clean_zero: float = 0.0
    sum_spliced_zero: float = 0.0
    pos_count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    pos_clean: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    pos_spliced: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    window_n: list[int] = field(default_factory=list)
    window_clean: list[float] = field(default_factory=list)
    window_spliced: list[float] = field(default_factory=list)

    def _grow(self, length: int) -> None:
        if length > self.pos_count.numel():
            pad = length - self.pos_count.numel()
            z = torch.zeros(pad, dtype=torch.float64)
            self.pos_count = torch.cat([self.pos_count, z])
            self.pos_clean = torch.cat([self.pos_clean, z])
            self.pos_spliced = torch.cat([self.pos_spliced, z])

    def update(self, clean: torch.Tensor, spliced: torch.Tensor, counted: torch.Tensor,
               zero: torch.Tensor | None = None) -> None:
        if clean.shape != spliced.shape or clean.shape != counted.shape:
            raise ValueError(f"loss shapes differ: clean {tuple(clean.shape)}, spliced {tuple(spliced.shape)},"
                             f" counted {tuple(counted.shape)}")
        m = counted.to(torch.float64).cpu()
        c, s = clean.to(torch.float64).cpu() * m, spliced.to(torch.float64).cpu() * m
        self.n += int(m.sum())
        self.sum_clean += float(c.sum())
        self.sum_spliced += float(s.sum())
        if zero is not None:  # loss recovered is computed on the tokens that have a zero-ablation loss
            self.has_zero = True
            self.sum_zero += float((zero.to(torch.float64).cpu() * m).sum())
            self.n_zero += int(m.sum())
            self.sum_clean_zero += float(c.sum())
            self.sum_spliced_zero += float(s.sum())
        self._grow(clean.shape[-1])
        length = clean.shape[-1]
        self.pos_count[:length] += m.sum(dim=0)
        self.pos_clean[:length] += c.sum(dim=0)
        self.pos_spliced[:length] += s.sum(dim=0)
        if clean.dim() == 2:  # rows are windows: keep their sums for the bootstrap over windows
            for n_w, c_w, s_w in zip(m.sum(dim=1).tolist(), c.sum(dim=1).tolist(), s.sum(dim=1).tolist()):
                if n_w > 0:
                    self.window_n.append(int(n_w))
                    self.window_clean.append(c_w)
                    self.window_spliced.append(s_w)

    def result(self, *, position_bins: int = 32, n_boot: int = 2000, confidence: float = 0.95,
               seed: int = 0) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no loss terms were counted (all positions masked?)")
        clean, spliced = self.sum_clean / self.n, self.sum_spliced / self.n
        out: dict[str, Any] = {"loss_tokens": self.n, "clean_loss": clean, "spliced_loss": spliced,
                               "delta_loss": spliced - clean}
        if self.has_zero and self.n_zero:
            zero = self.sum_zero / self.n_zero
            clean_z, spliced_z = self.sum_clean_zero / self.n_zero, self.sum_spliced_zero / self.n_zero
            out["zero_ablation_loss"] = zero
            out["zero_ablation_tokens"] = self.n_zero
            out["loss_recovered"] = (zero - spliced_z) / (zero - clean_z) if zero != clean_z else float("nan")
        out["delta_loss_by_position"] = delta_loss_by_position(
            self.pos_count, self.pos_clean, self.pos_spliced, bins=position_bins)
        if self.window_n:
            ci = bootstrap_delta_loss(self.window_clean, self.window_spliced, self.window_n, n_boot=n_boot,
                                      confidence=confidence, seed=seed)
            out["delta_loss_ci"] = ci
            out["delta_loss_windows"] = {
                "n_tokens": list(self.window_n),
                "delta_loss": [(s_w - c_w) / n_w for n_w, c_w, s_w in
                               zip(self.window_n, self.window_clean, self.window_spliced)]}
        return out


def bootstrap_delta_loss(clean_sums: Sequence[float], spliced_sums: Sequence[float], counts: Sequence[int], *,
                         n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                         block: int = 256) -> dict[str, Any]:
    """Percentile bootstrap interval of Δ LM loss over windows (sequences), paired.

    Window w has ``counts[w]`` counted tokens whose clean and spliced cross-entropies sum to
    ``clean_sums[w]`` and ``spliced_sums[w]``. Δ loss is the token-weighted ratio
    ``Σ_w (S_w − C_w) / Σ_w n_w`` (the same number as the mean over all tokens). Each of ``n_boot``
    replicates draws W windows with replacement (``numpy.random.default_rng(seed)``, so the interval is
    reproducible) and recomputes the ratio; a window's clean and spliced sums always travel together, so
    the interval reflects the variance of the *difference* (pairing), not of either loss. The interval is
    the ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of the replicates (numpy's linear
    interpolation). Windows, not tokens, are resampled because tokens of one window are correlated.
    Returns ``{"mean", "lower", "upper", "confidence", "n_boot", "n_windows", "n_tokens", "seed"}``.
    """
    n = np.asarray(counts, dtype=np.float64)
    c, s = np.asarray(clean_sums, dtype=np.float64), np.asarray(spliced_sums, dtype=np.float64)
    if not (n.shape == c.shape == s.shape and n.ndim == 1 and n.size > 0):
        raise ValueError(f"need one clean sum, spliced sum and count per window, got {len(clean_sums)}, "
                         f"{len(spliced_sums)}, {len(counts)}")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"n_boot must be ≥ 1 and confidence in (0, 1), got {n_boot} and {confidence}")
    d = s - c
    rng = np.random.default_rng(seed)
    w = n.size
    replicates = np.empty(n_boot, dtype=np.float64)
    for lo in range(0, n_boot, block):  # bounded memory: block × W indices at a time
        idx = rng.integers(0, w, size=(min(block, n_boot - lo), w))
        replicates[lo:lo + idx.shape[0]] = d[idx].sum(axis=1) / n[idx].sum(axis=1)
    alpha = (1.0 - confidence) / 2
    lower, upper = np.quantile(replicates, [alpha, 1.0 - alpha])
    return {"mean": float(d.sum() / n.sum()), "lower": float(lower), "upper": float(upper),
            "confidence": confidence, "n_boot": int(n_boot), "n_windows": int(w), "n_tokens": int(n.sum()),
            "seed": int(seed)}


def delta_loss_by_position(count: torch.Tensor, clean_sum: torch.Tensor, spliced_sum: torch.Tensor,
                           *, bins: int = 32) -> dict[str, list]:
    """Δ loss averaged within contiguous groups of positions (App. C.2, Fig. 15).

    Position t is the position of the *predicting* token (its loss is for token t+1). With ``bins`` ≥ the
    sequence length every position is its own group. Groups with no counted token are dropped.
    """
    length = count.numel()
    bins = max(1, min(bins, length))
    edges = [round(i * length / bins) for i in range(bins + 1)]
    starts, ends, deltas, ns = [], [], [], []
    for lo, hi in itertools.pairwise(edges):
        n = float(count[lo:hi].sum())
        if hi <= lo or n == 0:
            continue
        starts.append(lo)
        ends.append(hi - 1)
        deltas.append((float(spliced_sum[lo:hi].sum()) - float(clean_sum[lo:hi].sum())) / n)
        ns.append(int(n))
    return {"start": starts, "end": ends, "delta_loss": deltas, "n_tokens": ns}


@dataclass
class UniformityAccumulator:
    """Mean ``r_L0`` (App. C.3 eq. 13) over tokens with at least one active attributed latent."""

    n: int = 0
    sum_r: float = 0.0
    sum_effective: float = 0.0
    sum_l0: float = 0.0

    def update(self, y: torch.Tensor) -> None:
        r, count, valid = uniformity_per_token(y)
        self.n += int(valid.sum())
        self.sum_r += float(r[valid].sum())
        self.sum_effective += float((r[valid] * count[valid].to(torch.float64)).sum())
        self.sum_l0 += float(count[valid].sum())

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            return {"uniformity_tokens": 0, "r_l0": float("nan"), "effective_active_latents": float("nan"),
                    "l0_attributed": float("nan")}
        return {"uniformity_tokens": self.n, "r_l0": self.sum_r / self.n,
                "effective_active_latents": self.sum_effective / self.n, "l0_attributed": self.sum_l0 / self.n}


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: map non-finite floats to None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
