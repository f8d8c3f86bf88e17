"""Standardizing SAE parameters for inference (Gemma Scope Appendix A, eqs. 7-11).

During training the SAE sees ``x = x_raw / C`` minus ``b_dec`` (eq. 5). Folding both into the weights::

    b'_enc = C·b_enc − C·W_enc·b_dec     (7)     (the b_dec term only when b_dec was subtracted)
    b'_dec = C·b_dec                     (8)
    θ'     = C·θ                         (9)

gives ``f(x_raw) = JumpReLU_θ'(W_enc x_raw + b'_enc)`` (10), which equals ``C ×`` the training-time latents,
and ``x̂_raw = W_dec f + b'_dec`` (11), the same reconstruction as eq. 6. Weights are unchanged.
The arithmetic is done in float64 and cast back to each parameter's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the SAE module calls this one (JumpReLUSAE.standardize): no import back at run time
    from saescope.sae.jumprelu import JumpReLUSAE


@torch.no_grad()
def standardized_parameters(sae: JumpReLUSAE) -> dict[str, torch.Tensor]:
    """The parameters of eqs. 7-9 (float64) for a trained SAE."""
    C = float(sae.config.norm_scale)
    W_enc = sae.W_enc.detach().to(torch.float64)
    b_enc = sae.b_enc.detach().to(torch.float64)
    b_dec = sae.b_dec.detach().to(torch.float64)
    threshold = sae.threshold.detach().to(torch.float64)
    b_enc_new = C * b_enc
    if sae.config.apply_b_dec_to_input:
        b_enc_new = b_enc_new - C * (b_dec @ W_enc)      # eq. 7; W_enc is [d_in, d_sae]
    return {
        "W_enc": W_enc,
        "b_enc": b_enc_new,
        "W_dec": sae.W_dec.detach().to(torch.float64),
        "b_dec": C * b_dec,                              # eq. 8
        "threshold": C * threshold,                      # eq. 9
    }


@torch.no_grad()
def standardize(sae: JumpReLUSAE) -> JumpReLUSAE:
    """A new SAE that reads raw activations directly: ``norm_scale = 1``, no pre-encoder ``b_dec``.

    Applying it to an already standardized SAE returns an equal copy. A transcoder gets its own method
    (:meth:`saescope.sae.transcoder.JumpReLUTranscoder.standardize`: no pre-encoder bias, ``W_skip`` kept).
    """
    if sae.config.is_transcoder:
        return sae.standardize()
    config = sae.config.model_copy(update={"norm_scale": 1.0, "apply_b_dec_to_input": False,
                                           "standardized": True})
    out = type(sae)(sae.d_in, sae.d_sae, dtype=sae.dtype, device=sae.device, config=config, seed=0)
    for name, value in standardized_parameters(sae).items():
        target = getattr(out, name)
        target.copy_(value.to(dtype=target.dtype, device=target.device))
    return out


@torch.no_grad()
def fold_norm_scale(sae: JumpReLUSAE) -> JumpReLUSAE:
    """Fold only ``C`` into the weights, keeping the pre-encoder subtraction of ``b_dec``.

    From eq. 5, ``C·z = W_enc (x_raw − C·b_dec) + C·b_enc``; so with ``b_enc ← C·b_enc``, ``b_dec ← C·b_dec``,
    ``θ ← C·θ`` the SAE reads raw activations (latents ``C ×`` the training-time latents) and keeps the
    form ``JumpReLU_θ(W_enc (x − b_dec) + b_enc)`` that SAELens uses with ``apply_b_dec_to_input``.
    """
    if sae.config.is_transcoder:      # no pre-encoder bias: folding C is the whole standardization
        return sae.standardize()
    C = float(sae.config.norm_scale)
    config = sae.config.model_copy(update={"norm_scale": 1.0,
                                           "standardized": not sae.config.apply_b_dec_to_input})
    out = type(sae)(sae.d_in, sae.d_sae, dtype=sae.dtype, device=sae.device, config=config, seed=0)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        value = getattr(sae, name).detach().to(torch.float64)
        if name in ("b_enc", "b_dec", "threshold"):
            value = C * value
        target = getattr(out, name)
        target.copy_(value.to(dtype=target.dtype, device=target.device))
    return out
