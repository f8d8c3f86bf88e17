"""The trainer: many SAEs per pass, exact resume, signals, checkpoint errors, suite output, metrics."""

from __future__ import annotations

import itertools
import json
import os
import signal

import pytest
import torch
from train_helpers import assert_bitwise, run_trainer, small_config, weights

from saescope.formats import load_sae
from saescope.train import SAESpec, Trainer, TrainingInterrupted
from saescope.train.checkpoint import CheckpointError
from saescope.train.sources import TensorBatchSource

SITE = "resid_post/layer_2"
D = 24


def _acts(n=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # structured data: sparse combinations of a few directions plus noise and an offset
    dirs = torch.randn(48, D, generator=gen)
    codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.1)
    x = codes @ dirs + 0.05 * torch.randn(n, D, generator=gen) + 2.0
    y = torch.randn(n, D, generator=gen)
    return {SITE: x * 7.0, "mlp_in/layer_1": x / x.norm(dim=1, keepdim=True) * D ** 0.5, "mlp_out/layer_1": y}




SPEC_A = SAESpec(site=SITE, width=64, sparsity_coefficient=0.02)
SPEC_B = SAESpec(site=SITE, width=96, sparsity_coefficient=0.2)
SPEC_T = SAESpec(site="mlp_in/layer_1", width=32, sparsity_coefficient=0.05, kind="transcoder")


@pytest.mark.parametrize("fast_path", [True, False])
def test_many_saes_together_equal_each_alone(tmp_path, fast_path):
    acts = _acts()
    together = run_trainer(small_config(tmp_path / "both", [SPEC_A, SPEC_B, SPEC_T], fast_path=fast_path), acts)
    alone_a = run_trainer(small_config(tmp_path / "a", [SPEC_A], fast_path=fast_path), acts)
    alone_t = run_trainer(small_config(tmp_path / "t", [SPEC_T], fast_path=fast_path), acts)
    both = weights(together)
    assert_bitwise({SPEC_A.name: both[SPEC_A.name]}, weights(alone_a))
    assert_bitwise({SPEC_T.name: both[SPEC_T.name]}, weights(alone_t))
    # training changed the weights (the comparison is not vacuous)
    initial = Trainer(small_config(tmp_path / "x", [SPEC_A]), [], {SITE: 1.0}, dims={SITE: D}, progress=False)
    initial._build()
    assert not torch.equal(initial.units[0].module.W_enc, both[SPEC_A.name]["W_enc"])


@pytest.mark.parametrize("fast_path", [True, False])
def test_resume_is_bitwise_exact(tmp_path, fast_path):
    acts = _acts()
    specs = [SPEC_A, SPEC_B, SPEC_T]
    # 40 steps over 16 batches per epoch: the interruption falls inside the 2nd epoch
    straight = run_trainer(small_config(tmp_path / "straight", specs, total_steps=40, fast_path=fast_path), acts)
    cfg = small_config(tmp_path / "resumed", specs, total_steps=40, fast_path=fast_path)
    first = run_trainer(cfg, acts, max_steps=20)
    assert first.step == 20
    assert not (tmp_path / "resumed" / "suite").exists()
    second = run_trainer(cfg, acts)                       # same command: resumes from the checkpoint at step 20
    assert second.step == 40
    assert_bitwise(weights(straight), weights(second))
    for u1, u2 in zip(straight.units, second.units):
        assert torch.equal(u1.adam.exp_avg_sq["W_dec"], u2.adam.exp_avg_sq["W_dec"])
        assert torch.equal(u1.tokens_since_fired, u2.tokens_since_fired)


def test_resume_without_loader_state_replays_batches(tmp_path):
    acts = _acts()

    class Plain:
        """An iterable without state_dict (e.g. a generator factory)."""

        def __iter__(self):
            return iter(TensorBatchSource(acts, 128, seed=3))

    straight = run_trainer(small_config(tmp_path / "s", [SPEC_A]), acts, source=Plain())
    cfg = small_config(tmp_path / "r", [SPEC_A])
    run_trainer(cfg, acts, max_steps=9, source=Plain())
    resumed = run_trainer(cfg, acts, source=Plain())
    assert_bitwise(weights(straight), weights(resumed))


