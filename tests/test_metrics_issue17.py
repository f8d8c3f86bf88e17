"""Issue 17's evaluation metrics against independent float64 numpy references: dense latents' share of L0,
FVU along the top principal directions and on the rest, and the paired bootstrap interval of Δ LM loss."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from saescope.evaluate.metrics import (
    LossAccumulator,
    ReconstructionAccumulator,
    bootstrap_delta_loss,
    density_summary,
)


def _anisotropic(seed: int, rows: int, d: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets with one dominant direction (as Gemma 3's resid_post), an offset mean, and a reconstruction
    whose error is small along that direction and larger elsewhere."""
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([30.0] + [1.0 + 0.3 * i for i in range(d - 1)], dtype=torch.float64)
    z = torch.randn(rows, d, generator=g, dtype=torch.float64) * scales
    x = z @ basis.T + 5.0
    err = torch.randn(rows, d, generator=g, dtype=torch.float64) * torch.tensor([0.2] + [0.7] * (d - 1),
                                                                             dtype=torch.float64)
    x_hat = x - err @ basis.T
    f = torch.relu(torch.randn(rows, 12, generator=g))
    return x.float(), x_hat.float(), f


def _principal_numpy(x: np.ndarray, x_hat: np.ndarray, k: int) -> tuple[float, float, float]:
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / x.shape[0]
    w, v = np.linalg.eigh(cov)
    u = v[:, np.argsort(w)[::-1][:k]]
    p_top = u @ u.T
    p_rest = np.eye(x.shape[1]) - p_top
    e = x - x_hat
    fvu_top = (np.linalg.norm(e @ p_top, axis=1) ** 2).sum() / (np.linalg.norm(xc @ p_top, axis=1) ** 2).sum()
    fvu_rest = (np.linalg.norm(e @ p_rest, axis=1) ** 2).sum() / (np.linalg.norm(xc @ p_rest, axis=1) ** 2).sum()
    share = (np.linalg.norm(xc @ p_top, axis=1) ** 2).sum() / (xc ** 2).sum()
    return fvu_top, fvu_rest, share


@pytest.mark.parametrize("k", [1, 2])
def test_principal_fvu_matches_numpy_projectors(k):
    parts = [_anisotropic(seed, rows) for seed, rows in ((0, 40), (1, 25), (2, 61))]
    acc = ReconstructionAccumulator(d_sae=12, principal_directions=k)
    for x, x_hat, f in parts:
        acc.update(x, x_hat, f)
    r = acc.result()
    x = np.concatenate([p[0].numpy() for p in parts]).astype(np.float64)
    xh = np.concatenate([p[1].numpy() for p in parts]).astype(np.float64)
    top, rest, share = _principal_numpy(x, xh, k)
    assert r["principal_directions"] == k
    assert r["fvu_top"] == pytest.approx(top, rel=1e-9)
    assert r["fvu_rest"] == pytest.approx(rest, rel=1e-9)
    assert r["top_variance_share"] == pytest.approx(share, rel=1e-9)
    # FVU is the variance-weighted mean of the two parts, and the split is not trivial here
    assert r["fvu"] == pytest.approx(share * top + (1 - share) * rest, rel=1e-9)
    assert share > 0.8 and rest > 5 * top


def test_principal_fvu_of_the_mean_is_one_and_can_be_turned_off():
    x, _, f = _anisotropic(3, 80)
    acc = ReconstructionAccumulator(d_sae=12)
    acc.update(x, x.double().mean(0, keepdim=True).expand_as(x).float(), f)
    r = acc.result()
    assert r["fvu_top"] == pytest.approx(1.0, rel=1e-6) and r["fvu_rest"] == pytest.approx(1.0, rel=1e-6)
    off = ReconstructionAccumulator(d_sae=12, principal_directions=0)
    off.update(x, x, f)
    assert "fvu_top" not in off.result() and off.sum_xxT is None


