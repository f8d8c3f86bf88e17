"""The loss options every step implementation is tested with, and the two small builders the tests share.

``LOSS_CASES`` must exercise every field of :class:`saescope.sae.losses.LossOptions` (checked by
tests/test_fast_path.py::test_loss_cases_cover_every_option): a new option fails that test until it has a case
here, and then every equivalence test parametrized over ``LOSS_CASES`` (sparse = dense = kernels = sharded)
runs it. The cases are written for an SAE of width 96 (Matryoshka prefixes end there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saescope.train.step import LossOptions, SAEParams

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

LOSS_CASES: dict[str, dict] = {
    "plain": {},
    "target_l0": {"target_l0": 30.0},
    "target_l0_batch": {"target_l0": 30.0, "target_l0_over": "batch"},
    "matryoshka": {"matryoshka_prefixes": (17, 50, 96), "matryoshka_weights": (0.5, 1.7, 1.1)},
    "matryoshka+target_l0": {"matryoshka_prefixes": (17, 50, 96), "target_l0": 30.0},
    "frequency": {"frequency_penalty": 3.0, "frequency_cap": 0.05},
    "frequency+target_l0": {"frequency_penalty": 1.5, "frequency_cap": 0.02, "target_l0": 30.0},
    "frequency+target_l0_batch": {"frequency_penalty": 1.5, "frequency_cap": 0.02, "target_l0": 30.0,
                                  "target_l0_over": "batch"},
}


def scaled_case(name: str, d_sae: int) -> dict:
    """``LOSS_CASES[name]`` for an SAE of another width (prefixes scaled, the last one = ``d_sae``)."""
    case = dict(LOSS_CASES[name])
    if "matryoshka_prefixes" in case:
        *head, last = case["matryoshka_prefixes"]
        case["matryoshka_prefixes"] = (*(max(1, round(m * d_sae / last)) for m in head), d_sae)
    return case


def loss(lam: float, **options) -> LossOptions:
    """:class:`LossOptions` with λ and the options (lists become tuples; None options dropped)."""
    return LossOptions(lam, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()
                               if v is not None})


def params(module=None, bandwidth: float | None = None, apply_b_dec: bool | None = None, *,
           tensors: Sequence[torch.Tensor] | None = None, W_skip: torch.Tensor | None = None) -> SAEParams:
    """:class:`SAEParams` of a module (its bandwidth and pre-encoder bias unless given), or of the tensors
    ``W_enc, b_enc, W_dec, b_dec, threshold``."""
    if tensors is None:
        tensors = [getattr(module, n).detach() for n in PARAMS]
        bandwidth = module.config.bandwidth if bandwidth is None else bandwidth
        apply_b_dec = module.config.apply_b_dec_to_input if apply_b_dec is None else apply_b_dec
        if W_skip is None and getattr(module, "W_skip", None) is not None:
            W_skip = module.W_skip.detach()
    return SAEParams(*tensors, bandwidth=bandwidth, apply_b_dec_to_input=bool(apply_b_dec), W_skip=W_skip)
