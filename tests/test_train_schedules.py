"""Schedules (closed form at given steps), the decoder-norm constraint, Adam against torch.optim.Adam, config."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from saescope.errors import SaescopeError
from saescope.train.config import SAESpec, TrainConfig, width_label
from saescope.train.decoder_norm import normalize_rows, project_out_parallel_gradient
from saescope.train.optim import Adam
from saescope.train.schedules import learning_rate, sparsity_coefficient


@pytest.mark.parametrize(("step", "expected_factor"), [
    (0, 0.1),                                   # starts at 0.1 × lr
    (250, 0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2),  # cos(π/4) = √½
    (500, 0.55),                                # half-way: midpoint of 0.1 and 1
    (750, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2),
    (1000, 1.0), (5000, 1.0), (10**6, 1.0),
])
def test_learning_rate_cosine_warmup(step, expected_factor):
    assert learning_rate(step, 7e-5, 1000, 0.1) == pytest.approx(7e-5 * expected_factor, rel=1e-12)


def test_learning_rate_is_increasing_during_warmup():
    values = [learning_rate(t, 1.0, 1000, 0.1) for t in range(1001)]
    assert all(b > a for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (1, 2e-4), (2500, 0.5), (5000, 1.0), (9999, 1.9998),
                                                (10_000, 2.0), (123_456, 2.0)])
def test_sparsity_coefficient_linear_warmup(step, expected):
    assert sparsity_coefficient(step, 2.0, 10_000) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_no_warmup_gives_final_values():
    assert learning_rate(0, 3e-4, 0) == 3e-4
    assert sparsity_coefficient(0, 0.5, 0) == 0.5
    with pytest.raises(ValueError):
        learning_rate(-1, 1.0)


def test_gradient_projection_removes_parallel_component():
    torch.manual_seed(0)
    W = torch.randn(50, 12, dtype=torch.float64)
    normalize_rows(W)
    grad = torch.randn(50, 12, dtype=torch.float64)
    original = grad.clone()
    project_out_parallel_gradient(W, grad)
    # orthogonal to every row
    assert (grad * W).sum(dim=1).abs().max() < 1e-14
    # and what was removed is parallel to the row: g − g' = (g·w) w
    removed = original - grad
    expected = (original * W).sum(dim=1, keepdim=True) * W
    torch.testing.assert_close(removed, expected, rtol=0, atol=1e-14)


def test_projection_with_non_unit_rows():
    W = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    project_out_parallel_gradient(W, grad)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))


def test_step_keeps_rows_unit_norm_and_small_steps_stay_close():
    torch.manual_seed(1)
    W = torch.randn(40, 8, dtype=torch.float64)
    normalize_rows(W)
    grad = torch.randn(40, 8, dtype=torch.float64)
    project_out_parallel_gradient(W, grad)
    W_new = W - 1e-3 * grad
    # a projected step changes the norm only to second order...
    assert (W_new.norm(dim=1) - 1).abs().max() < 1e-5
    normalize_rows(W_new)
    # ...and renormalization puts every row back at exactly unit norm
    assert (W_new.norm(dim=1) - 1).abs().max() < 1e-15


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("beta1", "scale"), [(0.0, 1.0), (0.9, 1.0), (0.0, 0.1)])
def test_adam_matches_torch_adam(fused, beta1, scale):
    """Our Adam is torch.optim.Adam; ``lr_scale`` (θ's own learning rate) is one parameter group per lr."""
    torch.manual_seed(2)
    p_ours = {"a": torch.randn(30, 7), "threshold": torch.rand(7)}
    p_ref = [torch.nn.Parameter(t.clone()) for t in p_ours.values()]
    ours = Adam(p_ours, beta1=beta1, beta2=0.999, eps=1e-8, fused=fused, lr_scale={"threshold": scale})
    ref = torch.optim.Adam([{"params": [p_ref[0]]}, {"params": [p_ref[1]]}], lr=1e-2, betas=(beta1, 0.999),
                           eps=1e-8)
    for step in range(6):
        grads = [torch.randn_like(t) for t in p_ref]
        lr = 1e-2 * (step + 1) / 6
        ref.param_groups[0]["lr"], ref.param_groups[1]["lr"] = lr, lr * scale
        for p, g in zip(p_ref, grads):
            p.grad = g.clone()
        ref.step()
        ours.step(dict(zip(p_ours, grads)), lr)
    for (name, mine), theirs in zip(p_ours.items(), p_ref):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_adam_state_round_trip():
    p = {"w": torch.randn(4, 3)}
    opt = Adam(p)
    opt.step({"w": torch.randn(4, 3)}, 0.1)
    state = {k: v.clone() for k, v in opt.state_tensors().items()}
    p2 = {"w": p["w"].clone()}
    opt2 = Adam(p2)
    opt2.load_state_tensors(state)
    g = torch.randn(4, 3)
    opt.step({"w": g}, 0.1)
    opt2.step({"w": g}, 0.1)
    assert torch.equal(p["w"], p2["w"])


def test_config_defaults_are_the_recipe():
    cfg = TrainConfig(saes=[SAESpec(site="resid_post/layer_6", width=16384, sparsity_coefficient=1e-3)],
                      total_tokens=10**6)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps) == (0.0, 0.999, 1e-8)
    assert (cfg.lr, cfg.lr_warmup_steps, cfg.lr_warmup_start) == (7e-5, 1000, 0.1)
    assert cfg.sparsity_warmup_steps == 10_000
    assert (cfg.batch_size, cfg.bandwidth, cfg.initial_threshold) == (4096, 0.001, 0.001)
    assert cfg.total_steps == 10**6 // 4096


