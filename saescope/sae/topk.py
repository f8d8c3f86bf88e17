"""TopK and BatchTopK SAEs: the baselines users compare JumpReLU with (SAELens, sparsify, dictionary_learning).

Both share the JumpReLU SAE's parameters and scales (``W_enc, b_enc, W_dec, b_dec`` on ``x = x_raw / C``,
Gemma Scope App. A) and differ in how the latents are chosen from ``z = (x − b_dec) W_enc + b_enc``:

- **TopK** (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): per token, the ``k`` largest of
  ``ReLU(z)`` are kept, the rest set to 0. Training minimises ``mean_b ‖x − x̂‖²`` alone (no sparsity term:
  L0 ≤ k by construction). Gradients flow through the kept values; choosing which are kept has none.
- **BatchTopK** (Bussmann et al. 2024, "BatchTopK sparse autoencoders"): over the whole batch of ``B`` tokens,
  the ``B·k`` largest of ``ReLU(z)`` are kept, so the mean L0 is ``k`` while each token's varies. At inference
  there is no batch: the SAE is a JumpReLU with one threshold θ for every latent, the running estimate of the
  smallest value the batch selection kept (an exponential moving average over steps, as dictionary_learning
  and SAELens do). So a trained BatchTopK SAE *is* a :class:`~saescope.sae.jumprelu.JumpReLUSAE` and is saved
  as one (``training["architecture"] = "batchtopk"``), in every format.

A TopK SAE keeps a ``threshold`` parameter at 0 (``ReLU`` before the selection) so that the JumpReLU machinery
(standardization, eq. 9 scales it by C: still 0) applies unchanged; SAELens files of architecture ``topk``
carry ``k`` and no threshold.
"""

from __future__ import annotations

from typing import Any

import torch

from saescope.config import SAEConfig
from saescope.sae.jumprelu import JumpReLUSAE, TrainingOutput, dtype_name, torch_dtype

BATCH_TOPK_THRESHOLD_DECAY = 0.99
"""Decay of the moving average of BatchTopK's smallest kept value (its inference threshold)."""


def topk_latents(z: torch.Tensor, k: int) -> torch.Tensor:
    """``ReLU(z)`` with all but each row's ``k`` largest entries set to 0 (differentiable in the kept values)."""
    if not 0 < k <= z.shape[-1]:
        raise ValueError(f"k must be in 1..{z.shape[-1]} (the number of latents), got {k}")
    values, index = torch.relu(z).topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, index, values)


def batch_topk_latents(z: torch.Tensor, k: int) -> tuple[torch.Tensor, float | None]:
    """``ReLU(z)`` with all but the batch's ``B·k`` largest entries set to 0, and the smallest positive value
    kept (None if none is positive): the sample that BatchTopK's inference threshold averages."""
    if not 0 < k <= z.shape[-1]:
        raise ValueError(f"k must be in 1..{z.shape[-1]} (the number of latents), got {k}")
    flat = torch.relu(z).reshape(-1)
    values, index = flat.topk(k * z.shape[0])
    kept = torch.zeros_like(flat).scatter(0, index, values).view_as(z)
    positive = values.detach()[values.detach() > 0]
    return kept, (float(positive.min()) if len(positive) else None)


class TopKSAE(JumpReLUSAE):
    """A TopK SAE: ``f = TopK_k(ReLU(W_enc (x_raw/C − b_dec) + b_enc))``, ``x̂_raw = C·(W_dec f + b_dec)``.

    Initialised like the JumpReLU SAE (recipe §2) with θ = 0; ``k`` is stored in its config."""

    def __init__(self, d_in: int, d_sae: int, norm_scale: float = 1.0, *, k: int | None = None,
                 dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None,
                 seed: int | None = None, config: SAEConfig | None = None, **metadata: Any):
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        if config is None:
            if k is None:
                raise ValueError("a TopK SAE needs k, the number of latents kept per token")
            config = SAEConfig(architecture="topk", k=k, d_in=d_in, d_sae=d_sae, norm_scale=float(norm_scale),
                               dtype=dtype_name(dtype), **metadata)
        elif config.architecture != "topk" or config.k is None:
            raise ValueError(f"a TopK SAE's config must say architecture 'topk' with k, got "
                             f"{config.architecture!r} with k {config.k}")
        super().__init__(d_in, d_sae, dtype=dtype, device=device, seed=seed, config=config)
        with torch.no_grad():
            self.threshold.zero_()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        super().reset_parameters(seed)
        self.threshold.zero_()

    @property
    def k(self) -> int:
        return int(self.config.k)

    def encode(self, x_raw: torch.Tensor) -> torch.Tensor:
        """The ``k`` largest of ``ReLU(z)`` per token (any extra leading dimensions are kept)."""
        return topk_latents(self.pre_activations(x_raw), self.k)

    def training_forward(self, x_raw: torch.Tensor, loss: Any = None, **_: Any) -> TrainingOutput:
        """``mean_b ‖x − x̂‖²`` with the TopK latents (there is no sparsity term; ``loss`` is ignored)."""
        x = self.normalize(x_raw)
        z = self._pre_activations_normalized(x)
        f = topk_latents(z, self.k)
        x_hat = self._decode_normalized(f)
        reconstruction = (x - x_hat).pow(2).sum(dim=-1)
        return TrainingOutput(x=x, x_hat=x_hat, pre_activations=z, latents=f, l0=(f != 0).sum(dim=-1),
                              reconstruction=reconstruction, loss=reconstruction.mean())

    def extra_repr(self) -> str:
        return f"k={self.k}, " + super().extra_repr()


def batch_topk_training_forward(sae: JumpReLUSAE, x_raw: torch.Tensor, k: int
                                ) -> tuple[TrainingOutput, float | None]:
    """BatchTopK's training pass on a JumpReLU SAE's parameters: ``mean_b ‖x − x̂‖²`` with the batch's ``B·k``
    largest latents kept, and the smallest positive value kept (for :func:`update_batch_topk_threshold`)."""
    x = sae.normalize(x_raw)
    z = sae._pre_activations_normalized(x)
    f, kept_min = batch_topk_latents(z, k)
    x_hat = sae._decode_normalized(f)
    reconstruction = (x - x_hat).pow(2).sum(dim=-1)
    out = TrainingOutput(x=x, x_hat=x_hat, pre_activations=z, latents=f, l0=(f != 0).sum(dim=-1),
                         reconstruction=reconstruction, loss=reconstruction.mean())
    return out, kept_min


@torch.no_grad()
def update_batch_topk_threshold(sae: JumpReLUSAE, kept_min: float | None, first: bool,
                                decay: float = BATCH_TOPK_THRESHOLD_DECAY) -> None:
    """θ ← decay·θ + (1 − decay)·kept_min for every latent (θ ← kept_min on the first step)."""
    if kept_min is None:
        return
    if first:
        sae.threshold.fill_(kept_min)
    else:
        sae.threshold.mul_(decay).add_((1.0 - decay) * kept_min)