def test_dense_share_of_l0_matches_numpy():
    g = torch.Generator().manual_seed(4)
    f = torch.relu(torch.randn(500, 20, generator=g) - 1.5)
    f[:, 0] = 0                                      # dead
    f[:, 1] = 1.0                                    # fires always
    f[:, 2] = (torch.rand(500, generator=g) < 0.3).float()  # dense (~30%)
    f[:, 3] = (torch.arange(500) < 50).float()       # exactly 10%: not dense (the rule is > 10%)
    acc = ReconstructionAccumulator(d_sae=20, principal_directions=0)
    x = torch.randn(500, 3, generator=g)
    acc.update(x, x, f)
    r = acc.result()
    fn = f.numpy().astype(np.float64)
    freq = (fn != 0).mean(axis=0)
    l0 = (fn != 0).sum(axis=1).mean()
    dense = freq > 0.1
    assert r["dense"] == int(dense.sum()) and not dense[3]
    assert r["dense_l0_share"] == pytest.approx(freq[dense].sum() / l0, rel=1e-12)
    assert r["dead"] == int((freq == 0).sum())
    assert 0 < r["dense_l0_share"] < 1
    assert math.isnan(density_summary(torch.zeros(5, dtype=torch.float64))["dense_l0_share"])


def _bootstrap_numpy(deltas_sum, counts, n_boot, confidence, seed, block=256):
    """A loop over replicates with the same generator draws (the second implementation)."""
    rng = np.random.default_rng(seed)
    w = len(counts)
    reps = []
    done = 0
    while done < n_boot:
        idx = rng.integers(0, w, size=(min(block, n_boot - done), w))
        for row in idx:
            reps.append(sum(deltas_sum[i] for i in row) / sum(counts[i] for i in row))
        done += idx.shape[0]
    alpha = (1 - confidence) / 2
    return np.percentile(reps, 100 * alpha), np.percentile(reps, 100 * (1 - alpha))


def test_bootstrap_matches_a_loop_reference():
    g = np.random.default_rng(5)
    counts = g.integers(50, 100, size=13)
    clean = g.normal(3.0, 0.5, size=13) * counts
    spliced = clean + g.normal(0.8, 0.2, size=13) * counts
    ci = bootstrap_delta_loss(clean.tolist(), spliced.tolist(), counts.tolist(), n_boot=700, confidence=0.9,
                              seed=11)
    lo, hi = _bootstrap_numpy((spliced - clean).tolist(), counts.tolist(), 700, 0.9, 11)
    assert ci["lower"] == pytest.approx(lo, rel=1e-12) and ci["upper"] == pytest.approx(hi, rel=1e-12)
    assert ci["mean"] == pytest.approx((spliced - clean).sum() / counts.sum(), rel=1e-12)
    assert (ci["n_windows"], ci["n_tokens"], ci["n_boot"]) == (13, int(counts.sum()), 700)
    again = bootstrap_delta_loss(clean.tolist(), spliced.tolist(), counts.tolist(), n_boot=700, confidence=0.9,
                                 seed=11)
    assert again == ci  # seeded: reproducible


def test_bootstrap_interval_matches_the_normal_closed_form():
    """Equal windows with i.i.d. normal Δ: the percentile interval → mean ± z σ̂/√W (plug-in σ̂)."""
    g = np.random.default_rng(6)
    w = 400
    delta = g.normal(1.2, 0.4, size=w)
    counts = np.full(w, 256)
    clean = g.normal(3.0, 1.0, size=w) * counts
    spliced = clean + delta * counts
    ci = bootstrap_delta_loss(clean, spliced, counts, n_boot=20000, confidence=0.95, seed=0)
    z = NormalDist().inv_cdf(0.975)
    half = z * delta.std(ddof=0) / math.sqrt(w)
    assert ci["mean"] == pytest.approx(delta.mean(), rel=1e-12)
    assert ci["upper"] - ci["lower"] == pytest.approx(2 * half, rel=0.05)
    assert (ci["lower"] + ci["upper"]) / 2 == pytest.approx(delta.mean(), abs=0.05 * half)


