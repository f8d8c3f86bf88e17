"""The JumpReLU transcoder (Gemma Scope Appendix B; Dunefsky et al. 2024) and the skip transcoder (Gemma Scope 2).

A transcoder reads the MLP input (``mlp_in``: just after the pre-MLP RMSNorm, gain folded into the MLP input
weights) and predicts the MLP sublayer's output (``mlp_out``). It is trained exactly like an MLP SAE except:

1. ``W_enc`` is *not* initialised to ``W_decᵀ`` (input and output spaces differ) — here both are drawn
   independently with unit-norm latent directions;
2. there is no pre-encoder bias: ``b_dec`` is not subtracted from the input (it is still added at the output).

Input and target are both divided by the same scalar ``C``, the RMS norm of the input
(``C = √E‖x_in‖² = √d_model`` after RMSNorm), so::

    f = JumpReLU_θ(W_enc x_in/C + b_enc),     ŷ_raw = C·(W_dec f + b_dec)
    L = mean_b(‖y_raw/C − (W_dec f + b_dec)‖² + λ Σ_i H(z_i − θ_i))

A *skip transcoder* (Gemma Scope 2, "affine skip connection"; ``skip=True``) adds a linear map of the input,
``W_skip [d_in, d_out]`` initialised to zero and trained with the rest::

    ŷ = W_dec f + b_dec + x W_skip          (normalized scale, x = x_raw/C)
    ŷ_raw = C·ŷ = C·(W_dec f + b_dec) + x_raw W_skip

so ``W_skip`` means the same on both scales. Standardization (App. A eqs. 7-9 without the ``b_dec`` term)
gives ``b'_enc = C b_enc``, ``b'_dec = C b_dec``, ``θ' = C θ`` and leaves ``W_enc``, ``W_dec`` and ``W_skip``
unchanged; the standardized transcoder maps raw ``mlp_in`` to raw ``mlp_out``.

Not in the recipe: ``target_norm_scale = C_t`` divides the target by its own scale instead (``y = y_raw/C_t``,
``E‖y‖² = 1`` with the store's C_t). On Gemma 3 ``mlp_out`` is ~57× the scale of the normalized input, so with
App. B's single C the latents, ``W_enc``, ``b_enc`` and θ must grow ~57× during training — more than Adam's
bounded steps allow in a run of 10⁶ tokens (the short-budget preset uses C_t; see TrainConfig). Then
``ŷ_raw = C_t·(W_dec f + b_dec + x W_skip)``, and standardization gives ``W'_enc = (C_t/C) W_enc``,
``b'_enc = C_t b_enc``, ``θ' = C_t θ``, ``b'_dec = C_t b_dec``, ``W'_skip = (C_t/C) W_skip`` (latents ``C_t ×``
the training-time ones); with ``C_t = C`` that is the standardization above.
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
from saescope.sae.jumprelu import (
    DEFAULT_THRESHOLD,
    PARAMETER_NAMES,
    JumpReLUSAE,
    dtype_name,
    seeded_generator,
    torch_dtype,
)
from saescope.sae.losses import CountReducer, LossOptions, as_loss_options, frequency_loss
from saescope.sae.ste import heaviside, jumprelu

SKIP_NAME = "W_skip"


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


def transcoder_architecture(skip: bool) -> str:
    return "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"


class JumpReLUTranscoder(JumpReLUSAE):
    """A JumpReLU transcoder ``mlp_in → mlp_out`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]`` and,
    with ``skip=True``, ``W_skip [d_in, d_out]`` (zero at initialisation). ``W_skip`` is None without skip.

    ``norm_scale`` is ``C`` (the input's RMS norm, √d_model after RMSNorm); the pre-encoder bias is always off.
    A ``config`` (e.g. read from a file) supplies ``d_out`` when it is not given; its architecture must agree
    with ``skip`` (an older config saying ``jumprelu`` is upgraded to the transcoder architecture).
    """

    W_skip: nn.Parameter | None

    def __init__(self, d_in: int, d_sae: int, norm_scale: float | None = None, *, d_out: int | None = None,
                 skip: bool = False, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str | None = None, bandwidth: float = 0.001, seed: int | None = None,
                 config: SAEConfig | None = None, target_norm_scale: float | None = None, **metadata: Any):
        architecture = transcoder_architecture(skip)
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        if config is not None:
            if config.apply_b_dec_to_input:
                raise SaescopeError("a transcoder has no pre-encoder bias (App. B): apply_b_dec_to_input must "
                                    "be false")
            if d_out is None:
                d_out = config.output_width
            elif config.d_out is not None and config.d_out != d_out:
                raise ValueError(f"config says d_out={config.d_out} but the transcoder was built with d_out={d_out}")
            if config.is_transcoder and config.architecture != architecture:
                raise ValueError(f"config says architecture {config.architecture!r} but the transcoder was built "
                                 f"with skip={skip}")
            config = config.model_copy(update={"architecture": architecture, "d_out": d_out})
        else:
            d_out = d_in if d_out is None else d_out
            if norm_scale is None:
                norm_scale = math.sqrt(d_in)
            config = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, d_out=d_out,
                               norm_scale=float(norm_scale), apply_b_dec_to_input=False, bandwidth=bandwidth,
                               dtype=dtype_name(dtype),
                               target_norm_scale=None if target_norm_scale is None else float(target_norm_scale),
                               **metadata)
        self._d_out = d_out
        self._skip = skip
        super().__init__(d_in, d_sae, config.norm_scale, dtype=dtype, device=device, apply_b_dec_to_input=False,
                         bandwidth=config.bandwidth, seed=seed, config=config)

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def skip(self) -> bool:
        return self.W_skip is not None

    @property
    def target_scale(self) -> float:
        """``C_t``, what the target is divided by: ``target_norm_scale``, else ``norm_scale`` (App. B)."""
        t = self.config.target_norm_scale
        return self.norm_scale if t is None else t

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """App. B: ``W_dec`` and ``W_enc`` drawn independently (unit-norm latent directions), zero biases,
        θ = 0.001; ``W_skip = 0`` (so a fresh skip transcoder computes what the same one without skip does)."""
        d_out = getattr(self, "_d_out", self.W_dec.shape[1])
        if self.W_dec.shape[1] != d_out:
            self.W_dec = nn.Parameter(torch.empty(self.W_dec.shape[0], d_out, dtype=self.W_dec.dtype,
                                                  device=self.W_dec.device))
            self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=self.b_dec.dtype, device=self.b_dec.device))
        d_in, d_sae = self.W_enc.shape
        if getattr(self, "_skip", False):
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, dtype=self.W_enc.dtype, device=self.W_enc.device))
        else:
            self.register_parameter(SKIP_NAME, None)
        generator = seeded_generator(seed)
        w_dec = torch.rand(d_sae, d_out, generator=generator, dtype=torch.float64) * 2 - 1
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        w_enc = torch.rand(d_in, d_sae, generator=generator, dtype=torch.float64) * 2 - 1
        w_enc = w_enc / w_enc.norm(dim=0, keepdim=True)
        self.W_dec.copy_(w_dec.to(self.W_dec.dtype))
        self.W_enc.copy_(w_enc.to(self.W_enc.dtype))
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(DEFAULT_THRESHOLD)
        if self.W_skip is not None:
            self.W_skip.zero_()

    @classmethod
    @torch.no_grad()
    def from_parameters(cls, parameters: dict[str, torch.Tensor], config: SAEConfig,
                        device: torch.device | str | None = None) -> JumpReLUTranscoder:
        """A transcoder holding exactly these tensors (bit for bit); with skip when ``W_skip`` is among them."""
        skip = SKIP_NAME in parameters
        d_out = int(parameters["W_dec"].shape[1])
        out = cls(config.d_in, config.d_sae, d_out=d_out, skip=skip, dtype=torch_dtype(config.dtype),
                  device=device, config=config, seed=0)
        out._copy_parameters(parameters, PARAMETER_NAMES + ((SKIP_NAME,) if skip else ()))
        return out

    # ------------------------------------------------------------------ inference
    def _skip_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_skip`` (the same on the raw and the normalized scale when ``C_t = C``, module docstring)."""
        assert self.W_skip is not None
        return x.to(self.dtype) @ self.W_skip

    def decode(self, f: torch.Tensor, x_raw: torch.Tensor | None = None) -> torch.Tensor:
        """``ŷ_raw = C_t·(W_dec f + b_dec)`` plus ``(C_t/C)·x_raw W_skip`` for a skip transcoder (which needs
        ``x_raw``); ``C_t = C`` unless ``target_norm_scale`` is set."""
        y_hat = self._decode_normalized(f)
        if self.target_scale != 1.0:
            y_hat = y_hat * self.target_scale
        if self.W_skip is None:
            return y_hat
        if x_raw is None:
            raise ValueError("a skip transcoder's output depends on its input: call decode(f, x_raw) or "
                             "forward(x_raw)")
        self._check_input(x_raw)
        skip = self._skip_normalized(x_raw)
        ratio = self.target_scale / self.norm_scale
        return y_hat + (skip if ratio == 1.0 else skip * ratio)

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        """The prediction of raw ``mlp_out`` from raw ``mlp_in`` (with the skip term when present)."""
        return self.decode(self.encode(x_raw), x_raw)

    def normalize_target(self, y_raw: torch.Tensor) -> torch.Tensor:
        """``y = y_raw / C_t`` (``C_t = C``, the input's scale, App. B, unless ``target_norm_scale`` is set)."""
        if y_raw.shape[-1] != self.d_out:
            raise ValueError(f"target has last dimension {y_raw.shape[-1]} but this transcoder writes "
                             f"d_out={self.d_out}")
        y = y_raw.to(self.dtype)
        return y if self.target_scale == 1.0 else y / self.target_scale

    # ------------------------------------------------------------------ training
    def training_forward(self, x_raw: torch.Tensor, y_raw: torch.Tensor,  # type: ignore[override]
                         loss: LossOptions | float, *, reduce_counts: CountReducer | None = None
                         ) -> TranscoderTrainingOutput:
        """Loss ``mean_b(‖y − ŷ‖² + λ·Σ_i H(z_i − θ_i))`` with ``x = x_raw/C``, ``y = y_raw/C`` (App. B) and
        ``ŷ = W_dec f + b_dec (+ x W_skip)``, for a bare λ. :class:`~saescope.sae.losses.LossOptions`:
        ``target_l0`` swaps ``λ·L0`` for Gemma Scope 2's ``λ·(2/L0_target)(L0 − L0_target)²``,
        ``frequency_penalty`` adds ``λ·F`` (:func:`saescope.sae.losses.frequency_loss`); Matryoshka prefixes are
        for SAEs only."""
        options = as_loss_options(loss)
        if options.matryoshka_prefixes is not None:
            raise ValueError("Matryoshka prefixes are for SAEs; a transcoder's loss takes none")
        x = self.normalize(x_raw)
        y = self.normalize_target(y_raw)
        z = self._pre_activations_normalized(x)
        f = jumprelu(z, self.threshold, self.config.bandwidth)
        y_hat = self._decode_normalized(f)
        if self.W_skip is not None:
            y_hat = y_hat + self._skip_normalized(x)
        reconstruction = (y - y_hat).pow(2).sum(dim=-1)
        active = heaviside(z, self.threshold, self.config.bandwidth)
        l0 = active.sum(dim=-1)
        lam = options.sparsity_coefficient
        loss_value = (reconstruction + lam * options.token_penalty(l0)).mean()
        if options.frequency:
            loss_value = loss_value + lam * frequency_loss(active, options, reduce_counts)
        return TranscoderTrainingOutput(x=x, target=y, x_hat=y_hat, pre_activations=z, latents=f, l0=l0,
                                        reconstruction=reconstruction, loss=loss_value)

    # ------------------------------------------------------------------ standardization and files
    @torch.no_grad()
    def standardize(self) -> JumpReLUTranscoder:
        """App. A eqs. 7-9 without a pre-encoder bias: ``b'_enc = C b_enc``, ``b'_dec = C b_dec``, ``θ' = C θ``;
        ``W_enc``, ``W_dec`` and ``W_skip`` unchanged (``x_raw W_skip = C·(x W_skip)``, module docstring).
        With a target scale ``C_t``: ``C_t`` in place of ``C`` and ``W_enc``, ``W_skip`` times ``C_t/C``."""
        C_t = float(self.target_scale)
        ratio = C_t / float(self.norm_scale)
        config = self.config.model_copy(update={"norm_scale": 1.0, "target_norm_scale": None,
                                                "apply_b_dec_to_input": False, "standardized": True})
        out = JumpReLUTranscoder(self.d_in, self.d_sae, 1.0, d_out=self.d_out, skip=self.skip, dtype=self.dtype,
                                 device=self.device, config=config, seed=0)
        out.W_dec.copy_(self.W_dec)
        scaled = [("b_enc", C_t), ("b_dec", C_t), ("threshold", C_t), ("W_enc", ratio)]
        if self.W_skip is not None:
            scaled.append(("W_skip", ratio))
        for name, factor in scaled:
            value = getattr(self, name)
            getattr(out, name).copy_(value if factor == 1.0 else (factor * value.to(torch.float64)).to(value.dtype))
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The five parameters by their paper names, plus ``W_skip`` for a skip transcoder (detached)."""
        tensors = super().state_tensors()
        if self.W_skip is not None:
            tensors[SKIP_NAME] = self.W_skip.detach()
        return tensors

    def save(self, path: str | Path, format: str = "native") -> Path:
        """Write the transcoder (``W_dec [d_sae, d_out]``, and ``W_skip`` if present) in ``"native"``,
        ``"gemma-scope"`` (no skip), ``"gemma-scope-2"`` or ``"saelens"`` format; see :mod:`saescope.formats`."""
        return super().save(path, format=format)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", d_out={self.d_out}, skip={self.skip}"
