"""Steering by activation addition: add a latent's decoder direction at its site while generating.

Adding ``α`` to latent ``i``'s activation changes the SAE reconstruction (Gemma Scope eq. 6,
``x̂ = C·(W_dec f + b_dec)``) by ``α·C·W_dec[i]``; steering adds exactly that vector to the model's
activation at the SAE's site, at every position (prompt and generated), so ``α`` is in the latent's own
activation units (compare it with the latent's max activation on its dashboard). The same prompt is
generated without the addition, with the same decoding settings and seed, for a side-by-side comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from saescope.config import Site
from saescope.dashboards.compute import decoder_site_id
from saescope.errors import SaescopeError
from saescope.sites import _check_site, _unwrap, hooked, site_width


class SteerSettings(BaseModel):
    """Decoding settings for :func:`steer`; shared by the library and ``saescope steer``."""

    model_config = ConfigDict(extra="forbid")

    coefficient: float = Field(description="α: added to the latent's activation (its units)")
    max_new_tokens: int = Field(30, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding")
    seed: int = 0


@dataclass
class SteerResult:
    prompt: str
    steered: str
    unsteered: str
    steered_ids: torch.Tensor  # generated ids only
    unsteered_ids: torch.Tensor


def steering_vector(sae: Any, latent: int) -> torch.Tensor:
    """``C · W_dec[latent]``: the change of the raw-scale reconstruction per unit of the latent."""
    if not 0 <= latent < sae.d_sae:
        raise SaescopeError(f"latent {latent} does not exist: this SAE has latents 0..{sae.d_sae - 1}")
    return sae.W_dec.detach()[latent].float() * sae.norm_scale


def add_direction(vector: torch.Tensor, coefficient: float):
    """A site callback that returns ``activation + coefficient · vector`` at every position."""
    def add(activation: torch.Tensor) -> torch.Tensor:
        return activation + (coefficient * vector).to(device=activation.device, dtype=activation.dtype)
    return add


def _site_of(model: Any, sae: Any, site: Site | str | None) -> Site:
    """The site the decoder writes (an SAE's own site; a transcoder's target ``mlp_out``)."""
    site = site or decoder_site_id(sae)
    if site is None:
        raise SaescopeError("the SAE's config names no site; pass the site to steer at (e.g. 'resid_post/layer_6')")
    parsed = _check_site(_unwrap(model), site)
    width = site_width(model, parsed)
    if width != sae.W_dec.shape[1]:
        raise SaescopeError(f"site {parsed.id} has width {width} but the SAE's decoder writes "
                            f"{sae.W_dec.shape[1]} (d_in={sae.d_in}); steer with the model the SAE was trained on")
    return parsed


@torch.no_grad()
def _generate(lm, input_ids: torch.Tensor, settings: SteerSettings, eos: int | None) -> torch.Tensor:
    """Plain decoding loop (greedy or temperature sampling with a fixed seed); returns the new ids."""
    import inspect

    from transformers import DynamicCache

    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    ids = input_ids
    cache = DynamicCache(config=lm.config)  # filled in place by each forward
    key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    new = []
    step_input = ids
    for _ in range(settings.max_new_tokens):
        out = lm(input_ids=step_input, use_cache=True, **{key: cache})
        logits = out.logits[0, -1].float()
        if settings.temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits.cpu() / settings.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        new.append(token)
        if eos is not None and token == eos:
            break
        step_input = torch.tensor([[token]], device=ids.device)
    return torch.tensor(new, dtype=torch.long)


def steer(model: Any, tokenizer: Any, sae: Any, latent: int, prompt: str, settings: SteerSettings,
          site: Site | str | None = None) -> SteerResult:
    """Generate from ``prompt`` with ``settings.coefficient · C · W_dec[latent]`` added at the SAE's site,
    and without it; return both continuations."""
    lm = _unwrap(model)
    parsed = _site_of(lm, sae, site)
    vector = steering_vector(sae, latent)
    device = next(lm.parameters()).device
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if input_ids.shape[1] == 0:
        raise SaescopeError("the prompt is empty after tokenization; give a prompt with some text")
    eos = getattr(tokenizer, "eos_token_id", None)
    plain = _generate(lm, input_ids, settings, eos)
    with hooked(lm, [(parsed, add_direction(vector, settings.coefficient))]):
        steered = _generate(lm, input_ids, settings, eos)
    return SteerResult(prompt=prompt, steered=tokenizer.decode(steered, skip_special_tokens=True),
                       unsteered=tokenizer.decode(plain, skip_special_tokens=True),
                       steered_ids=steered, unsteered_ids=plain)


@torch.no_grad()
def steered_forward(model: Any, sae: Any, latent: int, input_ids: torch.Tensor, coefficient: float,
                    site: Site | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass with the addition: (latent activations ``[seq, d_sae]`` at the site after the
    addition, logits ``[seq, vocab]``). ``coefficient=0`` is the unsteered pass. For SAEs (the encoder
    reads the site the decoder writes), not transcoders."""
    lm = _unwrap(model)
    parsed = _site_of(lm, sae, site)
    vector = steering_vector(sae, latent)
    seen: dict[str, torch.Tensor] = {}
    add = add_direction(vector, coefficient)

    def steer_and_read(activation: torch.Tensor) -> torch.Tensor:
        new = add(activation)
        seen["x"] = new.detach()
        return new

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with hooked(lm, [(parsed, steer_and_read)]):
        logits = lm(input_ids=input_ids.to(next(lm.parameters()).device), use_cache=False).logits[0]
    return sae.encode(seen["x"][0].to(sae.device)).float().cpu(), logits.float().cpu()


def format_side_by_side(result: SteerResult, latent: int, coefficient: float, width: int = 100) -> str:
    """The prompt, then the unsteered and steered continuations in two columns."""
    import textwrap

    col = max(20, (width - 3) // 2)
    left = textwrap.wrap(result.unsteered.replace("\n", " ⏎ "), col) or [""]
    right = textwrap.wrap(result.steered.replace("\n", " ⏎ "), col) or [""]
    lines = [f"prompt: {result.prompt}", "",
             f"{'unsteered':<{col}} | {f'steered (latent {latent}, α = {coefficient:g})':<{col}}",
             f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{col}} | {b}")
    return "\n".join(lines)