def test_bootstrap_is_paired():
    """Windows whose clean losses differ wildly but whose spliced loss is the clean one + 0.5 per token:
    a paired interval is [0.5, 0.5]; resampling clean and spliced apart would give a wide one."""
    g = np.random.default_rng(7)
    counts = g.integers(100, 200, size=30).astype(float)
    clean = g.uniform(1.0, 9.0, size=30) * counts
    spliced = clean + 0.5 * counts
    ci = bootstrap_delta_loss(clean, spliced, counts, n_boot=500, seed=1)
    assert ci["lower"] == pytest.approx(0.5, abs=1e-12) and ci["upper"] == pytest.approx(0.5, abs=1e-12)
    rng = np.random.default_rng(1)   # what unpaired resampling would say
    unpaired = [spliced[rng.integers(0, 30, 30)].sum() / counts.sum() - clean[rng.integers(0, 30, 30)].sum()
                / counts.sum() for _ in range(500)]
    assert np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5) > 0.5


def test_loss_accumulator_keeps_windows_and_their_interval():
    g = torch.Generator().manual_seed(8)
    acc = LossAccumulator()
    rows = []
    for _ in range(3):
        clean = torch.rand(4, 9, generator=g) + 2
        spliced = clean + torch.rand(4, 9, generator=g)
        counted = torch.rand(4, 9, generator=g) > 0.3
        counted[0] = False  # a window with nothing counted is left out
        acc.update(clean, spliced, counted)
        for b in range(4):
            m = counted[b].numpy()
            if m.any():
                rows.append((int(m.sum()), float(clean[b].numpy()[m].astype(np.float64).sum()),
                             float(spliced[b].numpy()[m].astype(np.float64).sum())))
    r = acc.result(n_boot=300, confidence=0.8, seed=3)
    n, c, s = (np.array(v) for v in zip(*rows))
    assert r["delta_loss_ci"]["n_windows"] == len(rows) == 9
    np.testing.assert_allclose(r["delta_loss_windows"]["delta_loss"], (s - c) / n, rtol=1e-9)
    lo, hi = _bootstrap_numpy((s - c).tolist(), n.tolist(), 300, 0.8, 3)
    assert r["delta_loss_ci"]["lower"] == pytest.approx(lo, rel=1e-9)
    assert r["delta_loss_ci"]["upper"] == pytest.approx(hi, rel=1e-9)
    assert r["delta_loss_ci"]["mean"] == pytest.approx(r["delta_loss"], rel=1e-9)


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ValueError, match="one clean sum"):
        bootstrap_delta_loss([1.0], [1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_delta_loss([1.0], [2.0], [1], confidence=1.5)


def test_loss_recovered_uses_exactly_the_zero_ablated_tokens():
    g = torch.Generator().manual_seed(9)
    acc = LossAccumulator()
    c_all, s_all, m_all, zs = [], [], [], []
    for i in range(4):
        clean = torch.rand(3, 8, generator=g) + 2
        spliced = clean + torch.rand(3, 8, generator=g) * (1 + i)   # later batches worse: a subset differs
        zero = clean + 10 + torch.rand(3, 8, generator=g)
        counted = torch.rand(3, 8, generator=g) > 0.2
        acc.update(clean, spliced, counted, zero if i < 2 else None)
        c_all.append(clean.numpy()), s_all.append(spliced.numpy()), m_all.append(counted.numpy())
        if i < 2:
            zs.append(zero.numpy())
    r = acc.result(n_boot=10)
    c, s, m = (np.concatenate(v).astype(np.float64) for v in (c_all, s_all, m_all))
    m = m.astype(bool)
    sub = np.zeros_like(m)
    sub[:6] = m[:6]
    z = np.concatenate(zs).astype(np.float64)
    zl, cl, sl = z[m[:6]].mean(), c[sub].mean(), s[sub].mean()
    assert r["zero_ablation_tokens"] == int(sub.sum())
    assert r["zero_ablation_loss"] == pytest.approx(zl, rel=1e-9)
    assert r["loss_recovered"] == pytest.approx((zl - sl) / (zl - cl), rel=1e-9)
    assert r["delta_loss"] == pytest.approx(s[m].mean() - c[m].mean(), rel=1e-9)  # Δ loss: every token


def test_suite_reports_windows_interval_principal_fvu_and_dense_share():
    """Through evaluate_saes on a tiny Gemma 3: per-window Δ loss equals run_with_splice row by row, the
    interval is the bootstrap of those windows, fvu_top/fvu_rest equal numpy projectors on the site's
    activations, dense share comes from the firing frequencies, zero-ablation stops at its token cap."""
    from test_metrics import _sae, _tiny_gemma3

    from saescope.evaluate import EvalBatch, MetricOptions, evaluate_saes
    from saescope.sites import read_sites
    from saescope.splice import run_with_splice

    model = _tiny_gemma3()
    sae = _sae(32, "resid_post", 1, 0, 0.05)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 211, (2, 12), generator=g)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False
        batches.append(EvalBatch("shakespeare", ids, mask))
    options = MetricOptions(uniformity_tokens=0, bootstrap_samples=400, confidence=0.9, bootstrap_seed=2,
                            zero_ablation_tokens=25)
    (r,) = evaluate_saes(model, {"res": sae}, batches, options, progress=False)
    m = r["metrics"]
    site = "resid_post/layer_1"
    n_w, c_w, s_w, xs, xhs, fs = [], [], [], [], [], []
    for b in batches:
        c = run_with_splice(model, b.input_ids, None, None).loss_per_token.double().numpy()
        s = run_with_splice(model, b.input_ids, site, sae.forward, splice_mask=b.mask).loss_per_token
        s = s.double().numpy()
        counted = b.mask[:, :-1].numpy()
        for row in range(2):
            n_w.append(int(counted[row].sum()))
            c_w.append(c[row][counted[row]].sum())
            s_w.append(s[row][counted[row]].sum())
        x = read_sites(model, b.input_ids, [site])[site][b.mask]
        with torch.no_grad():
            f = sae.encode(x)
            xs.append(x.double().numpy()), fs.append(f.double().numpy()), xhs.append(sae.decode(f).double().numpy())
    n_w, c_w, s_w = np.array(n_w), np.array(c_w), np.array(s_w)
    np.testing.assert_allclose(m["delta_loss_windows"]["delta_loss"], (s_w - c_w) / n_w, atol=1e-5)
    assert m["delta_loss_windows"]["n_tokens"] == n_w.tolist()
    lo, hi = _bootstrap_numpy((s_w - c_w).tolist(), n_w.tolist(), 400, 0.9, 2)
    ci = m["delta_loss_ci"]
    assert (ci["n_windows"], ci["n_tokens"], ci["confidence"]) == (6, int(n_w.sum()), 0.9)
    assert ci["lower"] == pytest.approx(lo, abs=1e-5) and ci["upper"] == pytest.approx(hi, abs=1e-5)
    assert ci["lower"] < m["delta_loss"] < ci["upper"]
    x, xh, f = np.concatenate(xs), np.concatenate(xhs), np.concatenate(fs)
    top, rest, share = _principal_numpy(x, xh, 1)
    assert m["fvu_top"] == pytest.approx(top, rel=1e-4) and m["fvu_rest"] == pytest.approx(rest, rel=1e-4)
    assert m["top_variance_share"] == pytest.approx(share, rel=1e-6)
    freq = (f != 0).mean(0)
    assert m["dense"] == int((freq > 0.1).sum()) > 0
    assert m["dense_l0_share"] == pytest.approx(freq[freq > 0.1].sum() / (f != 0).sum(1).mean(), rel=1e-9)
    assert m["zero_ablation_tokens"] == 2 * 20  # 20 counted tokens a batch: the second batch crosses 25
