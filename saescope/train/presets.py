"""Named presets: groups of training settings filled into a config where it does not set them itself.

``short-budget`` (recipe §6, not in the paper): for runs of ~10⁶ tokens (a few hundred steps), where the paper's
schedule (lr 7e-5, 10,000 λ warm-up steps, log θ from 0.001) cannot move. Chosen by measurement on Gemma 3 270M
``resid_post/layer_6`` (1.05M Shakespeare tokens, width 4096): lr 1e-3, warm-ups scaled to the run (lr over the
first 5% of steps, λ over the first 25%), the lr decayed linearly to 0 over the last 20% of steps (at lr 1e-3
JumpReLU training has loss spikes; one late in a 400k-token run left a target-60 SAE at held-out Δ LM loss 8.4
instead of 0.60: docs/training.md), each Adam step bounded to 3 × its lr (``adam_update_clip``: at 1M tokens
three of six target-L0 SAEs diverged at step ~400 without it, none with it), θ trained directly, ``b_dec`` from
the data mean, θ from the first batch's 99th percentile, the top principal direction out of the initial latent directions and θ at a tenth of
the lr for SAEs (dead latents 40–60% → 4–9% over the last 262k tokens, training FVU ~3× lower); a
transcoder's θ keeps the full lr (at a tenth its L0 stayed above 1,000 in 780 steps), and its target is divided
by its own norm scale (``transcoder_target_scale = "target"``: a target-L0 60 skip transcoder at ``mlp_in/layer_6``
ended at L0 735 with App. B's input scale, at L0 57 and FVU 0.15 with its own). ``saescope demo`` uses it.
"""

from __future__ import annotations

import copy
from typing import Any

from saescope.errors import SaescopeError

DEFAULT_BATCH_SIZE = 4096

_SHORT_BUDGET = {
    "lr": 1e-3,
    "threshold_parameterization": "direct",
    "initial_b_dec": "mean",
    "initial_threshold_quantile": 0.99,
    "initial_exclude_top_pcs": 1,
    "threshold_lr_scale": 0.1,
    "transcoder_target_scale": "target",
    "adam_update_clip": 3.0,
}


def _short_budget(data: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    if "total_tokens" not in out:
        raise SaescopeError("the short-budget preset scales its warm-ups to the run: give total_tokens "
                            "(--total-tokens)")
    steps = max(int(out["total_tokens"]) // int(out.get("batch_size", DEFAULT_BATCH_SIZE)), 1)
    defaults = {**_SHORT_BUDGET, "lr_warmup_steps": max(steps // 20, 1), "sparsity_warmup_steps": max(steps // 4, 1),
                "lr_decay_steps": steps // 5}
    for key, value in defaults.items():
        out.setdefault(key, value)
    specs = []
    for spec in out.get("saes", []):
        spec = dict(spec)
        if spec.get("kind") == "transcoder":
            spec.setdefault("threshold_lr_scale", 1.0)
        specs.append(spec)
    if "saes" in out:
        out["saes"] = specs
    return out


PRESETS = {"short-budget": _short_budget}
"""Preset name → function filling a raw config dict (before validation)."""


def apply_preset(name: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the preset's settings filled in where ``data`` does not set them (``None``: unchanged)."""
    if name is None:
        return data
    if name not in PRESETS:
        raise SaescopeError(f"unknown training preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](data)
