"""The sparse training step equals the dense ``training_forward`` + autograd (loss and every gradient).

Random data with thresholds spread so that pre-activations fall above the threshold, below it, and inside the
STE window ``|z − θ| < ε/2`` on both sides (checked, so the test cannot pass vacuously).
"""

from __future__ import annotations

import pytest
import torch

from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import sparse_kernels
from saescope.train.fast_path import dense_training_step, sparse_training_step
from tests.loss_cases import PARAMS, loss, params
from tests.threshold_margins import clear_decision_edges


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def step_path(request, monkeypatch):
    """Every test runs twice: on the compiled CPU kernels (saescope.train.sparse_kernels) and on torch ops."""
    if request.param == "torch":
        monkeypatch.setenv("SAESCOPE_CPU_KERNELS", "0")
    elif sparse_kernels.load() is None:
        pytest.skip("no C++ compiler here: the compiled kernels cannot be built")
    return request.param


def _spread(module, x_raw, bandwidth, seed):
    """Biases and thresholds random; then plant some pre-activations just inside the window on each side; then
    keep every pre-activation clear of θ and θ ± ε/2, so `fired` and the window agree on every CPU."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.b_enc.copy_(torch.randn(module.d_sae, generator=g, dtype=torch.float64).to(module.dtype) * 0.1)
        module.b_dec.copy_(torch.randn(module.b_dec.shape[0], generator=g, dtype=torch.float64).to(module.dtype)
                           * 0.1)
        z = module.pre_activations(x_raw)
        # θ per latent at a quantile of its pre-activations: roughly a third of tokens active
        q = torch.quantile(z.to(torch.float64), 0.66, dim=0)
        module.threshold.copy_(q.clamp_min(0.05).to(module.threshold.dtype))
        # move b_enc so some latents sit at θ ± ε/4 for one token (inside the window, both sides)
        z = module.pre_activations(x_raw)
        for i in range(0, module.d_sae, 3):
            side = 0.25 if i % 2 else -0.25
            delta = module.threshold[i] + side * bandwidth - z[i % x_raw.shape[0], i]
            module.b_enc[i] += delta.to(module.b_enc.dtype)
    clear_decision_edges(module, x_raw, bandwidth)


def _pairs(module, x_raw, bandwidth):
    z = module.pre_activations(x_raw).detach()
    u = (z.to(torch.float64) - module.threshold.detach().to(torch.float64)) / bandwidth
    return {"active": int((u > 0).sum()), "inactive": int((u <= 0).sum()),
            "window_above": int(((u > 0) & (u < 0.5)).sum()), "window_below": int(((u <= 0) & (u > -0.5)).sum())}


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 2e-5)])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparse_step_equals_dense_sae(dtype, rtol, atol, apply_b_dec):
    bandwidth = 0.05
    sae = JumpReLUSAE(24, 96, norm_scale=3.0, dtype=dtype, seed=3, bandwidth=bandwidth,
                      apply_b_dec_to_input=apply_b_dec)
    x_raw = torch.randn(300, 24, generator=torch.Generator().manual_seed(4), dtype=dtype) * 3
    _spread(sae, x_raw, bandwidth, seed=5)
    pairs = _pairs(sae, x_raw, bandwidth)
    assert min(pairs.values()) >= 20, pairs       # every region is populated
    lam = 0.37
    dense = dense_training_step(sae, x_raw, lam)
    x = sae.normalize(x_raw)
    fast = sparse_training_step(params(sae, bandwidth, apply_b_dec), x, None, lam)
    assert fast.loss == pytest.approx(dense.loss, rel=rtol)
    assert fast.l0 == pytest.approx(dense.l0, rel=1e-12)
    assert fast.reconstruction == pytest.approx(dense.reconstruction, rel=rtol)
    assert torch.equal(fast.fired, dense.fired)
    for name in PARAMS:
        assert dense.grads[name].abs().max() > 0, name
        torch.testing.assert_close(fast.grads[name], dense.grads[name], rtol=rtol, atol=atol, msg=name)


def test_sparse_step_threshold_gradient_from_latent_just_below_threshold():
    """dictionary_learning #55: a latent just below θ (f = 0) must still move θ through the L0 term."""
    sae = JumpReLUSAE(4, 2, dtype=torch.float64, seed=0, bandwidth=0.1, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, 2, dtype=torch.float64))
        sae.threshold.fill_(1.0)
    x = torch.tensor([[0.98, -5.0, 0.0, 0.0]], dtype=torch.float64)   # z0 = 0.98: below θ, inside the window
    fast = sparse_training_step(params(sae, 0.1, False), x, None, 2.0)
    # ∂/∂θ0 of λ·H = −λ/ε·K = −2/0.1 = −20 (batch of 1); no reconstruction term (f = 0 ⇒ g_f·0 window weight
    # still counts: −θ/ε·g_f); recompute g_f independently
    g_f0 = float(2 * (sae.b_dec.detach() - x[0]) @ sae.W_dec.detach()[0])
    expected = -20.0 + g_f0 * (-1.0 / 0.1)
    assert fast.grads["threshold"][0].item() == pytest.approx(expected, rel=1e-12)
    assert fast.grads["threshold"][1].item() == 0.0


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 2e-5)])
def test_sparse_step_equals_dense_transcoder(dtype, rtol, atol):
    bandwidth = 0.05
    tc = JumpReLUTranscoder(16, 80, norm_scale=4.0, d_out=12, dtype=dtype, seed=6, bandwidth=bandwidth)
    gen = torch.Generator().manual_seed(7)
    x_raw = torch.randn(250, 16, generator=gen, dtype=dtype) * 4
    y_raw = torch.randn(250, 12, generator=gen, dtype=dtype) * 2
    _spread(tc, x_raw, bandwidth, seed=8)
    pairs = _pairs(tc, x_raw, bandwidth)
    assert min(pairs.values()) >= 20, pairs
    dense = dense_training_step(tc, x_raw, 0.2, y_raw)
    fast = sparse_training_step(params(tc, bandwidth, False), tc.normalize(x_raw), tc.normalize_target(y_raw), 0.2)
    assert fast.loss == pytest.approx(dense.loss, rel=rtol)
    for name in PARAMS:
        torch.testing.assert_close(fast.grads[name], dense.grads[name], rtol=rtol, atol=atol, msg=name)


