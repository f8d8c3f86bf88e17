"""Which module a file's weights belong to: a JumpReLU SAE, a transcoder or a skip transcoder.

Every reader ends here, so ``load_sae`` returns a :class:`~saescope.sae.transcoder.JumpReLUTranscoder` for any
transcoder file (with ``W_skip`` when the file holds the skip matrix) and a
:class:`~saescope.sae.topk.TopKSAE` for a TopK file and a :class:`~saescope.sae.jumprelu.JumpReLUSAE` otherwise.
"""

from __future__ import annotations

import torch

from saescope.config import SAEConfig
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.topk import TopKSAE
from saescope.sae.transcoder import SKIP_NAME, JumpReLUTranscoder, transcoder_architecture


def upgrade_legacy_config(config: SAEConfig) -> SAEConfig:
    """Native files written before ``architecture`` / ``d_out`` existed marked a transcoder only in
    ``training["kind"]`` (the trainer's summary); read those as ``jumprelu_transcoder`` with ``d_out = d_in``."""
    if config.architecture == "jumprelu" and config.training.get("kind") == "transcoder" \
            and not config.apply_b_dec_to_input:
        return config.model_copy(update={"architecture": "jumprelu_transcoder", "d_out": config.d_in})
    return config


def module_from_parameters(params: dict[str, torch.Tensor], config: SAEConfig,
                           device: torch.device | str | None = None) -> JumpReLUSAE:
    """The SAE or transcoder holding ``params`` (checked by :func:`~saescope.formats.checks.check_parameters`).

    A transcoder's ``architecture`` and ``d_out`` are set from the tensors (``W_skip`` present → skip)."""
    if config.is_transcoder or SKIP_NAME in params:
        config = config.model_copy(update={"architecture": transcoder_architecture(SKIP_NAME in params),
                                           "d_out": int(params["W_dec"].shape[1])})
        return JumpReLUTranscoder.from_parameters(params, config, device=device)
    if config.architecture == "topk":
        return TopKSAE.from_parameters(params, config, device=device)
    return JumpReLUSAE.from_parameters(params, config, device=device)
