"""Skip transcoders (Gemma Scope 2): ŷ = W_dec f + b_dec + x W_skip, W_skip [d_in, d_out] zero at init.

References: float64 hand math (loss, outputs, raw-scale standardized map), autograd of that float64 math for
every parameter's gradient, and central finite differences on W_skip (the loss is smooth in W_skip)."""

from __future__ import annotations

import pytest
import torch

from saescope.config import SAEConfig
from saescope.evaluate.suite import EvalTarget, _reconstruct
from saescope.sae.losses import LossOptions
from saescope.sae.transcoder import JumpReLUTranscoder

D_IN, D_SAE, D_OUT, C = 8, 24, 6, 3.0


def random_skip(dtype=torch.float32, seed=0, d_out=D_OUT, norm_scale=C) -> JumpReLUTranscoder:
    g = torch.Generator().manual_seed(seed)
    tc = JumpReLUTranscoder(D_IN, D_SAE, norm_scale, d_out=d_out, skip=True, seed=seed, dtype=dtype,
                            site="mlp_in", layer=1)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g, dtype=torch.float64) * 0.5)
        tc.b_enc.copy_(torch.randn(D_SAE, generator=g, dtype=torch.float64) * 0.1)
        tc.W_dec.copy_(torch.randn(D_SAE, d_out, generator=g, dtype=torch.float64) * 0.3)
        tc.b_dec.copy_(torch.randn(d_out, generator=g, dtype=torch.float64) * 0.2)
        tc.W_skip.copy_(torch.randn(D_IN, d_out, generator=g, dtype=torch.float64) * 0.4)
        tc.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64) * 0.3)
    return tc


def data(seed=1, n=64, d_out=D_OUT):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D_IN, generator=g, dtype=torch.float64) * C,
            torch.randn(n, d_out, generator=g, dtype=torch.float64) * 2)


def params64(tc):
    return {n: getattr(tc, n).detach().to(torch.float64).clone()
            for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")}


def hand_loss(p, x_raw, y_raw, lam, C, target_l0=None):
    """Float64 loss on the normalized scale, written out from the definition."""
    x, y = x_raw / C, y_raw / C
    z = x @ p["W_enc"] + p["b_enc"]
    active = z > p["threshold"]
    f = torch.where(active, z, torch.zeros_like(z))
    y_hat = f @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"]
    l0 = active.to(torch.float64).sum(1)
    penalty = l0 if target_l0 is None else (2.0 / target_l0) * (l0 - target_l0) ** 2
    return (((y - y_hat) ** 2).sum(1) + lam * penalty).mean()


def test_fresh_skip_transcoder_equals_the_same_transcoder_without_skip():
    plain = JumpReLUTranscoder(D_IN, D_SAE, C, d_out=D_OUT, seed=5)
    skip = JumpReLUTranscoder(D_IN, D_SAE, C, d_out=D_OUT, seed=5, skip=True)
    assert plain.W_skip is None and getattr(plain, "W_skip", None) is None
    assert tuple(skip.W_skip.shape) == (D_IN, D_OUT) and not bool(skip.W_skip.any())
    assert skip.W_skip.requires_grad and "W_skip" in dict(skip.named_parameters())
    assert list(skip.state_tensors()) == ["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"]
    assert "W_skip" not in plain.state_tensors()
    for name, value in plain.state_tensors().items():
        assert torch.equal(value, skip.state_tensors()[name]), name
    assert (plain.config.architecture, skip.config.architecture) == ("jumprelu_transcoder",
                                                                     "jumprelu_skip_transcoder")
    assert skip.config.d_out == D_OUT
    x, y = data()
    x, y = x.float(), y.float()
    with torch.no_grad():
        skip.threshold.fill_(0.05)
        plain.threshold.fill_(0.05)
    assert torch.equal(skip(x), plain(x))
    a, b = plain.training_forward(x, y, 0.1), skip.training_forward(x, y, 0.1)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.x_hat, b.x_hat)


