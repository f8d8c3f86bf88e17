"""The JumpReLU sparse autoencoder (Gemma Scope §2-3; JumpReLU paper, Rajamanoharan et al. 2024).

Forward on raw activations ``x_raw`` with norm scale ``C`` (Gemma Scope Appendix A, eqs. 5-6)::

    f(x_raw)     = JumpReLU_θ(W_enc (x_raw / C − b_dec) + b_enc)        (5)
    x̂_raw(f)     = C · (W_dec f + b_dec)                                 (6)

Weights are stored as in the Gemma Scope release: ``W_enc [d_in, d_sae]`` and ``W_dec [d_sae, d_in]``, so in
code ``z = x @ W_enc + b_enc`` and ``x̂ = f @ W_dec + b_dec``.

Training loss per token, on the normalized input ``x = x_raw / C`` (recipe §1, JumpReLU paper eq. 10)::

    L = ‖x − x̂‖² + λ · Σ_i H(z_i − θ_i)

averaged over the batch, where ``z`` are the pre-activations and ``H`` the Heaviside step with its
straight-through estimator (:mod:`saescope.sae.ste`). The L0 is computed from ``z`` — not from the
post-JumpReLU values, which would give a latent just below its threshold no gradient to θ
(dictionary_learning issue #55).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saescope.config import SAEConfig
from saescope.sae.losses import (
    CountReducer,
    LossOptions,
    as_loss_options,
    frequency_loss,
    matryoshka_reconstruction,
)
from saescope.sae.saving import save_module
from saescope.sae.ste import heaviside, jumprelu

DEFAULT_THRESHOLD = 0.001  # recipe §2: initial θ


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or randomly when None), for reproducible initialisation."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name (``"float32"`` → ``torch.float32``)."""
    return {"float32": torch.float32, "float64": torch.float64,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "float32", torch.float64: "float64",
             torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype not in names:
        raise ValueError(f"unsupported SAE dtype {dtype}; use one of {sorted(names.values())}")
    return names[dtype]


@dataclass
class TrainingOutput:
    """What one training-time forward pass produces (all on the normalized scale ``x = x_raw / C``)."""

    x: torch.Tensor             # normalized input [batch, d_in]
    x_hat: torch.Tensor         # normalized reconstruction [batch, d_in]
    pre_activations: torch.Tensor   # z [batch, d_sae]
    latents: torch.Tensor       # f = JumpReLU_θ(z) [batch, d_sae]
    l0: torch.Tensor            # Σ_i H(z_i − θ_i) per token [batch] (differentiable w.r.t. θ)
    reconstruction: torch.Tensor    # ‖x − x̂‖² per token [batch]
    loss: torch.Tensor          # mean over the batch of reconstruction + λ·l0


class JumpReLUSAE(nn.Module):
    """A JumpReLU SAE with parameters ``W_enc, b_enc, W_dec, b_dec, threshold``.

    ``JumpReLUSAE(d_in=640, d_sae=4096, norm_scale=C)`` builds one initialised per the recipe (§2):
    ``W_dec`` He-uniform then each row scaled to unit norm, ``W_enc = W_decᵀ``, zero biases, θ = 0.001.
    Weights are float32 unless ``dtype`` says otherwise; the threshold is always kept in float32 or wider
    (SAELens PR #728: Adam steps on θ round away in bfloat16).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        norm_scale: float = 1.0,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str | None = None,
        apply_b_dec_to_input: bool = True,
        bandwidth: float = 0.001,
        seed: int | None = None,
        config: SAEConfig | None = None,
        **metadata: Any,
    ):
        super().__init__()
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        if config is None:
            config = SAEConfig(d_in=d_in, d_sae=d_sae, norm_scale=float(norm_scale),
                               apply_b_dec_to_input=apply_b_dec_to_input, bandwidth=bandwidth,
                               dtype=dtype_name(dtype), **metadata)
        elif (config.d_in, config.d_sae) != (d_in, d_sae):
            raise ValueError(f"config says d_in={config.d_in}, d_sae={config.d_sae} "
                             f"but the SAE was built with d_in={d_in}, d_sae={d_sae}")
        self.config = config
        threshold_dtype = torch.promote_types(dtype, torch.float32)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.threshold = nn.Parameter(torch.full((d_sae,), DEFAULT_THRESHOLD, dtype=threshold_dtype,
                                                 device=device))
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Recipe §2: ``W_dec`` He-uniform, rows to unit norm, ``W_enc = W_decᵀ``, zero biases, θ = 0.001."""
        generator = seeded_generator(seed)
        d_sae, d_in = self.W_dec.shape
        # He-uniform for the decoder as a map from d_sae latents: bound sqrt(6 / fan_in), fan_in = d_sae.
        # (The bound only sets a scale, which the unit-norm step removes; the direction is what matters.)
        bound = math.sqrt(6.0 / d_sae)
        w = (torch.rand(d_sae, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w.to(self.W_dec.dtype))
        self.W_enc.copy_(w.T.to(self.W_enc.dtype))
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(DEFAULT_THRESHOLD)

    @classmethod
    @torch.no_grad()
    def from_parameters(cls, parameters: dict[str, torch.Tensor], config: SAEConfig,
                        device: torch.device | str | None = None) -> JumpReLUSAE:
        """An SAE holding exactly these tensors (copied bit for bit; weights in ``config.dtype``)."""
        sae = cls(config.d_in, config.d_sae, dtype=torch_dtype(config.dtype), device=device, config=config,
                  seed=0)
        sae._copy_parameters(parameters, PARAMETER_NAMES)
        return sae

    @torch.no_grad()
    def _copy_parameters(self, parameters: dict[str, torch.Tensor], names) -> None:
        """Copy ``parameters[name]`` into each named parameter, in the parameter's dtype (θ is never narrowed:
        a float64 threshold stays float64, none goes below float32)."""
        for name in names:
            target = getattr(self, name)
            source = parameters[name]
            if name == "threshold" and source.dtype != target.dtype and source.is_floating_point():
                target.data = torch.empty_like(target, dtype=torch.promote_types(source.dtype, target.dtype))
            target.copy_(source.to(dtype=target.dtype, device=target.device))

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    @property
    def norm_scale(self) -> float:
        return self.config.norm_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ------------------------------------------------------------------ inference (eqs. 5-6)
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has last dimension {x.shape[-1]} but this SAE reads d_in={self.d_in}"
                             f" (site {self.config.site or 'unknown'})")

    def normalize(self, x_raw: torch.Tensor) -> torch.Tensor:
        """``x = x_raw / C`` in the SAE's dtype (Appendix A)."""
        self._check_input(x_raw)
        x = x_raw.to(self.dtype)
        return x if self.norm_scale == 1.0 else x / self.norm_scale

    def _pre_activations_normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def pre_activations(self, x_raw: torch.Tensor) -> torch.Tensor:
        """``z = W_enc (x_raw/C − b_dec) + b_enc`` (the argument of JumpReLU in eq. 5)."""
        return self._pre_activations_normalized(self.normalize(x_raw))

    def encode(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Eq. 5: ``f = JumpReLU_θ(W_enc (x_raw/C − b_dec) + b_enc)``."""
        z = self.pre_activations(x_raw)
        return jumprelu(z, self.threshold, self.config.bandwidth)

    def _decode_normalized(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Eq. 6: ``x̂_raw = C · (W_dec f + b_dec)``."""
        x_hat = self._decode_normalized(f)
        return x_hat if self.norm_scale == 1.0 else x_hat * self.norm_scale

    def forward(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw activations: ``decode(encode(x_raw))``."""
        return self.decode(self.encode(x_raw))

    # ------------------------------------------------------------------ training
    def training_forward(self, x_raw: torch.Tensor, loss: LossOptions | float, *,
                         reduce_counts: CountReducer | None = None) -> TrainingOutput:
        """The training-time forward pass and loss (recipe §1) on a batch ``[batch, d_in]`` of raw activations.

        ``loss = mean_batch(‖x − x̂‖² + λ·Σ_i H(z_i − θ_i))`` with ``x = x_raw / C`` for a bare λ. Gradients reach
        θ from both terms through the straight-through estimators; none reach ``z`` through the step.
        :class:`~saescope.sae.losses.LossOptions` adds Gemma Scope 2's options: ``target_l0`` swaps ``λ·L0`` for
        ``λ·(2/L0_target)(L0 − L0_target)²``; ``matryoshka_prefixes`` swaps the reconstruction term for the
        nested-prefix sum (``reconstruction`` then holds that sum); ``frequency_penalty`` adds ``λ·F``
        (:func:`saescope.sae.losses.frequency_loss`; ``reduce_counts`` sums the firing counts over data ranks).
        """
        options = as_loss_options(loss)
        options.check_width(self.d_sae)
        x = self.normalize(x_raw)
        z = self._pre_activations_normalized(x)
        f = jumprelu(z, self.threshold, self.config.bandwidth)
        x_hat = self._decode_normalized(f)
        if options.matryoshka_prefixes is None:
            reconstruction = (x - x_hat).pow(2).sum(dim=-1)
        else:
            reconstruction = matryoshka_reconstruction(x, f.to(self.dtype), self.W_dec, self.b_dec,
                                                       options.matryoshka_prefixes, options.matryoshka_weights)
        active = heaviside(z, self.threshold, self.config.bandwidth)
        l0 = active.sum(dim=-1)
        lam = options.sparsity_coefficient
        loss_value = (reconstruction + lam * options.token_penalty(l0)).mean()
        if options.frequency:
            loss_value = loss_value + lam * frequency_loss(active, options, reduce_counts)
        return TrainingOutput(x=x, x_hat=x_hat, pre_activations=z, latents=f, l0=l0,
                              reconstruction=reconstruction, loss=loss_value)

    # ------------------------------------------------------------------ standardization and files
    def standardize(self) -> JumpReLUSAE:
        """Appendix A (eqs. 7-11): a new SAE on raw activations with no norm scale and no pre-encoder bias."""
        from saescope.sae.standardize import standardize

        return standardize(self)

    def save(self, path: str | Path, format: str = "native") -> Path:
        """Write the SAE to the folder ``path`` in ``"native"``, ``"gemma-scope"``, ``"gemma-scope-2"``
        or ``"saelens"`` format; returns the folder. See :mod:`saescope.formats`."""
        return save_module(self, path, format=format)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The five parameters by their paper names (detached)."""
        return {name: getattr(self, name).detach() for name in PARAMETER_NAMES}

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_in={c.d_in}, d_sae={c.d_sae}, norm_scale={c.norm_scale:g}, "
                f"apply_b_dec_to_input={c.apply_b_dec_to_input}, standardized={c.standardized}, "
                f"site={c.site}, layer={c.layer}, model={c.model}")


PARAMETER_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def parameter_shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The expected shape of each parameter."""
    return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
            "threshold": (d_sae,)}
