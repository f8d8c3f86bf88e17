"""A transcoder whose target is divided by its own scale C_t (``target_norm_scale``; not App. B, which uses the
input's C): normalization, the raw output, standardization (float64 closed form and the raw outputs before and
after), every file format, config validation, and the trainer option that sets C_t from the store."""

from __future__ import annotations

import pytest
import torch

from saescope import load_sae
from saescope.config import SAEConfig
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import SAESpec
from tests.train_helpers import run_trainer, small_config

C, C_T = 3.0, 40.0


def _transcoder(skip, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tc = JumpReLUTranscoder(10, 32, C, d_out=7, skip=skip, dtype=dtype, seed=seed, target_norm_scale=C_T,
                            site="mlp_in", layer=2, model="tiny")
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3).to(dtype))
        tc.threshold.copy_((torch.rand(32, generator=g, dtype=torch.float64) * 0.2).to(dtype))
    return tc


def _x(n=60, dtype=torch.float64):
    return (torch.randn(n, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * C).to(dtype)


@pytest.mark.parametrize("skip", [False, True])
def test_raw_output_by_hand(skip):
    """ŷ_raw = C_t·(W_dec f + b_dec + (x_raw/C) W_skip), f = JumpReLU_θ((x_raw/C) W_enc + b_enc); the target is
    y_raw / C_t."""
    tc = _transcoder(skip)
    x_raw = _x()
    x = x_raw / C
    z = x @ tc.W_enc.detach() + tc.b_enc.detach()
    f = z * (z > tc.threshold.detach())
    y = f @ tc.W_dec.detach() + tc.b_dec.detach()
    if skip:
        y = y + x @ tc.W_skip.detach()
    torch.testing.assert_close(tc(x_raw).detach(), C_T * y, rtol=1e-12, atol=1e-12)
    y_raw = torch.randn(60, 7, dtype=torch.float64)
    torch.testing.assert_close(tc.normalize_target(y_raw), y_raw / C_T, rtol=0, atol=0)
    out = tc.training_forward(x_raw, y_raw, 0.1)
    torch.testing.assert_close(out.reconstruction, (y_raw / C_T - y).pow(2).sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("skip", [False, True])
def test_standardize_folds_both_scales(skip):
    tc = _transcoder(skip)
    std = tc.standardize()
    assert std.config.standardized and std.norm_scale == 1.0 and std.config.target_norm_scale is None
    assert std.target_scale == 1.0
    x_raw = _x()
    torch.testing.assert_close(std(x_raw).detach(), tc(x_raw).detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(std.encode(x_raw).detach(), C_T * tc.encode(x_raw).detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(std.W_enc.detach(), tc.W_enc.detach() * (C_T / C), rtol=1e-15, atol=0)
    if skip:
        torch.testing.assert_close(std.W_skip.detach(), tc.W_skip.detach() * (C_T / C), rtol=1e-15, atol=0)


@pytest.mark.parametrize(("fmt", "skip"), [("native", True), ("gemma-scope-2", True), ("saelens", True),
                                           ("gemma-scope", False)])
def test_every_format_keeps_the_raw_outputs(tmp_path, fmt, skip):
    tc = _transcoder(skip, dtype=torch.float32)
    back = load_sae(tc.save(tmp_path / fmt, format=fmt))
    if fmt == "native":
        assert back.config == tc.config and back.target_scale == C_T
    x_raw = _x(dtype=torch.float32)
    torch.testing.assert_close(back(x_raw).detach(), tc(x_raw).detach(), rtol=2e-5, atol=2e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="target_norm_scale is for transcoders"):
        SAEConfig(d_in=4, d_sae=8, target_norm_scale=2.0)
    with pytest.raises(ValueError, match="positive finite"):
        SAEConfig(architecture="jumprelu_transcoder", d_in=4, d_sae=8, apply_b_dec_to_input=False,
                  target_norm_scale=-1.0)
    with pytest.raises(ValueError, match="standardized"):
        SAEConfig(architecture="jumprelu_transcoder", d_in=4, d_sae=8, apply_b_dec_to_input=False,
                  target_norm_scale=2.0, standardized=True)


@pytest.mark.parametrize("choice", ["input", "target"])
def test_trainer_divides_the_target_by_the_chosen_scale(tmp_path, choice):
    """``transcoder_target_scale``: "input" (App. B) divides mlp_out by mlp_in's C; "target" by mlp_out's own
    norm scale, so E‖y‖² = 1 at the start; the suite's transcoder maps raw mlp_in to raw mlp_out either way."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 24, generator=gen)
    acts = {"mlp_in/layer_1": x / x.norm(dim=1, keepdim=True) * 24 ** 0.5,
            "mlp_out/layer_1": (x[:, :24] @ torch.randn(24, 24, generator=gen)) * 30.0}
    spec = SAESpec(site="mlp_in/layer_1", width=32, sparsity_coefficient=0.01, kind="transcoder")
    cfg = small_config(tmp_path, [spec], total_steps=6, transcoder_target_scale=choice)
    trainer = run_trainer(cfg, acts)
    (unit,) = trainer.units
    tc = unit.module
    y = tc.normalize_target(acts["mlp_out/layer_1"])
    mean_sq = float(y.pow(2).sum(1).mean())
    if choice == "target":
        assert tc.config.target_norm_scale == pytest.approx(float(acts["mlp_out/layer_1"].pow(2).sum(1).mean()) ** 0.5,
                                                            rel=1e-3)
        assert mean_sq == pytest.approx(1.0, rel=1e-3)
    else:
        assert tc.config.target_norm_scale is None and mean_sq > 100
    std = load_sae(next((tmp_path / "suite").rglob("saescope.json")).parent)
    torch.testing.assert_close(std(acts["mlp_in/layer_1"][:50]).detach(), tc(acts["mlp_in/layer_1"][:50]).detach(),
                               rtol=1e-4, atol=1e-3)


def test_the_choice_is_part_of_the_fingerprint():
    """A run cannot resume under the other target scale (its weights mean something else); at the recipe's
    "input" the fingerprint is what it was before the option existed (tests/test_train_gemma_scope2.py)."""
    from saescope.train import TrainConfig

    data = {"saes": [{"site": "mlp_in/layer_1", "width": 8, "sparsity_coefficient": 0.1, "kind": "transcoder"}],
            "total_tokens": 10000}
    plain = TrainConfig.from_dict(data)
    assert TrainConfig.from_dict({**data, "transcoder_target_scale": "input"}).fingerprint() == plain.fingerprint()
    assert TrainConfig.from_dict({**data, "transcoder_target_scale": "target"}).fingerprint() != plain.fingerprint()


@pytest.mark.parametrize("skip", [False, True])
def test_decoder_rows_from_the_targets_each_latent_fires_on(tmp_path, skip):
    """``initial_transcoder_W_dec="fired_target_mean"``: after θ is set from the first batch, each transcoder
    latent's decoder row is the normalized sum of (t_b − t̄) over the first-batch tokens where it fires (t the
    normalized target, minus x W_skip for a least-squares skip), checked token by token in float64; a latent
    that fires on no token keeps its random row; an SAE's tied decoder is left alone."""
    from saescope.train import Trainer
    from saescope.train.sources import TensorBatchSource

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 24, generator=gen, dtype=torch.float64)
    acts = {"mlp_in/layer_1": x / x.norm(dim=1, keepdim=True) * 24 ** 0.5,
            "mlp_out/layer_1": (x @ torch.randn(24, 24, generator=gen, dtype=torch.float64)) * 30.0 + 5.0,
            "resid_post/layer_1": x * 3.0}
    specs = [SAESpec(site="mlp_in/layer_1", width=48, sparsity_coefficient=0.01, kind="transcoder", skip=skip),
             SAESpec(site="resid_post/layer_1", width=32, sparsity_coefficient=0.01)]
    common = {"dtype": "float64", "initial_threshold_quantile": 0.97, "transcoder_target_scale": "target",
              "initial_W_skip": "least_squares" if skip else "zeros"}
    cfg = small_config(tmp_path / "a", specs, initial_transcoder_W_dec="fired_target_mean", **common)
    scales = {k: TensorBatchSource(acts, 128).norm_scale(k) for k in acts}
    first = next(iter(TensorBatchSource(acts, cfg.batch_size, seed=11)))
    trainer = Trainer(cfg, TensorBatchSource(acts, cfg.batch_size, seed=11), scales, progress=False)
    trainer.run(max_steps=0)
    random_init = Trainer(small_config(tmp_path / "b", specs, **common),
                          TensorBatchSource(acts, cfg.batch_size, seed=11), scales, progress=False)
    random_init.run(max_steps=0)
    tc, sae = (u.module for u in trainer.units)
    x_n = tc.normalize(first["mlp_in/layer_1"])
    t = tc.normalize_target(first["mlp_out/layer_1"])
    if skip:
        t = t - x_n @ tc.W_skip.detach()
    z = tc.pre_activations(first["mlp_in/layer_1"]).detach()
    theta = tc.threshold.detach()
    kept = 0
    for i in range(tc.d_sae):
        tokens = [b for b in range(len(t)) if z[b, i] > theta[i]]
        if not tokens:
            torch.testing.assert_close(tc.W_dec[i], random_init.units[0].module.W_dec[i])
            kept += 1
            continue
        row = sum(t[b] - t.mean(dim=0) for b in tokens)
        torch.testing.assert_close(tc.W_dec[i].detach(), row / row.norm(), rtol=1e-10, atol=1e-12)
    assert kept < tc.d_sae
    torch.testing.assert_close(sae.W_dec.detach(), sae.W_enc.detach().T)       # the SAE stays tied
    torch.testing.assert_close(sae.W_dec.detach(), random_init.units[1].module.W_dec.detach())