def test_sparse_step_with_no_active_latents():
    sae = JumpReLUSAE(6, 10, dtype=torch.float64, seed=1)
    with torch.no_grad():
        sae.threshold.fill_(100.0)
    x = torch.randn(5, 6, dtype=torch.float64)
    dense = dense_training_step(sae, x, 0.5)
    fast = sparse_training_step(params(sae, 0.001, True), x, None, 0.5)
    assert fast.l0 == 0.0
    assert fast.loss == pytest.approx(dense.loss, rel=1e-12)
    for name in PARAMS:
        torch.testing.assert_close(fast.grads[name], dense.grads[name], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- Gemma Scope 2 loss options


RUNTIME = ("kernels", "project_decoder_gradient", "reuse_gradient_buffers", "reduce_counts")


def _fast(module, x_raw, lam, bandwidth, target_raw=None, **options):
    x = module.normalize(x_raw)
    target = module.normalize_target(target_raw) if target_raw is not None else None
    runtime = {k: options.pop(k) for k in RUNTIME if k in options}
    W_skip = options.pop("W_skip", None)
    return sparse_training_step(params(module, bandwidth, W_skip=W_skip), x, target, loss(lam, **options),
                                **runtime)


def _assert_same(fast, dense, rtol, atol, names=PARAMS):
    assert fast.loss == pytest.approx(dense.loss, rel=rtol)
    assert fast.reconstruction == pytest.approx(dense.reconstruction, rel=rtol)
    assert fast.full_reconstruction == pytest.approx(dense.full_reconstruction, rel=rtol)
    assert fast.l0 == pytest.approx(dense.l0, rel=1e-12)
    assert torch.equal(fast.fired, dense.fired)
    for name in names:
        assert dense.grads[name].abs().max() > 0, name
        torch.testing.assert_close(fast.grads[name], dense.grads[name], rtol=rtol, atol=atol, msg=name)


def _spread_sae(dtype, apply_b_dec, bandwidth=0.05, d_in=24, d_sae=96, batch=300):
    sae = JumpReLUSAE(d_in, d_sae, norm_scale=3.0, dtype=dtype, seed=3, bandwidth=bandwidth,
                      apply_b_dec_to_input=apply_b_dec)
    x_raw = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(4), dtype=dtype) * 3
    _spread(sae, x_raw, bandwidth, seed=5)
    pairs = _pairs(sae, x_raw, bandwidth)
    assert min(pairs.values()) >= 20, pairs
    return sae, x_raw


