"""The trainer's Gemma Scope 2 options: target-L0 SAEs, Matryoshka SAEs and skip transcoders.

Many SAEs in one run still equal each alone; resume is bit-exact with a skip transcoder; the sparse and dense
steps give the same weights; a target-L0 run moves L0 toward its target from above and from below; the default
λ of a target-L0 SAE follows the target's scale; a resume with another target refuses.
"""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import assert_bitwise, run_trainer, small_config, weights

from saescope.train import SAESpec, TrainConfig
from saescope.train.checkpoint import CheckpointError
from saescope.train.config import DEFAULT_TARGET_L0_LAMBDA, default_matryoshka_prefixes
from saescope.train.sources import TensorBatchSource

SITE = "resid_post/layer_2"
D = 24


def _acts(n=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, D, generator=gen)
    codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.1)
    x = codes @ dirs + 0.05 * torch.randn(n, D, generator=gen) + 2.0
    x_in = x / x.norm(dim=1, keepdim=True) * D ** 0.5
    # the MLP output: a non-linear function of the input plus a linear part (which a skip connection can take)
    mix = torch.randn(D, D, generator=gen) / D ** 0.5
    y = torch.relu(x_in @ torch.randn(D, 64, generator=gen) / D ** 0.5) @ torch.randn(64, D, generator=gen) / 8
    y = 30.0 * (y + x_in @ mix)
    return {SITE: x * 7.0, "mlp_in/layer_1": x_in, "mlp_out/layer_1": y}




TARGET = SAESpec(site=SITE, width=64, target_l0=6, sparsity_coefficient=0.05)
MATRYOSHKA = SAESpec(site=SITE, width=64, sparsity_coefficient=0.02, matryoshka_prefixes=[8, 24, 64],
                     matryoshka_weights=[1.0, 0.5, 2.0])
BOTH = SAESpec(site=SITE, width=96, target_l0=10, matryoshka_prefixes="default")
PLAIN = SAESpec(site=SITE, width=64, sparsity_coefficient=0.02)
SKIP = SAESpec(site="mlp_in/layer_1", width=32, target_l0=5, kind="transcoder", skip=True)
NO_SKIP = SAESpec(site="mlp_in/layer_1", width=32, target_l0=5, kind="transcoder")


def test_spec_names_validation_and_toml(tmp_path):
    assert TARGET.name == f"{SITE}/width_64/target_l0_6_lambda_0.05"
    assert BOTH.name == f"{SITE}/width_96/target_l0_10_matryoshka"
    assert BOTH.matryoshka_prefixes == default_matryoshka_prefixes(96) == [6, 12, 24, 48, 96]
    assert MATRYOSHKA.name.startswith(f"{SITE}/width_64/lambda_0.02_matryoshka_")
    assert SKIP.name == "transcoder_skip/mlp_in/layer_1/width_32/target_l0_5"
    assert NO_SKIP.name == "transcoder/mlp_in/layer_1/width_32/target_l0_5"
    names = [s.name for s in (TARGET, MATRYOSHKA, BOTH, PLAIN, SKIP, NO_SKIP)]
    assert len(set(names)) == len(names)
    bad = [
        ({"site": SITE, "width": 64}, "sparsity_coefficient.*or target_l0"),
        ({"site": SITE, "width": 64, "target_l0": 5, "skip": True}, "skip.*for transcoders"),
        ({"site": "mlp_in/layer_1", "width": 64, "target_l0": 5, "kind": "transcoder",
          "matryoshka_prefixes": [8, 64]}, "Matryoshka prefixes are for SAEs"),
        ({"site": SITE, "width": 64, "target_l0": 5, "matryoshka_prefixes": [8, 60]}, "last matryoshka prefix"),
        ({"site": SITE, "width": 64, "target_l0": 5, "matryoshka_prefixes": [8, 64], "matryoshka_weights": [1]},
         "one non-negative weight per prefix"),
        ({"site": SITE, "width": 64, "target_l0": 100}, "more latents than the width"),
        ({"site": SITE, "width": 64, "target_l0": 0}, "greater than 0"),
    ]
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            SAESpec(**spec)
    # the written config.toml reads back to the same config (lists included)
    cfg = small_config(tmp_path, [TARGET, MATRYOSHKA, BOTH, SKIP])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = TrainConfig.from_file(path)
    assert again.saes == cfg.saes and again.fingerprint() == cfg.fingerprint()