@pytest.mark.parametrize("target_l0", [None, 5.0])
def test_loss_and_gradients_match_float64_hand_math(target_l0):
    tc = random_skip(torch.float64)
    x, y = data()
    out = tc.training_forward(x, y, LossOptions(0.2, target_l0=target_l0))
    p = {k: v.requires_grad_(k != "threshold") for k, v in params64(tc).items()}
    ref = hand_loss(p, x, y, 0.2, C, target_l0)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert 0 < float(out.l0.detach().mean()) < D_SAE                  # some latents active, some not
    out.loss.backward()
    ref.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
        torch.testing.assert_close(getattr(tc, name).grad, p[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert float(tc.W_skip.grad.abs().max()) > 1e-3


def test_w_skip_gradient_matches_finite_differences():
    tc = random_skip(torch.float64, seed=3)
    x, y = data(seed=4)
    tc.training_forward(x, y, 0.1).loss.backward()
    p = params64(tc)
    eps = 1e-6
    for i, j in [(0, 0), (3, 5), (7, 2)]:
        plus, minus = dict(p), dict(p)
        plus["W_skip"] = p["W_skip"].clone()
        plus["W_skip"][i, j] += eps
        minus["W_skip"] = p["W_skip"].clone()
        minus["W_skip"][i, j] -= eps
        fd = (hand_loss(plus, x, y, 0.1, C) - hand_loss(minus, x, y, 0.1, C)) / (2 * eps)
        assert float(tc.W_skip.grad[i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_raw_scale_output_and_standardization_leave_w_skip_unchanged():
    """ŷ_raw = C·(W_dec f + b_dec) + x_raw W_skip; the standardized transcoder computes it with the same W_skip."""
    tc = random_skip(torch.float64, seed=6)
    x, _ = data(seed=7)
    p = params64(tc)
    z = (x / C) @ p["W_enc"] + p["b_enc"]
    f = torch.where(z > p["threshold"], z, torch.zeros_like(z))
    expected = C * (f @ p["W_dec"] + p["b_dec"]) + x @ p["W_skip"]
    torch.testing.assert_close(tc(x), expected, rtol=1e-12, atol=1e-12)
    std = tc.standardize()
    assert std.config.standardized and std.norm_scale == 1.0 and std.skip
    assert torch.equal(std.W_skip, tc.W_skip)
    torch.testing.assert_close(std(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std.encode(x), C * f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["standardize", "fold_norm_scale"])
def test_module_level_standardization_keeps_the_transcoder(name):
    """``saescope.sae.standardize`` / ``fold_norm_scale`` on a skip transcoder: same raw map, W_skip kept."""
    import importlib

    S = importlib.import_module("saescope.sae.standardize")   # (saescope.sae re-exports a function of that name)
    tc = random_skip(torch.float64, seed=8)
    x, _ = data(seed=9)
    out = getattr(S, name)(tc)
    assert isinstance(out, JumpReLUTranscoder) and out.skip and out.norm_scale == 1.0
    assert torch.equal(out.W_skip, tc.W_skip)
    torch.testing.assert_close(out(x), tc(x), rtol=1e-12, atol=1e-12)


def test_decode_needs_the_input_and_the_evaluator_uses_it():
    tc = random_skip(seed=8)
    x = data(seed=9)[0].float()
    f = tc.encode(x)
    with pytest.raises(ValueError, match="depends on its input"):
        tc.decode(f)
    target = EvalTarget.of("tc", tc)
    assert target.kind == "transcoder" and (target.read_site.kind, target.write_site.kind) == ("mlp_in", "mlp_out")
    f_eval, y_eval = _reconstruct(tc, x)
    assert torch.equal(y_eval, tc(x)) and torch.equal(f_eval, f)
    assert not torch.allclose(y_eval, tc.decode(f, torch.zeros_like(x)))   # the skip term matters


def test_config_architecture_and_d_out_are_validated():
    assert SAEConfig(d_in=4, d_sae=8).architecture == "jumprelu"
    assert SAEConfig(d_in=4, d_sae=8).output_width == 4
    with pytest.raises(ValueError, match="an SAE writes what it reads"):
        SAEConfig(d_in=4, d_sae=8, d_out=3)
    with pytest.raises(ValueError, match="pre-encoder bias"):
        SAEConfig(d_in=4, d_sae=8, d_out=3, architecture="jumprelu_transcoder")
    cfg = SAEConfig(d_in=4, d_sae=8, d_out=3, architecture="jumprelu_skip_transcoder", apply_b_dec_to_input=False)
    assert cfg.is_transcoder and cfg.output_width == 3
    with pytest.raises(ValueError, match="skip=False"):
        JumpReLUTranscoder(4, 8, config=cfg)
    tc = JumpReLUTranscoder(4, 8, config=cfg, skip=True)
    assert tc.d_out == 3 and tuple(tc.W_skip.shape) == (4, 3)


def test_evaluator_splices_the_skip_transcoder_output_into_a_tiny_gemma3():
    """End to end: the evaluator's spliced loss for a skip transcoder equals a full forward pass with
    ``forward(mlp_in)`` written over ``mlp_out`` (read with a plain torch hook on the folded model)."""
    import transformers

    from saescope.evaluate.suite import EvalBatch, MetricOptions, evaluate_saes
    from saescope.folding import fold_mlp_in_norm
    from saescope.splice import run_with_splice

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        max_position_embeddings=32, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    fold_mlp_in_norm(model)            # the evaluator folds too (same outputs); folding twice is refused
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 0] = False
    seen = []
    handle = model.model.layers[1].pre_feedforward_layernorm.register_forward_hook(
        lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x_in = seen[0]
    C = float(x_in[mask].pow(2).sum(-1).mean().sqrt())
    tc = JumpReLUTranscoder(16, 40, C, skip=True, seed=3, site="mlp_in", layer=1)
    with torch.no_grad():
        tc.W_skip.copy_(torch.randn(16, 16, generator=g) * 0.3)
        tc.b_dec.copy_(torch.randn(16, generator=g) * 0.1)
        tc.threshold.fill_(0.02)
    with torch.no_grad():
        y_hat = tc(x_in)
        no_skip = tc.decode(tc.encode(x_in), torch.zeros_like(x_in))
    counted = mask[:, :-1]

    def reference(replacement):
        out = run_with_splice(model, ids, "mlp_out/layer_1", lambda a: replacement, splice_mask=mask)
        return float(out.loss_per_token[counted].double().mean())

    [result] = evaluate_saes(model, {"tc": tc}, [EvalBatch("d", ids, mask)], MetricOptions(uniformity_tokens=0),
                             progress=False)
    assert result["kind"] == "transcoder"
    assert result["metrics"]["spliced_loss"] == pytest.approx(reference(y_hat), abs=1e-5)
    assert abs(reference(no_skip) - reference(y_hat)) > 1e-3      # the skip term changed the loss
