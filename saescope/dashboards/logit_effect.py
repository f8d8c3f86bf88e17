"""A latent's direct effect on the logits: its decoder direction through the final norm and unembedding.

For a residual-stream direction ``d`` (a row of ``W_dec``) the effect on the logits is the linear map the
model applies at the end of the stream, with the final norm's input-dependent ``1/rms`` scale dropped (it is
one positive number per token, so it does not change which tokens rank highest):

    effect(d) = W_U · (γ ⊙ d),   γ = offset + w   (Gemma's RMSNorm multiplies by ``1 + w``; Llama/GPT-2 by ``w``)

Gemma 2's final logit soft-cap ``cap·tanh(z/cap)`` is monotone, so it is NOT applied (it would only squash
the values, not reorder them). Sites outside the residual stream are mapped into it first: ``attn_out``
through the attention output projection ``W_O`` (and Gemma 2/3's post-attention norm gain); ``mlp_in`` is
the MLP's *input*, not a write to the stream, so it has no logit effect (``None``).
"""

from __future__ import annotations

from typing import Any

import torch

from saescope.config import Site
from saescope.sites import _get_module, _unwrap, decoder_layers, site_module, spec_of

_FINAL_NORMS = ("model.norm", "transformer.ln_f", "model.final_layernorm")


def final_norm_gain(model: Any) -> torch.Tensor:
    """``γ = offset + w`` of the final norm (float64, ``[d_model]``)."""
    lm = _unwrap(model)
    spec = spec_of(lm)
    for path in _FINAL_NORMS:
        module = _get_module(lm, path, strict=False)
        if module is not None and getattr(module, "weight", None) is not None:
            return module.weight.detach().double().cpu() + spec.norm_gain_offset
    d = lm.get_input_embeddings().weight.shape[1]
    return torch.ones(d, dtype=torch.float64)


def to_residual(model: Any, site: Site | str, directions: torch.Tensor) -> torch.Tensor | None:
    """Map site-space directions ``[n, width]`` to residual-stream directions ``[n, d_model]`` (float64)."""
    lm = _unwrap(model)
    parsed = Site.parse(site)
    directions = directions.detach().double().cpu()
    if parsed.kind in ("resid_post", "mlp_out"):
        return directions
    if parsed.kind == "mlp_in":
        return None
    module, _ = site_module(lm, parsed)  # attn_out: the input of the output projection
    weight = module.weight.detach().double().cpu()
    out = directions @ (weight.T if isinstance(module, torch.nn.Linear) else weight)
    bias_free = out
    spec = spec_of(lm)
    if spec.name in ("gemma2", "gemma3"):
        norm = _get_module(decoder_layers(lm)[parsed.layer], "post_attention_layernorm", strict=False)
        if norm is not None:
            bias_free = out * (norm.weight.detach().double().cpu() + spec.norm_gain_offset)
    return bias_free


def logit_effect(model: Any, site: Site | str, directions: torch.Tensor,
                 chunk: int = 64) -> torch.Tensor | None:
    """``W_U (γ ⊙ d)`` for each row ``d`` of ``directions`` → ``[n, vocab]`` float32 (None for ``mlp_in``)."""
    residual = to_residual(model, site, directions)
    if residual is None:
        return None
    lm = _unwrap(model)
    unembed = lm.get_output_embeddings().weight.detach()
    gain = final_norm_gain(lm)
    scaled = (residual * gain).to(unembed.dtype if unembed.is_floating_point() else torch.float32)
    parts = [(scaled[i:i + chunk].to(unembed.device) @ unembed.T).float().cpu()
             for i in range(0, scaled.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros((0, unembed.shape[0]))


def top_logit_tokens(model: Any, site: Site | str, directions: torch.Tensor, k: int = 10,
                     chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per direction, the ``k`` highest and ``k`` lowest effect tokens: (top ids, top values, bottom ids,
    bottom values), each ``[n, k]``; computed ``chunk`` directions at a time (memory ``chunk × vocab``)."""
    if to_residual(model, site, directions[:1]) is None:
        return None
    tops, top_v, bots, bot_v = [], [], [], []
    for i in range(0, directions.shape[0], chunk):
        effect = logit_effect(model, site, directions[i:i + chunk], chunk=chunk)
        v, ids = effect.topk(k, dim=1)
        tops.append(ids), top_v.append(v)
        v, ids = effect.topk(k, dim=1, largest=False)
        bots.append(ids), bot_v.append(v)
    return torch.cat(tops), torch.cat(top_v), torch.cat(bots), torch.cat(bot_v)