def test_config_validation_messages(tmp_path):
    with pytest.raises(ValueError, match="transcoder reads mlp_in"):
        SAESpec(site="resid_post/layer_1", width=8, sparsity_coefficient=0.1, kind="transcoder")
    spec = SAESpec(site="mlp_in:3", width=8, sparsity_coefficient=0.1, kind="transcoder")
    assert spec.target_site == "mlp_out/layer_3"
    bad = tmp_path / "bad.toml"
    bad.write_text('total_tokens = 100\n[[saes]]\nsite = "resid_post/layer_1"\nwidth = 8\n'
                   'sparsity_coefficient = 0.1\n[[saes]]\nsite = "resid_post:1"\nwidth = 8\n'
                   'sparsity_coefficient = 0.1\n')
    with pytest.raises(SaescopeError, match="listed twice"):
        TrainConfig.from_file(bad, batch_size=10)
    with pytest.raises(SaescopeError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.toml")


def test_config_toml_round_trip(tmp_path):
    cfg = TrainConfig(saes=[SAESpec(site="resid_post/layer_6", width=4096, sparsity_coefficient=3e-4),
                            SAESpec(site="mlp_in/layer_2", width=2048, sparsity_coefficient=1e-3,
                                    kind="transcoder")],
                      total_tokens=10**6, lr=3e-4, out_dir=tmp_path / "run", model="gemma-3-270m")
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = TrainConfig.from_file(path)
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert TrainConfig.from_file(path, total_tokens=2 * 10**6).fingerprint() == cfg.fingerprint()
    assert TrainConfig.from_file(path, lr=1e-3).fingerprint() != cfg.fingerprint()


def test_width_label():
    assert [width_label(w) for w in (16384, 4096, 65536, 131072, 262144, 1 << 20, 1000, 3000)] == [
        "16k", "4k", "65k", "131k", "262k", "1m", "1000", "3000"]


@pytest.mark.parametrize(("step", "expected_factor"), [
    (0, 1.0), (79, 1.0),                       # before the last 20 of 100 steps: constant
    (80, 1.0), (81, 19 / 20), (90, 0.5), (99, 1 / 20),   # then (T − t) / decay
])
def test_learning_rate_linear_decay_over_the_last_steps(step, expected_factor):
    got = learning_rate(step, 1e-3, 0, decay_steps=20, total_steps=100)
    assert got == pytest.approx(1e-3 * expected_factor, rel=1e-12)


def test_learning_rate_decay_multiplies_the_warmup_and_needs_the_run_length():
    # a run all warm-up and all decay: both factors at once
    warm = 0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * 4 / 10))
    assert learning_rate(4, 2.0, 10, 0.1, decay_steps=10, total_steps=10) == pytest.approx(2.0 * warm * 6 / 10,
                                                                                            rel=1e-12)
    assert learning_rate(5, 2.0, 0, decay_steps=0, total_steps=None) == 2.0
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate(5, 2.0, 0, decay_steps=3)


