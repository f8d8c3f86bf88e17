"""Initialisation from the first batch, before the first step (short-budget settings; the recipe's own
initialisation is the SAE module's: W_dec rows of unit norm, W_enc = W_decᵀ, b = 0, θ = initial_threshold).

Which of these run is the config's (``initial_*`` fields, :mod:`saescope.train.config`; the reasons and the
measurements behind them: docs/training.md). The first batch is then trained on like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saescope import distributed
from saescope.errors import SaescopeError
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.train.config import DEFAULT_TARGET_L0_LAMBDA, TrainConfig
from saescope.train.unit import TrainingUnit


def needs_first_batch(config: TrainConfig, units: Sequence[TrainingUnit]) -> bool:
    """Whether any initialisation reads the first batch (else training starts from the modules as built)."""
    return bool(config.initial_threshold_quantile is not None or config.initial_b_dec != "zeros"
                or config.initial_exclude_top_pcs or any(unit.lambda_base is None for unit in units)
                or (config.initial_W_skip != "zeros" and any(u.W_skip is not None for u in units))
                or (config.initial_transcoder_W_dec != "random" and any(u.spec.kind == "transcoder" for u in units)))


@torch.no_grad()
def initialize_from_first_batch(units: Sequence[TrainingUnit], batch: dict[str, torch.Tensor], config: TrainConfig,
                                 parallel: distributed.Parallel | None = None) -> None:
    """Short-budget initialisation from the first batch (which is then trained on): the top
    ``initial_exclude_top_pcs`` principal directions of the centered normalized input projected out of each
    latent's encoder direction (re-normalized; an SAE's decoder stays tied, ``W_dec = W_encᵀ``), ``b_dec`` ←
    mean of the normalized target (``initial_b_dec="mean"``), then θ_i ← max(initial_threshold, q-quantile
    of z_i) (``initial_threshold_quantile=q``); a skip transcoder's ``W_skip`` ← the least-squares map from the
    normalized input to the normalized target (``initial_W_skip="least_squares"``; ``b_dec`` then ← mean of
    ``t − x W_skip``); a transcoder's decoder rows ← the mean centered target of the tokens each latent fires
    on (``initial_transcoder_W_dec="fired_target_mean"``). A ``target_l0`` SAE without λ gets
    ``λ = DEFAULT_TARGET_L0_LAMBDA · mean_b ‖t_b‖²`` (t the normalized target: ≈ 1 for an SAE and for a
    transcoder at its own target scale, ≈ 2,500 for a Gemma 3 transcoder at the input's), so the penalty keeps
    the same weight against the reconstruction error. Under data parallel every rank must call (with its share of
    the first global batch)."""
    par = parallel
    if par is not None and par.data_shards > 1:   # the global first batch, as one process would see it
        batch = distributed.gather_batch(batch, par.data_group, par.data_shards)
    q = config.initial_threshold_quantile
    for unit in units:
        m = unit.module
        x_raw = batch[unit.spec.site].to(config.device)
        x = m.normalize(x_raw)
        target = (m.normalize_target(batch[unit.spec.target_site].to(config.device))
                  if unit.spec.target_site else x).to(torch.float64)
        if config.initial_exclude_top_pcs:
            _exclude_top_pcs(unit, x, config.initial_exclude_top_pcs)
        if unit.lambda_base is None:
            unit.lambda_base = DEFAULT_TARGET_L0_LAMBDA * float(target.pow(2).sum(dim=1).mean())
        fit_skip = unit.W_skip is not None and config.initial_W_skip == "least_squares"
        if config.initial_b_dec == "mean" or fit_skip:
            if fit_skip:
                x = x.to(torch.float64)
                w_skip = least_squares_map(x, target)
                unit.W_skip.copy_(w_skip.to(unit.W_skip.dtype))
                target = target - x @ w_skip
            if config.initial_b_dec == "mean":
                m.b_dec.copy_(target.mean(dim=0).to(m.b_dec.dtype))
        fired_rows = (unit.spec.kind == "transcoder"
                      and config.initial_transcoder_W_dec == "fired_target_mean")
        if q is None and not fired_rows:
            continue
        z = m.pre_activations(x_raw).to(torch.float64)
        if q is not None and not unit.baseline:
            theta = torch.quantile(z, q, dim=0).clamp_min(config.initial_threshold)
            m.threshold.copy_(theta.to(m.threshold.dtype))
            if unit.log_threshold is not None:
                unit.log_threshold.copy_(torch.log(m.threshold))
        if fired_rows:
            _decoder_from_fired_targets(m, z, target)


@torch.no_grad()
def _exclude_top_pcs(unit: TrainingUnit, x: torch.Tensor, k: int) -> None:
    """Project the top ``k`` principal directions of ``x`` (centered, float64) out of the unit's encoder
    directions (columns of ``W_enc``), re-normalize them, and re-tie an SAE's decoder (``W_dec = W_encᵀ``)."""
    m = unit.module
    d_in = x.shape[1]
    if k >= min(d_in, x.shape[0]):
        raise SaescopeError(f"initial_exclude_top_pcs={k} must be below the input width {d_in} and the batch size "
                            f"{x.shape[0]}; use a small number such as 1")
    x64 = x.to(torch.float64)
    top = torch.linalg.svd(x64 - x64.mean(dim=0), full_matrices=False).Vh[:k]      # [k, d_in]
    w = m.W_enc.detach().to(torch.float64)
    w = w - top.T @ (top @ w)
    w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    m.W_enc.copy_(w.to(m.W_enc.dtype))            # writes through to the contiguous W_enc_t buffer
    if unit.spec.kind == "sae":
        m.W_dec.copy_(w.t().to(m.W_dec.dtype))


def _decoder_from_fired_targets(m: JumpReLUSAE, z: torch.Tensor, target: torch.Tensor) -> None:
    """``W_dec[i] ← normalize(Σ_{b: z_bi > θ_i} (t_b − t̄))`` (``initial_transcoder_W_dec="fired_target_mean"``):
    each latent's decoder row points along the mean centered target of the first-batch tokens it fires on; a
    latent firing on none keeps its row."""
    fires = (z > m.threshold.detach().to(torch.float64)).to(torch.float64)          # [B, d_sae]
    w = fires.T @ (target - target.mean(dim=0))                                      # [d_sae, d_out]
    norms = w.norm(dim=1)
    ok = norms > 0
    rows = m.W_dec.detach().to(torch.float64).clone()
    rows[ok] = w[ok] / norms[ok].unsqueeze(1)
    m.W_dec.copy_(rows.to(m.W_dec.dtype))


def least_squares_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``W = argmin_W ‖(y − ȳ) − (x − x̄) W‖² + ridge·mean(diag XᵀX)·‖W‖²`` in float64: the linear part of the map
    from ``x [B, d_in]`` to ``y [B, d_out]`` (a tiny ridge so a batch smaller than ``d_in`` still has one answer)."""
    xc = (x - x.mean(dim=0)).to(torch.float64)
    yc = (y - y.mean(dim=0)).to(torch.float64)
    gram = xc.T @ xc
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-300)
    return torch.linalg.solve(gram, xc.T @ yc)
