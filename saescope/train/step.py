"""The training step's contract: what every step implementation reads and returns.

Five implementations compute one loss (recipe §1 and §6): the dense autograd step (``training_forward``, the
reference), the sparse step on torch ops, the sparse step on compiled CPU kernels (:mod:`saescope.train.fast_path`),
and the latent-sharded dense step (:mod:`saescope.distributed`). They all take

- :class:`SAEParams`: the SAE's tensors on the normalized scale, with the two settings of its architecture
  that the math reads (the STE bandwidth ε and whether ``b_dec`` is subtracted before the encoder);
- :class:`saescope.sae.losses.LossOptions`: λ of this step and every option of the loss;

and return a :class:`StepResult`. A new loss option is one field of ``LossOptions`` plus its math in each path;
the equivalence tests take their cases from tests/loss_cases.py, which must cover every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saescope.sae.losses import CountReducer, LossOptions, as_loss_options

__all__ = ["CountReducer", "LossOptions", "SAEParams", "StepResult", "as_loss_options"]


@dataclass(frozen=True, eq=False)
class SAEParams:
    """An SAE's (or transcoder's) parameters as one step reads them (normalized scale, no autograd).

    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``threshold [d_sae]``,
    and for a skip transcoder ``W_skip [d_in, d_out]``. Shapes are checked once, here."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor
    bandwidth: float
    apply_b_dec_to_input: bool = True
    W_skip: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.W_enc.dim() != 2 or self.W_dec.dim() != 2:
            raise ValueError(f"W_enc and W_dec must be matrices, got shapes {tuple(self.W_enc.shape)} and "
                             f"{tuple(self.W_dec.shape)}")
        d_in, d_sae = self.W_enc.shape
        d_out = self.W_dec.shape[1]
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "threshold": (d_sae,)}
        if self.W_skip is not None:
            expected["W_skip"] = (d_in, d_out)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}; with W_enc {tuple(self.W_enc.shape)} and d_out {d_out} "
                                 f"it must be {shape}")
        if self.apply_b_dec_to_input and d_out != d_in:
            raise ValueError(f"subtracting b_dec [{d_out}] from the input needs d_out = d_in = {d_in}")
        if not float(self.bandwidth) > 0:
            raise ValueError(f"the STE bandwidth ε must be positive, got {self.bandwidth}")
        object.__setattr__(self, "bandwidth", float(self.bandwidth))

    @classmethod
    def of(cls, module) -> SAEParams:
        """The detached parameters of a :class:`~saescope.sae.jumprelu.JumpReLUSAE` or transcoder."""
        W_skip = getattr(module, "W_skip", None)
        return cls(W_enc=module.W_enc.detach(), b_enc=module.b_enc.detach(), W_dec=module.W_dec.detach(),
                   b_dec=module.b_dec.detach(), threshold=module.threshold.detach(),
                   bandwidth=module.config.bandwidth, apply_b_dec_to_input=module.config.apply_b_dec_to_input,
                   W_skip=None if W_skip is None else W_skip.detach())

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (``W_skip`` where present)."""
        out = [self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold]
        return out if self.W_skip is None else [*out, self.W_skip]


@dataclass
class StepResult:
    """Loss, gradients and batch statistics of one training step (normalized scale)."""

    loss: float
    reconstruction: float          # mean over tokens of ‖t − x̂‖² (the weighted prefix sum for Matryoshka)
    l0: float                      # mean over tokens of the number of active latents
    total_variance: float          # Σ_b ‖t_b − mean(t)‖² (for FVU = Σ reconstruction / total variance)
    fired: torch.Tensor            # bool [d_sae]: latents active on at least one token of the batch
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    # mean over tokens of ‖t − x̂‖² with the whole dictionary (the last Matryoshka prefix): FVU's numerator.
    # Equal to ``reconstruction`` without Matryoshka; None where a caller built the result without it.
    full_reconstruction: float | None = None
    # True where grads["W_dec"] already has each row's component along its decoder row removed
    decoder_gradient_projected: bool = False