def test_trainer_takes_its_steps_at_the_decayed_learning_rate(tmp_path):
    from tests.train_helpers import run_trainer, small_config

    torch.manual_seed(0)
    acts = {"resid_post/layer_0": torch.randn(2048, 16) * 3}
    spec = SAESpec(site="resid_post/layer_0", width=32, sparsity_coefficient=1e-3)
    cfg = small_config(tmp_path, [spec], total_steps=12, lr_decay_steps=5, lr_warmup_steps=0)
    seen = []
    trainer = run_trainer(cfg, acts, max_steps=8)
    seen.append(trainer.units[0].last["lr"])       # the 8th step, index 7: (12 − 7) / 5 = 1
    trainer.run()
    seen.append(trainer.units[0].last["lr"])       # the last, index 11: 1/5
    assert seen == [pytest.approx(3e-3), pytest.approx(3e-3 / 5)]
    with pytest.raises(ValueError, match="lr_decay_steps=13 is more than the run's 12 steps"):
        small_config(tmp_path, [spec], total_steps=12, lr_decay_steps=13)


def test_adam_update_clip_bounds_the_step_a_quiet_parameter_takes():
    """At β1 = 0 a parameter with no gradient for t − 1 steps, then g, moves by √((1 − β2ᵗ)/(1 − β2))·lr
    (closed form, ≈ 17.7·lr at t = 380); with update_clip = 3 by exactly 3·lr. Small steps are unchanged."""
    t, lr = 380, 1e-3
    moved = {}
    for clip in (None, 3.0):
        p = {"w": torch.zeros(3, dtype=torch.float64)}
        opt = Adam(p, update_clip=clip, eps=1e-300)
        zero = torch.zeros(3, dtype=torch.float64)
        for _ in range(t - 1):
            opt.step({"w": zero}, lr)
        opt.step({"w": torch.tensor([2.0, -5.0, 0.0], dtype=torch.float64)}, lr)
        moved[clip] = p["w"].clone()
    bound = math.sqrt((1 - 0.999 ** t) / (1 - 0.999)) * lr
    torch.testing.assert_close(moved[None], torch.tensor([-bound, bound, 0.0], dtype=torch.float64), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(moved[3.0], torch.tensor([-3 * lr, 3 * lr, 0.0], dtype=torch.float64), rtol=1e-12,
                               atol=0)


def test_adam_with_a_loose_update_clip_is_torch_adam():
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64)
    ours = {"w": w.clone()}
    ref = torch.nn.Parameter(w.clone())
    opt = Adam(ours, update_clip=1e6)
    assert not opt.fused
    torch_opt = torch.optim.Adam([ref], lr=1e-2, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(20):
        g = torch.randn(6, 4, dtype=torch.float64)
        opt.step({"w": g}, 1e-2)
        ref.grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(ours["w"], ref.detach(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="update_clip must be positive"):
        Adam({"w": w.clone()}, update_clip=0.0)


def test_the_run_setting_reaches_every_sae_optimizer(tmp_path):
    from tests.train_helpers import run_trainer, small_config

    torch.manual_seed(0)
    acts = {"resid_post/layer_0": torch.randn(1024, 16) * 3}
    spec = SAESpec(site="resid_post/layer_0", width=32, sparsity_coefficient=1e-3)
    trainer = run_trainer(small_config(tmp_path, [spec], total_steps=4, adam_update_clip=2.0), acts)
    assert trainer.units[0].adam.update_clip == 2.0 and not trainer.units[0].adam.fused
