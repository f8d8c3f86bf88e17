"""Writes this folder's training checkpoint with the saescope of commit b60c23a (before the issue 16 redesign).

Run from a checkout of that commit: ``PYTHONPATH=<checkout> python tests/data/checkpoint_b60c23a/make.py``.
tests/test_checkpoint_compat.py resumes it with today's code. The activations are stored beside it so that the
test does not depend on a random generator being the same on every CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from saescope.train import SAESpec, TrainConfig, Trainer
from saescope.train.sources import TensorBatchSource

HERE = Path(__file__).resolve().parent
SITE, D, N = "resid_post/layer_0", 16, 512


def activations() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(32, D, generator=gen)
    codes = torch.rand(N, 32, generator=gen) * (torch.rand(N, 32, generator=gen) < 0.15)
    x = codes @ dirs + 0.05 * torch.randn(N, D, generator=gen) + 1.0
    return {SITE: x * 5.0, "mlp_in/layer_1": x, "mlp_out/layer_1": torch.randn(N, D, generator=gen)}


def config(out_dir: Path) -> TrainConfig:
    specs = [SAESpec(site=SITE, width=32, sparsity_coefficient=0.02),
             SAESpec(site="mlp_in/layer_1", width=24, sparsity_coefficient=0.05, kind="transcoder")]
    return TrainConfig(saes=specs, total_tokens=12 * 64, batch_size=64, lr=3e-3, lr_warmup_steps=3,
                       sparsity_warmup_steps=4, log_every=4, checkpoint_every=0, out_dir=str(out_dir),
                       threshold_parameterization="log", initial_threshold=0.05, bandwidth=0.05,
                       fast_path_max_density=1.0, initial_b_dec="mean", initial_threshold_quantile=0.9)


if __name__ == "__main__":
    acts = activations()
    save_file({k: v.contiguous() for k, v in acts.items()}, str(HERE / "activations.safetensors"))
    run = HERE / "run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = config(run)
    scales = {k: TensorBatchSource(acts, cfg.batch_size).norm_scale(k) for k in acts}
    Trainer(cfg, TensorBatchSource(acts, cfg.batch_size, seed=3), scales, progress=False).run(max_steps=5)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    print(sorted(p.relative_to(HERE) for p in run.rglob("*") if p.is_file()))
