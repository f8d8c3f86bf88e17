"""Short-budget options (not in the recipe): top principal directions projected out of the initial latent
directions; θ's own learning rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.errors import SaescopeError
from saescope.train import SAESpec, TrainConfig, Trainer
from saescope.train.sources import TensorBatchSource

D = 24
SITE = "resid_post/layer_2"


def _acts(n=1024, seed=0):
    """Gaussian activations with one massive dimension (most of the variance), like Gemma's residual stream."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    x[:, 3] *= 30.0
    x += 5.0
    y = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return {SITE: x.float(), "mlp_in/layer_1": x.float() / 10, "mlp_out/layer_1": y.float()}


def _initialised(tmp_path, k, specs=None, q=0.9):
    acts = _acts()
    specs = specs or [SAESpec(site=SITE, width=256, sparsity_coefficient=0.01)]
    cfg = TrainConfig(saes=specs, total_tokens=8 * 256, batch_size=256, out_dir=tmp_path,
                      initial_exclude_top_pcs=k, initial_threshold_quantile=q, initial_b_dec="mean")
    source = TensorBatchSource(acts, cfg.batch_size, seed=3)
    trainer = Trainer(cfg, source, {s: source.norm_scale(s) for s in acts}, progress=False)
    trainer._build()
    before = {u.spec.name: {n: t.clone() for n, t in u.module.state_tensors().items()} for u in trainer.units}
    trainer.initialize_from_first_batch()
    return trainer, before, trainer.stream.peek()


def test_top_pc_projected_out_against_numpy_svd(tmp_path):
    specs = [SAESpec(site=SITE, width=256, sparsity_coefficient=0.01),
             SAESpec(site="mlp_in/layer_1", width=64, sparsity_coefficient=0.01, kind="transcoder")]
    trainer, before, batch = _initialised(tmp_path, 2, specs)
    for unit in trainer.units:
        m = unit.module
        x = (batch[unit.spec.site].double() / m.norm_scale).numpy()
        _, _, vh = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
        top = vh[:2]
        w0 = before[unit.spec.name]["W_enc"].double().numpy()
        expected = w0 - top.T @ (top @ w0)
        expected /= np.linalg.norm(expected, axis=0, keepdims=True)
        w = m.W_enc.detach().double().numpy()
        np.testing.assert_allclose(w, expected, atol=1e-6)
        assert np.abs(top @ w).max() < 1e-6                      # orthogonal to both directions
        np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, atol=1e-6)
        if unit.spec.kind == "sae":                                # the recipe's tie is kept
            assert torch.equal(m.W_dec.detach(), m.W_enc.detach().t())
        else:                                                      # a transcoder's decoder is independent
            assert torch.equal(m.W_dec.detach(), before[unit.spec.name]["W_dec"])
        assert torch.equal(unit.W_enc_t, m.W_enc.detach().t())     # the optimizer's buffer saw the change


def test_without_the_option_directions_are_untouched(tmp_path):
    trainer, before, _ = _initialised(tmp_path, 0)
    unit = trainer.units[0]
    assert torch.equal(unit.module.W_enc.detach(), before[unit.spec.name]["W_enc"])


def _mean_jaccard(fired: torch.Tensor) -> float:
    f = fired.double()
    inter = f.T @ f
    sizes = f.sum(dim=0)
    union = sizes[:, None] + sizes[None, :] - inter
    jac = inter / union.clamp_min(1)
    n = jac.shape[0]
    return float((jac.sum() - jac.diagonal().sum()) / (n * (n - 1)))


def test_latents_stop_firing_together_on_the_massive_dimension(tmp_path):
    """The reason for the option: with one dimension holding most of the variance, quantile-initialised random
    latents fire on the same tokens; with it projected out their firing sets overlap about as random sets of
    the same size do (10% of tokens each: Jaccard ≈ 0.05)."""
    overlap = {}
    for k in (0, 1):
        trainer, _, batch = _initialised(tmp_path / str(k), k)
        m = trainer.units[0].module
        with torch.no_grad():
            fired = m.pre_activations(batch[SITE]) > m.threshold
        overlap[k] = _mean_jaccard(fired)
    assert overlap[0] > 0.2
    assert overlap[1] < 0.09
    assert overlap[0] > 3 * overlap[1]


def test_too_many_components_is_a_clear_error(tmp_path):
    with pytest.raises(SaescopeError, match="initial_exclude_top_pcs=24 must be below the input width 24"):
        _initialised(tmp_path, D)


def test_threshold_lr_scale_scales_only_the_threshold_step(tmp_path):
    """One step from the same state with θ's lr scaled by 0.1: θ moves exactly 0.1× as far (Adam's first step
    is lr·g/|g| per entry, independent of the gradient's size), every other parameter moves the same."""
    deltas = {}
    for scale in (1.0, 0.1):
        acts = _acts()
        cfg = TrainConfig(saes=[SAESpec(site=SITE, width=64, sparsity_coefficient=0.01)], total_tokens=8 * 256,
                          batch_size=256, out_dir=tmp_path / str(scale), lr=1e-3, lr_warmup_steps=0,
                          sparsity_warmup_steps=0, threshold_parameterization="direct", initial_b_dec="mean",
                          initial_threshold_quantile=0.9, bandwidth=0.2, threshold_lr_scale=scale,
                          checkpoint_every=0, dtype="float64")
        source = TensorBatchSource(acts, cfg.batch_size, seed=3)
        trainer = Trainer(cfg, source, {s: source.norm_scale(s) for s in acts}, progress=False)
        trainer._build()
        trainer.initialize_from_first_batch()
        before = {n: t.clone() for n, t in trainer.units[0].module.state_tensors().items()}
        trainer.run(max_steps=1)
        after = trainer.units[0].module.state_tensors()
        deltas[scale] = {n: (after[n] - before[n]).double() for n in before}
    moved = deltas[1.0]["threshold"] != 0
    assert moved.sum() > 10                                       # θ had gradients (some tokens in the window)
    torch.testing.assert_close(deltas[0.1]["threshold"], 0.1 * deltas[1.0]["threshold"], rtol=1e-9, atol=1e-15)
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(deltas[0.1][name], deltas[1.0][name], rtol=0, atol=0)


def test_a_spec_can_override_the_runs_threshold_lr_scale(tmp_path):
    specs = [SAESpec(site=SITE, width=32, sparsity_coefficient=0.01),
             SAESpec(site="mlp_in/layer_1", width=32, sparsity_coefficient=0.01, kind="transcoder",
                     threshold_lr_scale=1.0)]
    trainer, _, _ = _initialised(tmp_path, 0, specs)
    trainer.config = trainer.config.model_copy(update={"threshold_lr_scale": 0.1})
    trainer.units = []
    trainer._build()
    assert [u.adam.lr_scale["threshold"] for u in trainer.units] == [0.1, 1.0]
    assert all(u.adam.lr_scale["W_enc"] == 1.0 for u in trainer.units)