def test_plain_spec_fingerprint_is_unchanged_by_the_new_options():
    """Checkpoints written before target_l0 / Matryoshka / skip existed keep their fingerprint: the value below is
    what saescope computed for this config at commit 1eb2eb5, before those options (and later settings) existed."""
    cfg = TrainConfig.from_dict({"saes": [{"site": "resid_post:6", "width": 64, "sparsity_coefficient": 0.1}],
                                 "total_tokens": 10000})
    assert cfg.fingerprint() == "66dd53a3adec8730"
    changed = TrainConfig(saes=[PLAIN.model_copy(update={"target_l0": 5.0})], total_tokens=4096)
    assert changed.fingerprint() != TrainConfig(saes=[PLAIN], total_tokens=4096).fingerprint()


@pytest.mark.parametrize("fast_path", [True, False])
def test_many_saes_together_equal_each_alone(tmp_path, fast_path):
    acts = _acts()
    specs = [TARGET, MATRYOSHKA, PLAIN, BOTH, SKIP]
    together = weights(run_trainer(small_config(tmp_path / "all", specs, fast_path=fast_path), acts))
    for i, spec in enumerate((TARGET, MATRYOSHKA, BOTH, SKIP)):
        alone = weights(run_trainer(small_config(tmp_path / f"alone{i}", [spec], fast_path=fast_path), acts))
        assert_bitwise({spec.name: together[spec.name]}, alone)
    assert not torch.equal(together[SKIP.name]["W_skip"], torch.zeros_like(together[SKIP.name]["W_skip"]))


def test_resume_is_bitwise_exact_with_a_skip_transcoder(tmp_path):
    acts = _acts()
    specs = [SKIP, TARGET, BOTH]
    straight = run_trainer(small_config(tmp_path / "straight", specs, total_steps=30), acts)
    cfg = small_config(tmp_path / "resumed", specs, total_steps=30)
    first = run_trainer(cfg, acts, max_steps=13)
    assert first.step == 13
    second = run_trainer(cfg, acts)
    assert second.step == 30
    assert_bitwise(weights(straight), weights(second))
    for u1, u2 in zip(straight.units, second.units):
        for key in u1.adam.exp_avg_sq:
            assert torch.equal(u1.adam.exp_avg_sq[key], u2.adam.exp_avg_sq[key]), (u1.spec.name, key)
        assert u1.lambda_base == u2.lambda_base
    assert "W_skip" in straight.units[0].adam.exp_avg_sq       # Adam trains W_skip
    assert "W_skip" not in straight.units[1].adam.exp_avg_sq
    # W_skip is trained and is not held to unit rows like W_dec
    skip_unit = straight.units[0]
    w_skip = skip_unit.module.W_skip.detach()
    assert w_skip.abs().max() > 0
    assert not torch.allclose(w_skip.norm(dim=1), torch.ones(w_skip.shape[0]), atol=1e-2)
    assert torch.allclose(skip_unit.module.W_dec.detach().norm(dim=1), torch.ones(32), atol=1e-5)


@pytest.mark.parametrize("spec", [TARGET, BOTH, SKIP], ids=["target_l0", "target_l0+matryoshka", "skip"])
def test_fast_path_and_dense_trainer_give_the_same_weights(tmp_path, spec):
    acts = _acts()
    kw = {"dtype": "float64", "total_steps": 20}
    fast = weights(run_trainer(small_config(tmp_path / "fast", [spec], fast_path=True, **kw), acts))[spec.name]
    dense = weights(run_trainer(small_config(tmp_path / "dense", [spec], fast_path=False, **kw), acts))[spec.name]
    assert fast.keys() == dense.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], dense[key], rtol=1e-9, atol=1e-9, msg=key)


