"""The sparse training step: the same loss and gradients as the dense JumpReLU step, with one dense product.

With the straight-through estimators of the JumpReLU paper (eqs. 11-12, recipe §1) the loss
``L = mean_b(‖t_b − x̂_b‖² + λ Σ_i H(z_bi − θ_i))``, ``z = (x − b_dec) W_enc + b_enc``,
``f = z·H(z − θ)``, ``x̂ = f W_dec + b_dec`` (``t = x`` for an SAE, the target for a transcoder) has

- ``∂L/∂z_bi = g_f,bi · H(z_bi − θ_i)`` with ``g_f = (2/B)(x̂ − t) W_decᵀ``: non-zero only for active latents;
- ``∂L/∂θ_i = Σ_b [g_f,bi·(−θ_i/ε) − (λ/B)/ε]·K((z_bi − θ_i)/ε)``: non-zero only inside the bandwidth window;
- ``∂L/∂W_dec = fᵀ (2/B)(x̂ − t)`` and ``∂L/∂W_enc = (x − b_dec)ᵀ ∂L/∂z``: rows / columns of active latents only;
- ``∂L/∂b_enc = Σ_b ∂L/∂z``, ``∂L/∂b_dec = Σ_b (2/B)(x̂ − t) − W_enc ∂L/∂b_enc`` (second term only with
  the pre-encoder ``b_dec``).

So the only full-size work per token is the encoder product ``(x − b_dec) W_enc``. Everything else runs on
the list of (token, latent) pairs that are active or inside the window, found once from ``z``:
the decoder is a bag-sum of active decoder rows (``embedding_bag``), ``g_f`` is a sampled dense-dense product
at those pairs only (``torch.sparse.sampled_addmm``), and the weight gradients are bag-sums grouped by latent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer for the pre-activations and their mask (a fresh 268 MB tensor per step costs page
    faults)."""
    key = (shape, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None:
        if len(_WORKSPACE) >= 4:
            _WORKSPACE.clear()
        buf = _WORKSPACE[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def clear_workspace() -> None:
    """Free the reused pre-activation buffer."""
    _WORKSPACE.clear()


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a flat bool tensor, ascending. Sparse masks are scanned 8 bytes at a time
    (as int64 words), then only the words holding a true entry are expanded: about half the time of a plain
    ``nonzero`` over 67M entries."""
    if mask.numel() % 8 or mask.storage_offset() % 8:
        return torch.nonzero(mask).squeeze(1)
    words = torch.nonzero(mask.view(torch.int64)).squeeze(1)
    index = (words.unsqueeze(1) * 8 + torch.arange(8, device=mask.device)).view(-1)
    return index[mask[index]]


@dataclass
class StepResult:
    """Loss, gradients and batch statistics of one training step (normalized scale)."""

    loss: float
    reconstruction: float          # mean over tokens of ‖t − x̂‖²
    l0: float                      # mean over tokens of the number of active latents
    total_variance: float          # Σ_b ‖t_b − mean(t)‖² (for FVU = Σ reconstruction / total variance)
    fired: torch.Tensor            # bool [d_sae]: latents active on at least one token of the batch
    grads: dict[str, torch.Tensor]


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Start offset of each bag from the bag sizes."""
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], dim=0, out=offsets[1:])
    return offsets


