"""Which checkpoints a config may resume: the fingerprint rule and its back-compat lists, in one place.

A run resumes a checkpoint only when the config fingerprints agree (:func:`fingerprint_payload`). Settings in
:data:`RESUMABLE_CHANGES` may change between resumes (length, logging, devices, speed paths). Options added after
checkpoints were already being written are listed with their defaults in :data:`NEW_SPEC_DEFAULTS` (per SAE)
and :data:`NEW_CONFIG_DEFAULTS` (per run); the one rule: **an option left at its listed default is left out of
the fingerprint**, so a checkpoint made before the option existed keeps its fingerprint and resumes, and one set
to anything else gives a new fingerprint. ``tests/test_checkpoint_compat.py`` checks that every field added since
the committed old checkpoint is listed here, and that the old checkpoint's fingerprint is reproduced.
"""

from __future__ import annotations

from typing import Any

from saescope.sae.losses import DEFAULT_FREQUENCY_CAP

RESUMABLE_CHANGES = ("total_tokens", "checkpoint_every", "log_every", "tensorboard", "wandb", "out_dir", "store",
                     "device", "fast_path", "cpu_kernels", "fast_path_max_density", "latent_shards")
"""Run settings that may differ between a checkpoint and the run resuming it."""

NEW_SPEC_DEFAULTS: dict[str, Any] = {
    "target_l0": None, "matryoshka_prefixes": None, "matryoshka_weights": None, "skip": False,
    "threshold_lr_scale": None,
    # absent from older runs = the penalty was off (a target_l0 spec now resolves it to 1.0: a new fingerprint)
    "frequency_penalty": 0.0, "frequency_cap": DEFAULT_FREQUENCY_CAP,
    "architecture": "jumprelu", "k": None, "target_l0_over": "token",
}
"""SAE spec fields added later (Gemma Scope 2 options, per-SAE θ lr, baselines), with the values that mean "as before"."""

NEW_CONFIG_DEFAULTS: dict[str, Any] = {
    "initial_W_skip": "zeros", "initial_exclude_top_pcs": 0, "threshold_lr_scale": 1.0,
    "transcoder_target_scale": "input", "initial_transcoder_W_dec": "random", "lr_decay_steps": 0,
    "adam_update_clip": None,
}
"""Run settings added later, with the values that mean "as before"."""


def without_new_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys of ``defaults`` whose value is the listed default (the module's one rule)."""
    return {k: v for k, v in data.items() if not (k in defaults and v == defaults[k])}


def fingerprint_payload(config: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, from the config as JSON data
    (``TrainConfig.model_dump(mode="json")``)."""
    payload = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    payload["saes"] = [without_new_defaults(spec, NEW_SPEC_DEFAULTS) for spec in config["saes"]]
    # the language model's name only labels the SAEs (train --store fills it from the store, whose rows are what a
    # resume must share); kept as None so fingerprints made before that stay as they were
    payload["model"] = None
    return without_new_defaults(payload, NEW_CONFIG_DEFAULTS)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings (as JSON data) in which a checkpoint's config and this run's differ, beyond the resumable
    ones and the new options at their defaults; ``saes[i].field: old → new`` for a spec."""
    diffs = sorted(k for k in set(saved) | set(current)
                   if k != "saes" and k not in RESUMABLE_CHANGES
                   and saved.get(k, NEW_CONFIG_DEFAULTS.get(k)) != current.get(k, NEW_CONFIG_DEFAULTS.get(k)))
    old_saes, new_saes = saved.get("saes") or [], current.get("saes") or []
    for i, (a, b) in enumerate(zip(old_saes, new_saes)):
        a, b = ({k: spec.get(k, NEW_SPEC_DEFAULTS.get(k)) for k in set(a) | set(b)} for spec in (a, b))
        diffs += [f"saes[{i}].{k}: {a[k]!r} → {b[k]!r}" for k in sorted(a) if a[k] != b[k]]
    if len(old_saes) != len(new_saes):
        diffs.append(f"the number of SAEs: {len(old_saes)} → {len(new_saes)}")
    return diffs
