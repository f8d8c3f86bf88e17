"""The JumpReLU transcoder (Gemma Scope Appendix B; Dunefsky et al. 2024).

A transcoder reads the MLP input (``mlp_in``: just after the pre-MLP RMSNorm, gain folded into the MLP input
weights) and predicts the MLP sublayer's output (``mlp_out``). It is trained exactly like an MLP SAE except:

1. ``W_enc`` is *not* initialised to ``W_decᵀ`` (input and output spaces differ) — here both are drawn
   independently with unit-norm latent directions;
2. there is no pre-encoder bias: ``b_dec`` is not subtracted from the input (it is still added at the output).

Input and target are both divided by the same scalar ``C``, the RMS norm of the input
(``C = √E‖x_in‖² = √d_model`` after RMSNorm), so::

    f = JumpReLU_θ(W_enc x_in/C + b_enc),     ŷ_raw = C·(W_dec f + b_dec)
    L = mean_b(‖y_raw/C − (W_dec f + b_dec)‖² + λ Σ_i H(z_i − θ_i))

Standardization (App. A eqs. 7-9 without the ``b_dec`` term) gives ``b'_enc = C b_enc``, ``b'_dec = C b_dec``,
``θ' = C θ``; the standardized transcoder maps raw ``mlp_in`` to raw ``mlp_out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saescope.config import SAEConfig
from saescope.errors import SaescopeError
from saescope.sae.jumprelu import DEFAULT_THRESHOLD, JumpReLUSAE, seeded_generator
from saescope.sae.ste import heaviside, jumprelu


@dataclass
class TranscoderTrainingOutput:
    """One training-time forward pass of a transcoder (normalized scale: raw / C)."""

    x: torch.Tensor                 # normalized input [batch, d_in]
    target: torch.Tensor            # normalized target [batch, d_out]
    x_hat: torch.Tensor             # normalized prediction of the target [batch, d_out]
    pre_activations: torch.Tensor
    latents: torch.Tensor
    l0: torch.Tensor
    reconstruction: torch.Tensor    # ‖target − x_hat‖² per token
    loss: torch.Tensor


class JumpReLUTranscoder(JumpReLUSAE):
    """A JumpReLU transcoder ``mlp_in → mlp_out`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``.

    ``norm_scale`` is ``C`` (the input's RMS norm, √d_model after RMSNorm); the pre-encoder bias is always off.
    """

    def __init__(self, d_in: int, d_sae: int, norm_scale: float | None = None, *, d_out: int | None = None,
                 dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None,
                 bandwidth: float = 0.001, seed: int | None = None, config: SAEConfig | None = None,
                 **metadata: Any):
        d_out = d_in if d_out is None else d_out
        if norm_scale is None:
            norm_scale = math.sqrt(d_in)
        if config is not None and config.apply_b_dec_to_input:
            raise SaescopeError("a transcoder has no pre-encoder bias (App. B): apply_b_dec_to_input must be false")
        self._d_out = d_out
        super().__init__(d_in, d_sae, norm_scale, dtype=dtype, device=device, apply_b_dec_to_input=False,
                         bandwidth=bandwidth, seed=seed, config=config, **metadata)

    @property
    def d_out(self) -> int:
        return self._d_out

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """App. B: ``W_dec`` and ``W_enc`` drawn independently (unit-norm latent directions), zero biases, θ = 0.001."""
        d_out = getattr(self, "_d_out", self.W_dec.shape[1])
        if self.W_dec.shape[1] != d_out:
            self.W_dec = nn.Parameter(torch.empty(self.W_dec.shape[0], d_out, dtype=self.W_dec.dtype,
                                                  device=self.W_dec.device))
            self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=self.b_dec.dtype, device=self.b_dec.device))
        generator = seeded_generator(seed)
        d_in, d_sae = self.W_enc.shape
        w_dec = torch.rand(d_sae, d_out, generator=generator, dtype=torch.float64) * 2 - 1
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        w_enc = torch.rand(d_in, d_sae, generator=generator, dtype=torch.float64) * 2 - 1
        w_enc = w_enc / w_enc.norm(dim=0, keepdim=True)
        self.W_dec.copy_(w_dec.to(self.W_dec.dtype))
        self.W_enc.copy_(w_enc.to(self.W_enc.dtype))
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(DEFAULT_THRESHOLD)

    def normalize_target(self, y_raw: torch.Tensor) -> torch.Tensor:
        """``y = y_raw / C`` (the same C as the input, App. B)."""
        if y_raw.shape[-1] != self.d_out:
            raise ValueError(f"target has last dimension {y_raw.shape[-1]} but this transcoder writes "
                             f"d_out={self.d_out}")
        y = y_raw.to(self.dtype)
        return y if self.norm_scale == 1.0 else y / self.norm_scale

    def training_forward(self, x_raw: torch.Tensor, y_raw: torch.Tensor,  # type: ignore[override]
                         sparsity_coefficient: float) -> TranscoderTrainingOutput:
        """Loss ``mean_b(‖y − ŷ‖² + λ·Σ_i H(z_i − θ_i))`` with ``x = x_raw/C``, ``y = y_raw/C`` (App. B)."""
        x = self.normalize(x_raw)
        y = self.normalize_target(y_raw)
        z = self._pre_activations_normalized(x)
        f = jumprelu(z, self.threshold, self.config.bandwidth)
        y_hat = self._decode_normalized(f)
        reconstruction = (y - y_hat).pow(2).sum(dim=-1)
        l0 = heaviside(z, self.threshold, self.config.bandwidth).sum(dim=-1)
        loss = (reconstruction + sparsity_coefficient * l0).mean()
        return TranscoderTrainingOutput(x=x, target=y, x_hat=y_hat, pre_activations=z, latents=f, l0=l0,
                                        reconstruction=reconstruction, loss=loss)

    @torch.no_grad()
    def standardize(self) -> JumpReLUTranscoder:
        """App. A eqs. 7-9 without a pre-encoder bias: ``b'_enc = C b_enc``, ``b'_dec = C b_dec``, ``θ' = C θ``."""
        C = float(self.norm_scale)
        config = self.config.model_copy(update={"norm_scale": 1.0, "apply_b_dec_to_input": False,
                                                "standardized": True})
        out = JumpReLUTranscoder(self.d_in, self.d_sae, 1.0, d_out=self.d_out, dtype=self.dtype,
                                 device=self.device, config=config, seed=0)
        out.W_enc.copy_(self.W_enc)
        out.W_dec.copy_(self.W_dec)
        out.b_enc.copy_((C * self.b_enc.to(torch.float64)).to(out.b_enc.dtype))
        out.b_dec.copy_((C * self.b_dec.to(torch.float64)).to(out.b_dec.dtype))
        out.threshold.copy_((C * self.threshold.to(torch.float64)).to(out.threshold.dtype))
        return out

    def save(self, path: str | Path, format: str = "native") -> Path:
        """Save like an SAE (the five parameters); the file formats need ``d_out == d_in`` (true for
        ``mlp_in → mlp_out`` of any model, both d_model wide)."""
        if self.d_out != self.d_in:
            raise SaescopeError(f"cannot save a transcoder with d_out={self.d_out} != d_in={self.d_in}: the "
                                "SAE file formats store W_dec as [d_sae, d_in]")
        return super().save(path, format=format)