def test_sigterm_writes_checkpoint_and_resume_matches(tmp_path):
    acts = _acts()
    specs = [SPEC_A]
    straight = run_trainer(small_config(tmp_path / "straight", specs), acts)

    class SignalAfter(TensorBatchSource):
        def __init__(self, *a, after, **k):
            super().__init__(*a, **k)
            self.after, self.served = after, 0

        def __iter__(self):
            for batch in super().__iter__():
                self.served += 1
                if self.served == self.after:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    cfg = small_config(tmp_path / "sig", specs)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 7"):
        run_trainer(cfg, acts, source=SignalAfter(acts, 128, seed=11, after=7))
    assert signal.getsignal(signal.SIGTERM) is previous          # handler restored
    assert (tmp_path / "sig" / "checkpoints" / "step_00000007").is_dir()
    resumed = run_trainer(cfg, acts)
    assert_bitwise(weights(straight), weights(resumed))


def test_corrupt_and_mismatched_checkpoints_give_clear_errors(tmp_path):
    acts = _acts()
    cfg = small_config(tmp_path / "run", [SPEC_A])
    run_trainer(cfg, acts, max_steps=5)
    ck = tmp_path / "run" / "checkpoints" / "step_00000005"
    # a different config in the same folder
    other = small_config(tmp_path / "run", [SPEC_A], lr=1e-4)
    with pytest.raises(CheckpointError, match="different config.*lr"):
        run_trainer(other, acts)
    other_saes = small_config(tmp_path / "run", [SPEC_B])
    with pytest.raises(CheckpointError, match="different config"):
        run_trainer(other_saes, acts)
    # different activations (norm scale)
    with pytest.raises(CheckpointError, match="norm scale"):
        run_trainer(cfg, {k: v * 2 for k, v in acts.items()})
    # flipped bytes in the tensor file
    data = bytearray((ck / "state.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ck / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        run_trainer(cfg, acts)
    # broken JSON
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        run_trainer(cfg, acts)
    # pointer to a missing folder
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="missing"):
        run_trainer(cfg, acts)


def test_fast_and_dense_trainers_agree(tmp_path):
    acts = _acts()
    fast = weights(run_trainer(small_config(tmp_path / "f", [SPEC_A, SPEC_T], fast_path=True), acts))
    dense = weights(run_trainer(small_config(tmp_path / "d", [SPEC_A, SPEC_T], fast_path=False), acts))
    for name in fast:
        for key in fast[name]:
            torch.testing.assert_close(fast[name][key], dense[name][key], rtol=1e-3, atol=1e-4,
                                       msg=f"{name} {key}")


def test_decoder_rows_stay_unit_norm_and_suite_is_written(tmp_path):
    acts = _acts()
    specs = [SAESpec(site=SITE, width=64, sparsity_coefficient=lam) for lam in (0.005, 0.05, 0.5)]
    trainer = run_trainer(small_config(tmp_path, specs, total_steps=60, lr=1e-2, threshold_parameterization="direct"), acts)
    for unit in trainer.units:
        torch.testing.assert_close(unit.module.W_dec.norm(dim=1), torch.ones(unit.spec.width), rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "suite" / "training_summary.json").read_text())
    assert len(summary) == 3
    for row, unit in zip(summary, trainer.units):
        folder = tmp_path / row["folder"]
        assert folder.parent.name == f"width_{unit.spec.width}"
        assert folder.parent.parent == tmp_path / "suite" / SITE
        assert folder.name.startswith(f"average_l0_{round(row['final_l0'])}")
        sae = load_sae(folder)
        assert sae.config.standardized and sae.config.norm_scale == 1.0
        t = sae.config.training
        assert t["tokens_seen"] == 60 * 128 and 0 <= t["dead_fraction"] <= 1 and t["fvu"] > 0
        # the saved SAE reconstructs raw activations like the trained one
        x = acts[SITE][:64]
        torch.testing.assert_close(sae(x), unit.module(x).detach(), rtol=1e-4, atol=1e-3)
    # larger λ → sparser and a worse reconstruction
    l0 = [row["final_l0"] for row in summary]
    fvu = [row["fvu"] for row in summary]
    assert l0[0] > l0[1] > l0[2] and fvu[0] < fvu[1] < fvu[2]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {row["step"] for row in lines} == set(range(5, 61, 5))
    assert {"loss", "mse", "l0", "fvu", "dead_fraction", "lambda", "lr", "tokens_per_s"} <= set(lines[0])
    assert lines[0]["lambda"] == pytest.approx(0.005 * 4 / 6)         # λ(t=4) during the warm-up
    assert lines[0]["lr"] == pytest.approx(1e-2)                      # warm-up of 4 steps is over
    assert (tmp_path / "config.toml").is_file()


