"""JumpReLU transcoder (Gemma Scope App. B): input/target handling, initialisation, standardization, training."""

from __future__ import annotations

import math

import pytest
import torch

from saescope.errors import SaescopeError
from saescope.formats import load_sae
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import SAESpec, TrainConfig, Trainer
from saescope.train.sources import TensorBatchSource


def _float64_loss(tc, x_raw, y_raw, lam):
    """Independent float64 computation of the App. B loss."""
    C = tc.norm_scale
    W_enc, b_enc, W_dec, b_dec, th = (getattr(tc, n).detach().to(torch.float64)
                                      for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
    x = x_raw.to(torch.float64) / C          # no b_dec subtraction
    y = y_raw.to(torch.float64) / C          # the target is divided by the INPUT's scale
    z = x @ W_enc + b_enc
    f = torch.where(z > th, z, torch.zeros_like(z))
    y_hat = f @ W_dec + b_dec
    return float((((y - y_hat) ** 2).sum(1) + lam * (z > th).sum(1)).mean())


def test_defaults_and_shapes():
    tc = JumpReLUTranscoder(16, 40, d_out=9, seed=0)
    assert tc.norm_scale == pytest.approx(4.0)             # √d_model for RMS-normalized inputs
    assert tc.config.apply_b_dec_to_input is False
    assert tuple(tc.W_dec.shape) == (40, 9) and tuple(tc.b_dec.shape) == (9,)
    with pytest.raises(SaescopeError, match="pre-encoder"):
        from saescope.config import SAEConfig
        JumpReLUTranscoder(4, 8, config=SAEConfig(d_in=4, d_sae=8))


def test_encoder_is_not_the_decoder_transpose():
    tc = JumpReLUTranscoder(12, 30, seed=1)
    assert not torch.allclose(tc.W_enc, tc.W_dec.T)
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(30))


def test_input_and_target_both_divided_by_input_scale_and_no_pre_encoder_bias():
    gen = torch.Generator().manual_seed(2)
    tc = JumpReLUTranscoder(8, 20, norm_scale=5.0, d_out=6, seed=2)
    with torch.no_grad():
        tc.b_dec.copy_(torch.randn(6, generator=gen))
        tc.b_enc.copy_(torch.randn(20, generator=gen) * 0.1)
        tc.threshold.fill_(0.05)
    x_raw = torch.randn(50, 8, generator=gen) * 5
    y_raw = torch.randn(50, 6, generator=gen) * 3
    out = tc.training_forward(x_raw, y_raw, 0.3)
    torch.testing.assert_close(out.target, y_raw / 5.0)
    torch.testing.assert_close(out.x, x_raw / 5.0)
    assert float(out.loss.detach()) == pytest.approx(_float64_loss(tc, x_raw, y_raw, 0.3), rel=1e-5)
    # b_dec is added at the output but never subtracted from the input: latents do not depend on it
    before = tc.encode(x_raw).detach().clone()
    with torch.no_grad():
        tc.b_dec.add_(10.0)
    torch.testing.assert_close(tc.encode(x_raw).detach(), before)


def test_standardized_transcoder_maps_raw_input_to_raw_output(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tc = JumpReLUTranscoder(8, 24, norm_scale=math.sqrt(8), seed=3, dtype=torch.float64)
    with torch.no_grad():
        tc.b_dec.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
        tc.b_enc.copy_(torch.randn(24, generator=gen, dtype=torch.float64) * 0.1)
        tc.threshold.uniform_(0.01, 0.2, generator=gen)
    x_raw = torch.randn(40, 8, generator=gen, dtype=torch.float64) * 2
    std = tc.standardize()
    assert std.config.standardized and std.norm_scale == 1.0
    torch.testing.assert_close(std(x_raw), tc(x_raw).detach())         # ŷ_raw = C·(W_dec f + b_dec)
    torch.testing.assert_close(std.encode(x_raw), tc.encode(x_raw).detach() * tc.norm_scale)
    std.save(tmp_path / "tc")
    loaded = load_sae(tmp_path / "tc")
    torch.testing.assert_close(loaded(x_raw), std(x_raw))


def test_trainer_transcoder_uses_input_scale_for_target(tmp_path):
    """The trainer divides mlp_out by mlp_in's C (not mlp_out's): check its first step against a manual one."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=gen) * 3
    y = torch.randn(64, 8, generator=gen) * 50         # very different scale: a wrong C would show
    source = TensorBatchSource({"mlp_in/layer_0": x, "mlp_out/layer_0": y}, 64, shuffle=False)
    scales = {"mlp_in/layer_0": source.norm_scale("mlp_in/layer_0"), "mlp_out/layer_0": 999.0}
    cfg = TrainConfig(saes=[SAESpec(site="mlp_in/layer_0", width=16, sparsity_coefficient=0.1,
                                    kind="transcoder")], total_tokens=64, batch_size=64, lr=1e-3,
                      out_dir=tmp_path / "run", threshold_parameterization="direct", log_every=1)
    trainer = Trainer(cfg, source, scales, progress=False)
    trainer._build()
    unit = trainer.units[0]
    assert isinstance(unit.module, JumpReLUTranscoder)
    assert unit.module.norm_scale == pytest.approx(scales["mlp_in/layer_0"])
    manual = JumpReLUTranscoder(8, 16, scales["mlp_in/layer_0"], seed=0)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            getattr(manual, name).copy_(getattr(unit.module, name))
    expected = _float64_loss(manual, x, y, 0.0)        # λ(0) = 0 during warm-up
    trainer.run()
    row = unit.last_logged
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    folder = next((tmp_path / "run" / "suite" / "transcoder" / "layer_0" / "width_16").iterdir())
    loaded = load_sae(folder)
    assert loaded.config.training["target_site"] == "mlp_out/layer_0"
    assert loaded.config.standardized