def _l0_curve(tmp_path, name, acts, spec, **kw):
    cfg = small_config(tmp_path / name, [spec], total_steps=120, log_every=5, lr=1e-2, sparsity_warmup_steps=10,
                  threshold_parameterization="direct", **kw)
    run_trainer(cfg, acts)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [row["l0"] for row in rows]


@pytest.mark.parametrize("start", ["above", "below"])
def test_target_l0_moves_l0_toward_the_target(tmp_path, start):
    """A low θ starts L0 far above the target, a high one (99.5th percentile of z) far below; both end near it."""
    acts = _acts(n=4096)
    target = 12.0
    spec = SAESpec(site=SITE, width=64, target_l0=target)
    kw = ({"initial_threshold": 1e-3} if start == "above" else
          {"initial_threshold": 1e-3, "initial_threshold_quantile": 0.995})
    curve = _l0_curve(tmp_path, start, acts, spec, **kw)
    first, last = curve[0], sum(curve[-3:]) / 3
    if start == "above":
        assert first > 2 * target
    else:
        assert first < target / 2
    assert abs(last - target) < 0.25 * target, curve


def test_default_lambda_follows_the_target_scale(tmp_path):
    """Without λ, a target-L0 SAE / transcoder gets DEFAULT_TARGET_L0_LAMBDA × mean ‖t‖² of the first batch."""
    acts = _acts()
    sae = SAESpec(site=SITE, width=64, target_l0=6)
    cfg = small_config(tmp_path / "run", [sae, SKIP], total_steps=6)
    trainer = run_trainer(cfg, acts)
    first = next(iter(TensorBatchSource(acts, cfg.batch_size, seed=11)))
    c_sae = TensorBatchSource(acts, 128).norm_scale(SITE)
    c_in = TensorBatchSource(acts, 128).norm_scale("mlp_in/layer_1")
    expected_sae = DEFAULT_TARGET_L0_LAMBDA * float((first[SITE].double() / c_sae).pow(2).sum(1).mean())
    expected_tc = DEFAULT_TARGET_L0_LAMBDA * float((first["mlp_out/layer_1"].double() / c_in).pow(2).sum(1).mean())
    assert trainer.units[0].lambda_base == pytest.approx(expected_sae, rel=1e-6)
    assert trainer.units[1].lambda_base == pytest.approx(expected_tc, rel=1e-6)
    assert expected_tc > 20 * expected_sae          # the transcoder's target is far larger here
    summary = json.loads((tmp_path / "run" / "suite" / "training_summary.json").read_text())
    assert summary[0]["sparsity_coefficient"] == trainer.units[0].lambda_base
    assert summary[0]["target_l0"] == 6 and summary[1]["skip"] is True
    assert summary[1]["folder"].startswith("suite/transcoder/layer_1/width_32/average_l0_")


def test_resume_with_a_different_target_refuses(tmp_path):
    acts = _acts()
    run_trainer(small_config(tmp_path / "run", [TARGET]), acts, max_steps=4)
    # a new spec (its frequency cap resolved again for the new target), as a user would write it
    other = small_config(tmp_path / "run", [SAESpec(**{**TARGET.model_dump(), "target_l0": 20.0, "frequency_cap": None})])
    with pytest.raises(CheckpointError, match=r"saes\[0\]\.target_l0: 6\.0 → 20\.0"):
        run_trainer(other, acts)
    no_skip = small_config(tmp_path / "run2", [SKIP])
    run_trainer(no_skip, acts, max_steps=4)
    with pytest.raises(CheckpointError, match=r"saes\[0\]\.skip: True → False"):
        run_trainer(small_config(tmp_path / "run2", [NO_SKIP]), acts)


