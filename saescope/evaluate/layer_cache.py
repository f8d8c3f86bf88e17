"""The clean pass once, spliced passes from the site's layer (issue 6, part 2).

:func:`clean_pass` runs the language model once on a batch and keeps what every SAE of a suite needs:
the activations at the suite's sites, the *inputs* of the decoder layers the spliced passes will start
from (with the keyword arguments the model gave those layers: attention masks, rotary tables, position
ids), and the clean next-token cross-entropy. :func:`spliced_losses` then replaces one site's activation
with a given tensor (an SAE reconstruction; zeros for the zero-ablation baseline) and runs only the
decoder layers from that site on, from the cached input. Splicing k SAEs at layer L of an N-layer model
costs k × (N − L) layers instead of k full forwards (for ``resid_post`` at L it is N − L − 1: the block
output is the next block's input).

Sites and hooks come from :mod:`saescope.sites` (one table for every architecture); the chunked
cross-entropy from :mod:`saescope.splice`, so memory stays bounded on a 262k vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.sites import _check_site, _unwrap, decoder_layers, hooked
from saescope.splice import DEFAULT_CHUNK_SIZE, final_logit_softcap, token_cross_entropy


@dataclass
class DecoderParts:
    """The pieces of a causal LM that a pass starting at a decoder layer needs."""

    lm: nn.Module
    base: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module
    softcap: float | None


def decoder_parts(model: Any) -> DecoderParts:
    """Decoder layers, final norm and unembedding of a causal LM in the :mod:`saescope.sites` table."""
    lm = _unwrap(model)
    layers = decoder_layers(lm)
    base = lm.base_model
    final_norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    if final_norm is None:
        raise SaescopeError(f"cannot find the final norm of {type(lm).__name__} (looked for .norm and .ln_f)")
    return DecoderParts(lm, base, layers, final_norm, lm.get_output_embeddings(), final_logit_softcap(lm))


def start_layer(site: Site) -> int:
    """The first layer a spliced pass at ``site`` runs: L+1 for ``resid_post`` (block L's output is block
    L+1's input), L for the sites inside block L."""
    return site.layer + 1 if site.kind == "resid_post" else site.layer


@dataclass
class CleanPass:
    """What one clean forward leaves behind for the spliced passes of every SAE in the suite.

    ``sites[site_id]`` is ``[batch, seq, width]``; ``clean_loss[b, t]`` the cross-entropy of predicting
    token t+1 (``[batch, seq-1]``); ``layer_inputs[i]`` the (hidden, extra args, kwargs) of decoder layer i.
    """

    input_ids: torch.Tensor
    sites: dict[str, torch.Tensor]
    layer_inputs: dict[int, tuple[torch.Tensor, tuple, dict]]
    clean_loss: torch.Tensor
    chunk_size: int = DEFAULT_CHUNK_SIZE
    parts: DecoderParts | None = field(default=None, repr=False)

    def losses_from(self, final_hidden: torch.Tensor) -> torch.Tensor:
        p = self.parts
        return token_cross_entropy(final_hidden[:, :-1], self.input_ids[:, 1:], p.unembed, softcap=p.softcap,
                                   chunk_size=self.chunk_size)


@torch.no_grad()
def clean_pass(model: Any, input_ids: torch.Tensor, sites: Iterable[Site | str], *,
               attention_mask: torch.Tensor | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> CleanPass:
    """One clean forward: site activations, cached inputs of the layers splices start from, clean loss."""
    parts = decoder_parts(model)
    parsed = list(dict.fromkeys(_check_site(parts.lm, s) for s in sites))
    device = next(parts.lm.parameters()).device
    input_ids = input_ids.to(device)
    n = len(parts.layers)
    first = min((start_layer(s) for s in parsed), default=n)
    layer_inputs: dict[int, tuple[torch.Tensor, tuple, dict]] = {}
    handles = []
    for i in range(first, n):
        def remember(_m, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            layer_inputs[i] = (hidden, tuple(args[1:]), extra)
        handles.append(parts.layers[i].register_forward_pre_hook(remember, with_kwargs=True))
    captured: dict[str, torch.Tensor] = {}

    def reader(site_id: str):
        def read(tensor: torch.Tensor) -> None:
            captured[site_id] = tensor
        return read

    try:
        with hooked(parts.lm, [(s, reader(s.id)) for s in parsed]):
            out = parts.base(input_ids=input_ids,
                             attention_mask=None if attention_mask is None else attention_mask.to(device),
                             use_cache=False)
    finally:
        for h in handles:
            h.remove()
    cache = CleanPass(input_ids, captured, layer_inputs, torch.empty(0), chunk_size, parts)
    cache.clean_loss = cache.losses_from(out.last_hidden_state)  # the base model applies the final norm
    return cache


def _run_from(cache: CleanPass, start: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states after running decoder layers ``start..N-1`` from the cached inputs."""
    parts = cache.parts
    h = hidden
    for i in range(start, len(parts.layers)):
        cached, extra, kwargs = cache.layer_inputs[i]
        out = parts.layers[i](cached if h is None else h, *extra, **kwargs)
        h = out[0] if isinstance(out, (tuple, list)) else out
    if h is None:
        raise SaescopeError("nothing to run: no cached layer input and no hidden state")
    return parts.final_norm(h)


def _merge(replacement: torch.Tensor, activation: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if replacement.shape != activation.shape:
        raise SaescopeError(f"replacement {tuple(replacement.shape)} does not match the site's activation "
                            f"{tuple(activation.shape)}")
    new = replacement.to(activation.dtype)
    return new if mask is None else torch.where(mask.to(new.device)[..., None], new, activation)


@torch.no_grad()
def spliced_losses(cache: CleanPass, site: Site | str, replacement: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token losses ``[batch, seq-1]`` with ``site``'s activation replaced by ``replacement`` where
    ``mask`` is True (elsewhere, e.g. at BOS, the clean activation stays), running only the decoder
    layers from the site on, from the cached input of the site's layer."""
    site = Site.parse(site)
    if site.id not in cache.sites:
        raise SaescopeError(f"site {site.id} was not recorded by the clean pass (recorded: "
                            f"{', '.join(cache.sites)})")
    if site.kind == "resid_post":
        final = _run_from(cache, site.layer + 1, _merge(replacement, cache.sites[site.id], mask))
    else:
        with hooked(cache.parts.lm, [(site, lambda a: _merge(replacement, a, mask))]):
            final = _run_from(cache, site.layer)
    return cache.losses_from(final)


def _metric_gradient(parts: DecoderParts, final: torch.Tensor, input_ids: torch.Tensor, counted: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    """``∂𝓛/∂h`` for the final hidden states ``h``, 𝓛 = Σ_counted (z_t[y_{t+1}] − mean_v z_t[v]).

    Without soft-capping the logits are linear in h, so the gradient is ``W_U[y] − mean_v W_U[v]`` (the
    unembedding bias cancels): no logits at all. With soft-capping, logits are built and differentiated
    ``chunk_size`` rows at a time.
    """
    d = final.shape[-1]
    grad = torch.zeros_like(final)
    weights = counted.to(final.device).to(final.dtype)
    targets = input_ids[:, 1:]
    weight = getattr(parts.unembed, "weight", None)
    if parts.softcap is None and isinstance(parts.unembed, nn.Linear) and weight is not None:
        w = weight.detach()
        grad[:, :-1] = (w[targets] - w.mean(dim=0)).to(final.dtype) * weights[..., None]
        return grad
    leaf = final.detach().requires_grad_(True)
    h = leaf[:, :-1].reshape(-1, d)
    flat_targets = targets.reshape(-1)
    flat_weights = weights.reshape(-1)
    with torch.enable_grad():
        for lo in range(0, h.shape[0], chunk_size):
            hi = lo + chunk_size
            logits = parts.unembed(h[lo:hi]).float()
            if parts.softcap is not None:
                logits = torch.tanh(logits / parts.softcap) * parts.softcap
            metric = logits.gather(-1, flat_targets[lo:hi, None]).squeeze(-1) - logits.mean(dim=-1)
            (metric * flat_weights[lo:hi]).sum().backward()
    return leaf.grad if leaf.grad is not None else grad


def mean_centered_logit_gradient(cache: CleanPass, site: Site | str, counted: torch.Tensor) -> torch.Tensor:
    """``∇_x 𝓛`` at ``site`` on the clean model, ``[batch, seq, width]`` (Gemma Scope App. C.3).

    𝓛 is the sum over counted positions t (``counted [batch, seq-1]``) of the mean-centred logit of the
    correct next token, ``z_t[y_{t+1}] − mean_v z_t[v]`` (after soft-capping where the model has it). One
    backward pass serves the whole batch, so the gradient at position t also carries x_t's effect on later
    positions' logits (the usual attribution-patching approximation). The gradient is taken first at the
    final hidden states (:func:`_metric_gradient`), then carried back through the layers.
    """
    site = Site.parse(site)
    parts = cache.parts
    x = cache.sites[site.id].detach().clone().requires_grad_(True)
    params = list(parts.lm.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            if site.kind == "resid_post":
                final = _run_from(cache, site.layer + 1, x)
            else:
                with hooked(parts.lm, [(site, lambda _a: x)]):
                    final = _run_from(cache, site.layer)
            if not final.requires_grad:
                return torch.zeros_like(x)
            grad_final = _metric_gradient(parts, final.detach(), cache.input_ids, counted, cache.chunk_size)
            (grad,) = torch.autograd.grad(final, x, grad_outputs=grad_final, allow_unused=True)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    return torch.zeros_like(x) if grad is None else grad.detach()
