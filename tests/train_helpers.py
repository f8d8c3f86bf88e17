"""Shared set-up of the trainer tests: a small fast config, one run on in-memory batches, weight comparison."""

from __future__ import annotations

import torch

from saescope.train import TrainConfig, Trainer
from saescope.train.sources import TensorBatchSource


def small_config(out, specs, total_steps=24, **kw) -> TrainConfig:
    """Batches of 128, warm-ups of a few steps, a wide bandwidth: every path runs within ~24 steps."""
    base = {"saes": specs, "total_tokens": total_steps * 128, "batch_size": 128, "lr": 3e-3, "lr_warmup_steps": 4,
            "sparsity_warmup_steps": 6, "log_every": 5, "checkpoint_every": 0, "out_dir": out,
            "threshold_parameterization": "log", "initial_threshold": 0.05, "bandwidth": 0.05,
            "fast_path_max_density": 1.0}
    base.update(kw)
    return TrainConfig(**base)


def run_trainer(cfg, acts, max_steps=None, source=None) -> Trainer:
    source = source or TensorBatchSource(acts, cfg.batch_size, seed=11)
    scales = {k: TensorBatchSource(acts, cfg.batch_size).norm_scale(k) for k in acts}
    trainer = Trainer(cfg, source, scales, progress=False)
    trainer.run(max_steps=max_steps)
    return trainer


def weights(trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {u.spec.name: {k: v.clone() for k, v in u.module.state_tensors().items()} for u in trainer.units}


def assert_bitwise(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