@torch.no_grad()
def sparse_training_step(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, threshold: torch.Tensor,
    x: torch.Tensor, target: torch.Tensor | None, sparsity_coefficient: float, bandwidth: float,
    apply_b_dec_to_input: bool = True,
) -> StepResult:
    """One step's loss and gradients on a normalized batch ``x [B, d_in]`` (target ``None``: reconstruct x).

    Equal, to float rounding, to ``JumpReLUSAE.training_forward(...).loss.backward()`` (tests/test_fast_path.py).
    """
    if target is None:
        target = x
    B, _d_in = x.shape
    d_sae = W_enc.shape[1]
    eps = float(bandwidth)
    lam = float(sparsity_coefficient)
    xc = x - b_dec if apply_b_dec_to_input else x

    # The one dense product, then every (token, latent) pair that may be active or in the window.
    # (b_enc is added after the product, as in the dense ``x @ W_enc + b_enc``: z_bi = (xW)_bi + b_enc,i.)
    xw = torch.mm(xc, W_enc, out=_workspace((B, d_sae), W_enc.dtype, W_enc.device))
    wide = torch.promote_types(xw.dtype, threshold.dtype)
    # generous pre-filter z − θ > −ε (a superset of the window and of the active pairs); the pairs it lets
    # through that are neither active nor in the window get weight 0 below
    lower = (threshold.to(wide) - eps - b_enc.to(wide)).to(xw.dtype)
    mask = torch.gt(xw, lower, out=_workspace((B, d_sae), torch.bool, W_enc.device))
    flat = _flat_nonzero(mask.view(-1))                     # row-major: sorted by token
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    cols = flat - rows * d_sae
    zv = xw.view(-1)[flat] + b_enc[cols]
    theta_v = threshold[cols].to(wide)
    u = zv.to(wide) - theta_v                               # same arithmetic as saescope.sae.ste
    active = u > 0
    window = (u / eps).abs() < 0.5
    f = zv * active                                         # JumpReLU: z·H(z − θ)

    # Decoder: x̂_b = Σ_i f_bi W_dec[i] + b_dec, a weighted bag of decoder rows per token.
    row_counts = torch.bincount(rows, minlength=B)
    x_hat = F.embedding_bag(cols, W_dec, _offsets(row_counts), mode="sum", per_sample_weights=f)
    x_hat += b_dec
    residual = x_hat.sub_(target)                           # x̂ − t (x_hat is not needed any more)
    reconstruction = residual.pow(2).sum(dim=1)
    g_xhat = residual.mul_(2.0 / B)

    # g_f = g_x̂ W_decᵀ at the candidate pairs only (a CSR pattern: rows are sorted).
    crow = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(row_counts, dim=0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(len(cols), dtype=W_dec.dtype, device=x.device),
                                          (B, d_sae), check_invariants=False)
    g_f = torch.sparse.sampled_addmm(pattern, g_xhat, W_dec.t(), beta=0.0).values()

    # θ: both STE terms, window pairs only.
    g_theta_pairs = (g_f.to(wide) * (-theta_v / eps) - (lam / B) / eps) * window
    grad_threshold = torch.zeros(d_sae, dtype=wide, device=x.device).index_add_(0, cols, g_theta_pairs)

    # Encoder / decoder weights: bag-sums grouped by latent (weights 0 where the latent did not fire).
    g_z = g_f * active
    grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=x.device).index_add_(0, cols, g_z)
    order = torch.argsort(cols, stable=True)
    by_latent = _offsets(torch.bincount(cols, minlength=d_sae))
    tokens = rows[order]
    grad_W_dec = F.embedding_bag(tokens, g_xhat, by_latent, mode="sum", per_sample_weights=f[order])
    grad_W_enc = F.embedding_bag(tokens, xc, by_latent, mode="sum", per_sample_weights=g_z[order]).t()
    grad_b_dec = g_xhat.sum(dim=0)
    if apply_b_dec_to_input:
        grad_b_dec -= W_enc @ grad_b_enc

    active_rows, active_cols = rows[active], cols[active]
    l0_counts = torch.bincount(active_rows, minlength=B)
    loss = (reconstruction + lam * l0_counts.to(reconstruction.dtype)).mean()
    centred = target - target.mean(dim=0)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    fired[active_cols] = True
    return StepResult(
        loss=float(loss), reconstruction=float(reconstruction.mean()), l0=float(l0_counts.double().mean()),
        total_variance=float(centred.pow(2).sum()), fired=fired,
        grads={"W_enc": grad_W_enc, "b_enc": grad_b_enc, "W_dec": grad_W_dec, "b_dec": grad_b_dec,
               "threshold": grad_threshold.to(threshold.dtype)},
    )


def dense_training_step(module, x_raw: torch.Tensor, sparsity_coefficient: float,
                        target_raw: torch.Tensor | None = None) -> StepResult:
    """The plain dense step: ``module.training_forward`` and autograd (the reference the fast path matches)."""
    for p in module.parameters():
        p.grad = None
    if target_raw is None:
        out = module.training_forward(x_raw, sparsity_coefficient)
        target = out.x
    else:
        out = module.training_forward(x_raw, target_raw, sparsity_coefficient)
        target = out.target
    out.loss.backward()
    with torch.no_grad():
        centred = target - target.mean(dim=0)
        fired = (out.latents != 0).any(dim=0)
    grads = {name: getattr(module, name).grad for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    for p in module.parameters():
        p.grad = None
    return StepResult(loss=float(out.loss.detach()), reconstruction=float(out.reconstruction.detach().mean()),
                      l0=float(out.l0.detach().to(torch.float64).mean()), total_variance=float(centred.pow(2).sum()),
                      fired=fired, grads=grads)