def _token_l0(module, x_raw):
    z = module.pre_activations(x_raw).detach().to(torch.float64)
    return (z > module.threshold.detach().to(torch.float64)).sum(dim=1).to(torch.float64)


TOLERANCES = [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 2e-5)]


@pytest.mark.parametrize(("dtype", "rtol", "atol"), TOLERANCES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparse_step_equals_dense_with_target_l0(dtype, rtol, atol, apply_b_dec):
    sae, x_raw = _spread_sae(dtype, apply_b_dec)
    l0 = _token_l0(sae, x_raw)
    target_l0 = float(l0.median()) + 0.5
    assert (l0 > target_l0).sum() >= 20 and (l0 < target_l0).sum() >= 20    # tokens on both sides
    lam = 0.37
    dense = dense_training_step(sae, x_raw, loss(lam, target_l0=target_l0))
    fast = _fast(sae, x_raw, lam, 0.05, target_l0=target_l0)
    _assert_same(fast, dense, rtol, atol)
    plain = _fast(sae, x_raw, lam, 0.05)
    assert abs(plain.loss - fast.loss) > 1e-3                        # the option changed the loss


@pytest.mark.parametrize(("dtype", "rtol", "atol"), TOLERANCES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("target_l0", [None, 30.0])
def test_sparse_step_equals_dense_with_matryoshka(dtype, rtol, atol, apply_b_dec, target_l0):
    sae, x_raw = _spread_sae(dtype, apply_b_dec)
    prefixes, weights = [17, 50, 96], [0.5, 1.7, 1.1]
    for lo, hi in zip([0, *prefixes], prefixes):     # every block has pairs above, below and in the window
        sub = _pairs_in(sae, x_raw, 0.05, lo, hi)
        assert min(sub.values()) >= 3, (lo, hi, sub)
    lam = 0.21
    dense = dense_training_step(sae, x_raw, loss(lam, target_l0=target_l0, matryoshka_prefixes=prefixes,
                                                 matryoshka_weights=weights))
    fast = _fast(sae, x_raw, lam, 0.05, target_l0=target_l0, matryoshka_prefixes=prefixes,
                 matryoshka_weights=weights)
    _assert_same(fast, dense, rtol, atol)
    assert fast.reconstruction > 1.5 * fast.full_reconstruction       # the prefix sum is not the full error


def _pairs_in(module, x_raw, bandwidth, lo, hi):
    z = module.pre_activations(x_raw).detach()[:, lo:hi]
    u = (z.to(torch.float64) - module.threshold.detach()[lo:hi].to(torch.float64)) / bandwidth
    return {"window_above": int(((u > 0) & (u < 0.5)).sum()), "window_below": int(((u <= 0) & (u > -0.5)).sum()),
            "active": int((u > 0).sum())}


def test_matryoshka_with_one_prefix_is_the_plain_step():
    sae, x_raw = _spread_sae(torch.float64, True)
    plain = _fast(sae, x_raw, 0.3, 0.05)
    one = _fast(sae, x_raw, 0.3, 0.05, matryoshka_prefixes=[96], matryoshka_weights=[1.0])
    assert one.loss == pytest.approx(plain.loss, rel=1e-12)
    for name in PARAMS:
        torch.testing.assert_close(one.grads[name], plain.grads[name], rtol=1e-10, atol=1e-12)


def _reference_step(params, x, target, lam, eps, apply_b_dec, *, target_l0=None, prefixes=None, weights=None):
    """An independent dense reference written out here: float64 autograd through the STEs."""
    from saescope.sae.ste import heaviside, jumprelu

    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    xc = x - p["b_dec"] if apply_b_dec else x
    z = xc @ p["W_enc"] + p["b_enc"]
    f = jumprelu(z, p["threshold"], eps)
    base = p["b_dec"] + (x @ p["W_skip"] if "W_skip" in p else 0.0)
    if prefixes is None:
        reconstruction = (target - (f @ p["W_dec"] + base)).pow(2).sum(dim=1)
    else:
        reconstruction = sum(w * (target - (f[:, :m] @ p["W_dec"][:m] + base)).pow(2).sum(dim=1)
                             for m, w in zip(prefixes, weights))
    l0 = heaviside(z, p["threshold"], eps).sum(dim=1)
    penalty = l0 if target_l0 is None else (2.0 / target_l0) * (l0 - target_l0).pow(2)
    loss = (reconstruction + lam * penalty).mean()
    loss.backward()
    return float(loss.detach()), {k: v.grad for k, v in p.items()}


@pytest.mark.parametrize("options", [{}, {"target_l0": 25.0},
                                     {"matryoshka_prefixes": [30, 80], "matryoshka_weights": [2.0, 0.7]}])
def test_sparse_step_with_skip_connection_equals_reference(options):
    """Skip transcoder (Gemma Scope 2): x̂ = f W_dec + b_dec + x W_skip, compared with a float64 autograd
    reference (d_out ≠ d_in, no pre-encoder bias)."""
    bandwidth = 0.05
    tc = JumpReLUTranscoder(16, 80, norm_scale=4.0, d_out=12, dtype=torch.float64, seed=6, bandwidth=bandwidth)
    gen = torch.Generator().manual_seed(7)
    x_raw = torch.randn(250, 16, generator=gen, dtype=torch.float64) * 4
    y_raw = torch.randn(250, 12, generator=gen, dtype=torch.float64) * 2
    _spread(tc, x_raw, bandwidth, seed=8)
    assert min(_pairs(tc, x_raw, bandwidth).values()) >= 20
    W_skip = torch.randn(16, 12, generator=gen, dtype=torch.float64) * 0.3
    x, y = tc.normalize(x_raw), tc.normalize_target(y_raw)
    tensors = {n: getattr(tc, n).detach() for n in PARAMS}
    value, expected = _reference_step({**tensors, "W_skip": W_skip}, x, y, 0.2, bandwidth, False,
                                      target_l0=options.get("target_l0"),
                                      prefixes=options.get("matryoshka_prefixes"),
                                      weights=options.get("matryoshka_weights"))
    fast = sparse_training_step(params(tc, bandwidth, False, W_skip=W_skip), x, y, loss(0.2, **options))
    assert fast.loss == pytest.approx(value, rel=1e-10)
    assert set(fast.grads) == {*PARAMS, "W_skip"}
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fast.grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    without = sparse_training_step(params(tc, bandwidth, False), x, y, loss(0.2, **options))
    assert "W_skip" not in without.grads and abs(without.loss - fast.loss) > 1e-3


def test_quadratic_threshold_gradient_by_hand():
    """A float64 case worked out by hand: θ_i's gradient is Σ_b over window pairs of
    ``g_f,bi·(−θ_i/ε) − (λ/B)(1/ε)·(4/L0_t)(L0_b − L0_t)`` with ``g_f,bi = (2/B)(x̂_b − x_b)·W_dec[i]``."""
    eps, lam, target_l0, theta = 0.1, 0.7, 2.0, 1.0
    W_enc = torch.eye(5, 4, dtype=torch.float64)
    W_dec = torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.2, 0.0], [0.3, 0.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0, 0.4]], dtype=torch.float64)
    b_enc = torch.zeros(4, dtype=torch.float64)
    b_dec = torch.zeros(5, dtype=torch.float64)
    threshold = torch.full((4,), theta, dtype=torch.float64)
    # token 0: latents 0,1,2 active (1.5, 1.02 in the window above θ, 2.0), latent 3 at 0.97 (window below)
    #   → L0 = 3 > target; token 1: latent 1 at 0.99 (window below), others far below → L0 = 0 < target
    x = torch.tensor([[1.5, 1.02, 2.0, 0.97, 0.1], [0.2, 0.99, -1.0, 0.0, 0.3]], dtype=torch.float64)
    fast = sparse_training_step(params(tensors=(W_enc, b_enc, W_dec, b_dec, threshold), bandwidth=eps,
                                       apply_b_dec=False), x, None, loss(lam, target_l0=target_l0))
    B = 2
    f = [[1.5, 1.02, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    l0 = [3, 0]
    expected_theta = [0.0] * 4
    value = 0.0
    for b in range(B):
        x_hat = [sum(f[b][i] * float(W_dec[i, d]) for i in range(4)) for d in range(5)]
        residual = [x_hat[d] - float(x[b, d]) for d in range(5)]
        value += (sum(r * r for r in residual) + lam * (2.0 / target_l0) * (l0[b] - target_l0) ** 2) / B
        for i in range(4):
            z = float(x[b, i])
            if abs(z - theta) / eps < 0.5:
                g_f = sum(2.0 / B * residual[d] * float(W_dec[i, d]) for d in range(5))
                expected_theta[i] += g_f * (-theta / eps) - lam / B / eps * (4.0 / target_l0) * (l0[b] - target_l0)
    assert fast.loss == pytest.approx(value, rel=1e-12)
    assert fast.l0 == 1.5
    assert expected_theta[1] != 0 and expected_theta[3] != 0 and expected_theta[0] == 0
    torch.testing.assert_close(fast.grads["threshold"], torch.tensor(expected_theta, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_bad_loss_options_are_rejected():
    sae, x_raw = _spread_sae(torch.float64, True)
    with pytest.raises(ValueError, match="target_l0"):
        _fast(sae, x_raw, 0.3, 0.05, target_l0=0.0)
    with pytest.raises(ValueError, match="last matryoshka prefix"):
        _fast(sae, x_raw, 0.3, 0.05, matryoshka_prefixes=[10, 50])


# ---------------------------------------------------------------------- the speed tricks keep the results


@pytest.mark.parametrize("density", [0.0, 0.004, 0.05, 0.4, 1.0])
@pytest.mark.parametrize("length", [8 * 1000, 8 * 1000 + 3])
def test_flat_nonzero_matches_torch_nonzero(density, length):
    from saescope.train.fast_path import _flat_nonzero

    g = torch.Generator().manual_seed(int(density * 1000) + length)
    mask = torch.rand(length, generator=g) < density
    mask[8:16] = True                     # one word with eight true entries, and
    mask[40] = mask[47] = True            # one with its first and last byte
    mask[-1] = True
    expected = torch.nonzero(mask).squeeze(1)
    assert torch.equal(_flat_nonzero(mask), expected)
    assert torch.equal(_flat_nonzero(mask[8:]), torch.nonzero(mask[8:]).squeeze(1))   # a view at an offset


@pytest.mark.parametrize("density", [0.0, 0.002, 0.02, 0.5])
@pytest.mark.parametrize(("batch", "group"), [(64, 8), (67, 8), (5, 8), (64, 1)])
def test_candidates_equal_plain_compare(monkeypatch, density, batch, group):
    """The grouped candidate search finds exactly the entries of ``xw > lower``, in row-major order (groups
    of tokens, left-over rows, the dense fall-back)."""
    from saescope.train import fast_path
    from saescope.train.fast_path import _candidates

    g = torch.Generator().manual_seed(batch + group + int(density * 1000))
    xw = torch.randn(batch, 200, generator=g)
    lower = torch.quantile(xw, 1 - density, dim=0) if density else torch.full((200,), 100.0)
    lower = lower + 0.01 * torch.randn(200, generator=g)
    xw[::2, 7] = lower[7]                  # ties are not candidates (strict >)
    xw[1::3, 8] = torch.nextafter(lower[8], torch.tensor(float("inf")))
    expected = torch.nonzero((xw > lower).view(-1)).squeeze(1)
    assert density == 0.0 or len(expected) > 0
    assert torch.equal(_candidates(xw, lower, group), expected)
    monkeypatch.setattr(fast_path, "GROUPED_UP_TO", 1.0)     # never falls back to the plain compare
    assert torch.equal(_candidates(xw, lower, group), expected)


@pytest.mark.parametrize("group", [2, 7, 64])
@pytest.mark.parametrize("options", [{}, {"matryoshka_prefixes": [17, 50, 96], "target_l0": 30.0}])
def test_sparse_step_with_token_groups_equals_plain_search(monkeypatch, group, options):
    """The step is the same, bit for bit, whatever the token group of the candidate search."""
    from saescope.train import fast_path

    sae, x_raw = _spread_sae(torch.float32, True)
    options = {**options, "kernels": False}                  # the torch path's candidate search
    monkeypatch.setattr(fast_path, "TOKEN_GROUP", 1)
    plain = _fast(sae, x_raw, 0.3, 0.05, **options)
    monkeypatch.setattr(fast_path, "TOKEN_GROUP", group)
    monkeypatch.setattr(fast_path, "GROUPED_UP_TO", 1.0)     # grouped even at this test's density
    calls = []
    amax = torch.amax
    monkeypatch.setattr(torch, "amax", lambda *a, **k: calls.append(1) or amax(*a, **k))
    grouped = _fast(sae, x_raw, 0.3, 0.05, **options)
    assert calls                                             # the grouped search ran
    dense = dense_training_step(sae, x_raw, loss(0.3, **{k: v for k, v in options.items() if k != "kernels"}))
    _assert_same(grouped, dense, 1e-4, 2e-5)
    assert grouped.loss == plain.loss
    for name in PARAMS:
        assert torch.equal(grouped.grads[name], plain.grads[name]), name


def test_sparse_step_restores_the_thread_count():
    """The step runs its small ops on one thread; the caller's thread count is back afterwards, also after
    an error."""
    sae, x_raw = _spread_sae(torch.float64, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _fast(sae, x_raw, 0.3, 0.05)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            _fast(sae, x_raw, 0.3, 0.05, matryoshka_prefixes=[10, 50])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_latent_major_order_is_the_stable_sort_of_the_latents():
    """NumPy's sort of the unique key (CPU) and torch's argsort of it (the CUDA path) both give the order a
    stable sort of the latent indices gives."""
    from saescope.train.fast_path import _latent_major_order

    g = torch.Generator().manual_seed(11)
    B, d_sae = 50, 300
    flat = torch.nonzero((torch.rand(B, d_sae, generator=g) < 0.05).view(-1)).squeeze(1)
    rows, cols = flat // d_sae, flat % d_sae
    expected = torch.argsort(cols, stable=True)
    assert torch.equal(_latent_major_order(rows, cols, B), expected)
    assert torch.equal(torch.argsort(cols * B + rows), expected)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), TOLERANCES)
@pytest.mark.parametrize("target_l0", [None, 20.0])
def test_sparse_step_equals_dense_skip_transcoder(dtype, rtol, atol, target_l0):
    """The skip transcoder module (Gemma Scope 2) itself: its dense step (W_skip among the gradients) against
    the sparse step given its W_skip."""
    bandwidth = 0.05
    tc = JumpReLUTranscoder(16, 80, norm_scale=4.0, d_out=12, skip=True, dtype=dtype, seed=6, bandwidth=bandwidth)
    gen = torch.Generator().manual_seed(7)
    x_raw = torch.randn(250, 16, generator=gen, dtype=dtype) * 4
    y_raw = torch.randn(250, 12, generator=gen, dtype=dtype) * 2
    _spread(tc, x_raw, bandwidth, seed=8)
    with torch.no_grad():
        tc.W_skip.copy_(torch.randn(16, 12, generator=gen, dtype=torch.float64).to(dtype) * 0.3)
    assert min(_pairs(tc, x_raw, bandwidth).values()) >= 20
    dense = dense_training_step(tc, x_raw, loss(0.2, target_l0=target_l0), y_raw)
    assert set(dense.grads) == {*PARAMS, "W_skip"}
    fast = _fast(tc, x_raw, 0.2, bandwidth, y_raw, target_l0=target_l0, W_skip=tc.W_skip.detach())
    _assert_same(fast, dense, rtol, atol, names=(*PARAMS, "W_skip"))


# ---------------------------------------------------------------------- every loss option, one list


def test_loss_cases_cover_every_option():
    """tests/loss_cases.py exercises every field of LossOptions: a new option cannot skip the equivalence tests."""
    from dataclasses import fields

    from saescope.sae.losses import LossOptions
    from tests.loss_cases import LOSS_CASES

    covered = {key for case in LOSS_CASES.values() for key in case}
    missing = {f.name for f in fields(LossOptions)} - {"sparsity_coefficient"} - covered
    assert not missing, f"add a case for {sorted(missing)} to tests/loss_cases.py"


@pytest.mark.parametrize(("dtype", "rtol", "atol"), TOLERANCES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("case", list(__import__("tests.loss_cases", fromlist=["LOSS_CASES"]).LOSS_CASES))
def test_sparse_step_equals_dense_for_every_loss_case(dtype, rtol, atol, apply_b_dec, case):
    """The sparse step (compiled kernels and torch ops, by the autouse fixture) = the dense autograd step, for
    every case of tests/loss_cases.py (every LossOptions field)."""
    from tests.loss_cases import LOSS_CASES

    sae, x_raw = _spread_sae(dtype, apply_b_dec)
    options = LOSS_CASES[case]
    dense = dense_training_step(sae, x_raw, loss(0.31, **options))
    fast = _fast(sae, x_raw, 0.31, 0.05, **options)
    _assert_same(fast, dense, rtol, atol)
    if case != "plain":
        plain = _fast(sae, x_raw, 0.31, 0.05)
        assert abs(plain.loss - fast.loss) > 1e-3                    # the option changed the loss