def test_missing_site_or_scale_fails_before_training(tmp_path):
    from saescope.errors import SaescopeError

    acts = _acts()
    cfg = small_config(tmp_path, [SAESpec(site="resid_post/layer_9", width=8, sparsity_coefficient=0.1)])
    with pytest.raises(SaescopeError, match="no norm scale"):
        Trainer(cfg, TensorBatchSource(acts, 128), {SITE: 1.0}, progress=False)
    with pytest.raises(SaescopeError, match="no site resid_post/layer_9"):
        Trainer(cfg, TensorBatchSource(acts, 128), {"resid_post/layer_9": 1.0}, progress=False).run()


def test_dense_step_while_many_latents_fire_then_sparse(tmp_path, monkeypatch):
    import saescope.train.unit as trainer_module

    calls = []
    for name in ("sparse_training_step", "dense_training_step"):
        original = getattr(trainer_module, name)

        def wrapped(*a, _original=original, _name=name, **k):
            result = _original(*a, **k)
            calls.append((_name, result.l0))
            return result

        monkeypatch.setattr(trainer_module, name, wrapped)
    acts = _acts()
    spec = SAESpec(site=SITE, width=64, sparsity_coefficient=0.5)
    run_trainer(small_config(tmp_path, [spec], total_steps=40, lr=1e-2, threshold_parameterization="direct",
                 fast_path_max_density=0.2), acts)
    assert calls[0][0] == "dense_training_step"              # no L0 known yet: dense first
    for (_, l0_before), (kind, _) in itertools.pairwise(calls):
        assert kind == ("sparse_training_step" if l0_before / 64 <= 0.2 else "dense_training_step")
    assert {kind for kind, _ in calls} == {"sparse_training_step", "dense_training_step"}


def test_threshold_quantile_initialisation(tmp_path):
    acts = _acts()
    cfg = small_config(tmp_path, [SPEC_A], initial_threshold_quantile=0.9, initial_threshold=1e-4)
    source = TensorBatchSource(acts, cfg.batch_size, seed=11)
    first = next(iter(TensorBatchSource(acts, cfg.batch_size, seed=11)))[SITE]
    trainer = Trainer(cfg, source, {SITE: TensorBatchSource(acts, 128).norm_scale(SITE)}, progress=False)
    trainer.run(max_steps=0)
    sae = trainer.units[0].module
    z = sae.pre_activations(first).detach().to(torch.float64)
    # independent check: per latent, the fraction of the first batch above θ_i is ~10% (or θ_i is the floor)
    above = (z > sae.threshold.detach().to(torch.float64)).to(torch.float64).mean(dim=0)
    floor = sae.threshold.detach() <= 1e-4 * (1 + 1e-6)
    assert floor.sum() < sae.d_sae
    assert ((above[~floor] - 0.1).abs() <= 1 / 128 + 1e-9).all()
    # and training from it resumes exactly like a straight run
    straight = run_trainer(small_config(tmp_path / "s", [SPEC_A], initial_threshold_quantile=0.9, initial_threshold=1e-4), acts)
    resumed = run_trainer(cfg, acts)
    assert_bitwise(weights(straight), weights(resumed))


def test_b_dec_mean_initialisation(tmp_path):
    acts = _acts()
    cfg = small_config(tmp_path, [SPEC_A, SPEC_T], initial_b_dec="mean")
    scales = {k: TensorBatchSource(acts, 128).norm_scale(k) for k in acts}
    first = next(iter(TensorBatchSource(acts, cfg.batch_size, seed=11)))
    trainer = Trainer(cfg, TensorBatchSource(acts, cfg.batch_size, seed=11), scales, progress=False)
    trainer.run(max_steps=0)
    sae, tc = (u.module for u in trainer.units)
    expected_sae = (first[SITE].to(torch.float64) / scales[SITE]).mean(dim=0)
    # a transcoder's b_dec is its output bias: the mean of the target, divided by the INPUT's scale
    expected_tc = (first["mlp_out/layer_1"].to(torch.float64) / scales["mlp_in/layer_1"]).mean(dim=0)
    torch.testing.assert_close(sae.b_dec.detach().to(torch.float64), expected_sae, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tc.b_dec.detach().to(torch.float64), expected_tc, rtol=1e-6, atol=1e-7)
