"""Splicing: run the LM with one site replaced by a function of itself, and score next-token prediction.

This is the "Δ LM loss" measurement of Gemma Scope §4 / App. C: the SAE reconstruction ``x̂(x)`` is spliced
in at the site, the forward pass continues from it, and the mean next-token cross-entropy is compared with
the clean run. The unembedding of a large vocabulary (Gemma 3: 262,144 tokens) is applied to the final
hidden states ``chunk_size`` tokens at a time, so memory stays ``O(chunk_size · vocab)`` however long the
batch is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.sites import _check_site, _unwrap, hooked

DEFAULT_CHUNK_SIZE = 512


@dataclass
class SpliceOutput:
    """Result of :func:`run_with_splice`.

    ``loss_per_token[b, t]`` is the cross-entropy of predicting token ``t + 1`` from positions ``≤ t``
    (float32, shape ``[batch, seq - 1]``). ``target_mask[b, t]`` is True where both token ``t`` and token
    ``t + 1`` are real (attention mask 1). ``logits`` is ``[batch, seq, vocab]`` only when asked for.
    """

    loss_per_token: torch.Tensor
    target_mask: torch.Tensor
    logits: torch.Tensor | None = None

    def mean_loss(self) -> float:
        """Mean cross-entropy over the real (unmasked) next-token targets."""
        mask = self.target_mask
        return float((self.loss_per_token * mask).sum() / mask.sum().clamp(min=1))


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping ``cap · tanh(logits / cap)`` (a no-op when ``cap`` is None)."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def token_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    unembed: Callable[[torch.Tensor], torch.Tensor],
    *,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token cross-entropy ``logsumexp(z) − z[target]`` with ``z = softcap(unembed(hidden))``.

    ``hidden`` is ``[..., d_model]`` (final hidden states, after the final norm), ``targets`` the matching
    ``[...]`` token ids. Logits are materialised for ``chunk_size`` rows at a time and reduced in float32,
    so peak memory is ``chunk_size × vocab`` floats. Returns float32 of ``targets``' shape.
    """
    if chunk_size <= 0:
        raise SaescopeError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise SaescopeError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(flat_hidden.device)
    losses = torch.empty(flat_targets.shape[0], dtype=torch.float32, device=flat_hidden.device)
    for start in range(0, flat_targets.shape[0], chunk_size):
        stop = start + chunk_size
        logits = unembed(flat_hidden[start:stop]).float()
        if logits.requires_grad:  # under autograd (run_with_splice(grad=True)): out-of-place ops
            logits = _softcap(logits, softcap)
            picked = logits.gather(-1, flat_targets[start:stop, None]).squeeze(-1)
            losses[start:stop] = torch.logsumexp(logits, dim=-1) - picked
            continue
        # no gradient: the same max-shifted logsumexp, in place on the chunk's logits (no [chunk, vocab]
        # temporaries; the unembedding into a 262k vocabulary dominates an evaluation's time)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        picked = logits.gather(-1, flat_targets[start:stop, None]).squeeze(-1)
        peak = logits.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        lse = logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
        losses[start:stop] = lse - picked
    return losses.reshape(targets.shape)


def final_logit_softcap(model: Any) -> float | None:
    """The final-logit soft-cap of a model's config (Gemma 2: 30.0), or None."""
    config = _unwrap(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "final_logit_softcapping", None)


def run_with_splice(
    model: Any,
    input_ids: torch.Tensor,
    site: Site | str | None,
    fn: Callable[[torch.Tensor], torch.Tensor] | None,
    attention_mask: torch.Tensor | None = None,
    *,
    return_logits: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    splice_mask: torch.Tensor | None = None,
    grad: bool = False,
) -> SpliceOutput:
    """Run ``model`` on ``input_ids`` with the activation at ``site`` replaced by ``fn(activation)``.

    ``fn=None`` (or ``site=None``) is the clean run. ``fn`` receives the site's activation
    ``[batch, seq, width]`` and must return the same shape (e.g. ``sae.forward``). ``splice_mask``
    (bool ``[batch, seq]``) limits the replacement to the True positions and leaves the others clean
    (e.g. False at BOS, which Gemma Scope leaves clean when measuring Δ loss). Runs without gradients
    unless ``grad=True`` (e.g. for ``∇_x L`` at the site, App. C.3; memory then grows with the batch).
    The final hidden states are unembedded in chunks by :func:`token_cross_entropy`; full logits are only
    built when ``return_logits`` is set.
    """
    lm = _unwrap(model)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[-1] < 2:
        raise SaescopeError("run_with_splice needs at least 2 tokens per row to score a next-token prediction")
    device = next(lm.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    callbacks = []
    if fn is not None and site is not None:
        parsed = _check_site(lm, site)
        if splice_mask is not None:
            if splice_mask.shape != input_ids.shape:
                raise SaescopeError(f"splice_mask {tuple(splice_mask.shape)} must match input_ids "
                                    f"{tuple(input_ids.shape)}")
            where = splice_mask.to(device=device, dtype=torch.bool)[..., None]

        def replace(activation: torch.Tensor) -> torch.Tensor:
            new = fn(activation)
            if not isinstance(new, torch.Tensor) or new.shape != activation.shape:
                shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise SaescopeError(f"the splice function must return a tensor of shape "
                                    f"{tuple(activation.shape)} at {parsed.id}, got {shape}")
            new = new.to(activation.dtype)
            return torch.where(where, new, activation) if splice_mask is not None else new

        callbacks.append((parsed, replace))
    base: nn.Module = lm.base_model
    unembed = lm.get_output_embeddings()
    cap = final_logit_softcap(lm)
    with hooked(lm, callbacks), torch.set_grad_enabled(grad):
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        loss = token_cross_entropy(hidden[:, :-1], input_ids[:, 1:], unembed, softcap=cap,
                                   chunk_size=chunk_size)
        logits = _softcap(unembed(hidden), cap) if return_logits else None
    if attention_mask is None:
        target_mask = torch.ones_like(loss, dtype=torch.bool)
    else:
        real = attention_mask.bool()
        target_mask = real[:, 1:] & real[:, :-1]
    return SpliceOutput(loss_per_token=loss, target_mask=target_mask, logits=logits)