def test_skip_and_plain_transcoder_get_their_own_suite_folders(tmp_path):
    """Both land in suite/transcoder/layer_<L>/width_<W>/; at the same rounded L0 the second gets ``_2``."""
    acts = _acts()
    trainer = run_trainer(small_config(tmp_path / "run", [SKIP, NO_SKIP], total_steps=6), acts)
    for unit in trainer.units:          # force the same rounded L0
        unit.window = {**unit.window, "l0": 5.0 * unit.window["tokens"]}
    folders = trainer.write_suite()
    a, b = folders[SKIP.name], folders[NO_SKIP.name]
    assert a.name == "average_l0_5" and b.name == "average_l0_5_2"
    assert a.parent == b.parent == tmp_path / "run" / "suite" / "transcoder" / "layer_1" / "width_32"


def test_least_squares_initial_W_skip_matches_numpy(tmp_path):
    """initial_W_skip='least_squares': W_skip and b_dec are the affine least-squares fit of the first batch's
    normalized target on its normalized input (numpy lstsq with an intercept column as the reference)."""
    import numpy as np

    acts = _acts()
    cfg = small_config(tmp_path / "run", [SKIP, NO_SKIP], initial_W_skip="least_squares", initial_b_dec="mean")
    trainer = run_trainer(cfg, acts, max_steps=0)
    first = next(iter(TensorBatchSource(acts, cfg.batch_size, seed=11)))
    c = TensorBatchSource(acts, 128).norm_scale("mlp_in/layer_1")
    x = first["mlp_in/layer_1"].double().numpy() / c
    y = first["mlp_out/layer_1"].double().numpy() / c
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    skip_unit, plain_unit = trainer.units
    np.testing.assert_allclose(skip_unit.W_skip.numpy(), solution[:-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(skip_unit.module.b_dec.numpy(), solution[-1], rtol=1e-4, atol=1e-4)
    assert plain_unit.W_skip is None                      # the plain transcoder keeps b_dec = mean of the target
    np.testing.assert_allclose(plain_unit.module.b_dec.numpy(), y.mean(axis=0), rtol=1e-5, atol=1e-5)
    # the default stays the Gemma Scope 2 zero init and the old fingerprint
    zeros = run_trainer(small_config(tmp_path / "zeros", [SKIP]), acts, max_steps=0)
    assert not zeros.units[0].W_skip.any()
    assert cfg.fingerprint() != cfg.model_copy(update={"initial_W_skip": "zeros"}).fingerprint()


def test_batch_target_spec_is_named_apart_and_needs_a_target():
    token = SAESpec(site="resid_post/layer_6", width=64, target_l0=8)
    batch = SAESpec(site="resid_post/layer_6", width=64, target_l0=8, target_l0_over="batch")
    assert batch.name == token.name.replace("target_l0_8", "target_l0_8_batch") != token.name
    assert batch.loss_options(0.5).batch_target and not token.loss_options(0.5).batch_target
    assert batch.fingerprint_dict() != token.fingerprint_dict()
    assert "target_l0_over" not in token.fingerprint_dict()          # the default: old fingerprints unchanged
    with pytest.raises(ValueError, match="target_l0_over = 'batch' needs target_l0"):
        SAESpec(site="resid_post/layer_6", width=64, sparsity_coefficient=1e-3, target_l0_over="batch")


def test_batch_target_sae_records_how_it_was_trained(tmp_path):
    spec = SAESpec(site="resid_post/layer_2", width=32, target_l0=5, target_l0_over="batch")
    trainer = run_trainer(small_config(tmp_path / "run", [spec], total_steps=6), _acts())
    folder = trainer.write_suite()[spec.name]
    training = json.loads((folder / "saescope.json").read_text())["training"]
    assert training["target_l0"] == 5 and training["target_l0_over"] == "batch"
