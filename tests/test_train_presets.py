"""Named training presets: the short-budget settings, shared by `saescope demo` and `saescope train --preset`."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saescope.cli import app
from saescope.demo import DemoConfig, short_budget_train_config
from saescope.errors import SaescopeError
from saescope.store import StoreWriter
from saescope.train import TrainConfig
from saescope.train.presets import apply_preset

SITE = "resid_post/layer_1"


def test_short_budget_values_scale_with_the_run_and_never_override():
    data = {"saes": [{"site": SITE, "width": 64, "sparsity_coefficient": 1e-3},
                     {"site": "mlp_in/layer_1", "width": 64, "sparsity_coefficient": 30.0, "kind": "transcoder"},
                     {"site": "mlp_in/layer_1", "width": 32, "sparsity_coefficient": 30.0, "kind": "transcoder",
                      "threshold_lr_scale": 0.5}],
            "total_tokens": 800_000, "batch_size": 1024, "lr": 5e-4}
    out = apply_preset("short-budget", data)
    steps = 800_000 // 1024                                   # 781
    assert out["lr"] == 5e-4                                  # given: kept
    assert out["lr_warmup_steps"] == steps // 20 == 39 and out["sparsity_warmup_steps"] == steps // 4 == 195
    assert out["lr_decay_steps"] == steps // 5 == 156
    assert (out["threshold_parameterization"], out["initial_b_dec"], out["initial_threshold_quantile"],
            out["initial_exclude_top_pcs"], out["threshold_lr_scale"], out["transcoder_target_scale"],
            out["adam_update_clip"]) == ("direct", "mean", 0.99, 1, 0.1, "target", 3.0)
    assert "threshold_lr_scale" not in out["saes"][0]          # SAEs take the run's 0.1
    assert out["saes"][1]["threshold_lr_scale"] == 1.0 and out["saes"][2]["threshold_lr_scale"] == 0.5
    assert data["saes"][1].get("threshold_lr_scale") is None   # the input is not modified
    assert apply_preset(None, data) is data
    with pytest.raises(SaescopeError, match="unknown training preset 'fast'; known: short-budget"):
        apply_preset("fast", data)
    with pytest.raises(SaescopeError, match="give total_tokens"):
        apply_preset("short-budget", {"saes": []})


def test_demo_config_is_the_one_it_was_written_out_as(tmp_path):
    """The demo's config through the preset equals the explicit config the demo used to spell out."""
    cfg = DemoConfig(out=tmp_path)
    steps = cfg.tokens // cfg.batch_size
    explicit = TrainConfig(
        saes=[{"site": "resid_post/layer_6", "width": 4096, "sparsity_coefficient": lam} for lam in cfg.lambdas]
        + [{"site": "mlp_in/layer_6", "width": 4096, "sparsity_coefficient": 1e-5, "kind": "transcoder",
            "threshold_lr_scale": 1.0}],
        total_tokens=cfg.tokens, batch_size=cfg.batch_size, lr=1e-3, lr_warmup_steps=steps // 20,
        sparsity_warmup_steps=steps // 4, lr_decay_steps=steps // 5, threshold_parameterization="direct",
        initial_b_dec="mean",
        initial_threshold_quantile=0.99, initial_exclude_top_pcs=1, threshold_lr_scale=0.1,
        transcoder_target_scale="target", adam_update_clip=3.0,
        checkpoint_every=steps // 4, log_every=steps // 10, seed=0, out_dir=tmp_path, store=tmp_path / "a",
        model="gemma-3-270m")
    assert short_budget_train_config(cfg, tmp_path / "a") == explicit
    assert short_budget_train_config(cfg, tmp_path / "a").fingerprint() == explicit.fingerprint()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "acts"
    gen = torch.Generator().manual_seed(0)
    writer = StoreWriter(path, {SITE: 16}, shard_rows=500)
    x = (torch.randn(1200, 16, generator=gen) + 1.0) * 30
    writer.add({SITE: x}, token_ids=torch.arange(1200), document_ids=torch.zeros(1200, dtype=torch.int64),
               positions=torch.arange(1200))
    writer.close()
    return path


def test_cli_preset_fills_unset_flags_and_explicit_flags_win(store, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--store", str(store), "--out", str(out), "--sites", SITE, "--width",
                                      "32", "--lambda", "0.01", "--total-tokens", "2000", "--batch-size", "100",
                                      "--lr", "3e-3", "--preset", "short-budget"])
    assert result.exit_code == 0, result.output
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["lr"] == 3e-3                                 # the flag
    assert written["lr_warmup_steps"] == 1 and written["sparsity_warmup_steps"] == 5   # 20 steps
    assert written["lr_decay_steps"] == 4
    assert written["initial_exclude_top_pcs"] == 1 and written["threshold_lr_scale"] == 0.1
    assert written["threshold_parameterization"] == "direct" and written["initial_b_dec"] == "mean"
    bad = CliRunner().invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "x"), "--sites", SITE,
                                   "--width", "32", "--lambda", "0.01", "--total-tokens", "2000", "--preset", "nope"])
    assert bad.exit_code == 2 and "unknown training preset 'nope'" in bad.output
