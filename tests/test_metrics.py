"""Evaluation metrics (Gemma Scope §4, App. C.2, C.3) against small independent float64 numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from saescope.evaluate import EvalBatch, MetricOptions, evaluate_saes
from saescope.evaluate.metrics import (
    LossAccumulator,
    ReconstructionAccumulator,
    UniformityAccumulator,
    density_summary,
    uniformity_per_token,
)
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sites import read_sites
from saescope.splice import run_with_splice


def _batches(seed: int = 0, n: int = 3, d: int = 6, d_sae: int = 10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows = 5 + 3 * i
        x = torch.randn(rows, d, generator=g) * 3 + 2  # a non-zero mean, as real activations have
        x_hat = x + 0.5 * torch.randn(rows, d, generator=g)
        f = torch.relu(torch.randn(rows, d_sae, generator=g) - 0.8)
        f[:, 0] = 0  # a dead latent
        f[:, 1] = 1.0  # a dense latent
        out.append((x, x_hat, f))
    return out


def test_reconstruction_metrics_match_numpy():
    batches = _batches()
    acc = ReconstructionAccumulator(d_sae=10)
    for x, x_hat, f in batches:
        acc.update(x, x_hat, f)
    r = acc.result()
    x = np.concatenate([b[0].numpy() for b in batches]).astype(np.float64)
    xh = np.concatenate([b[1].numpy() for b in batches]).astype(np.float64)
    f = np.concatenate([b[2].numpy() for b in batches]).astype(np.float64)
    n, _d = x.shape
    assert r["n_tokens"] == n
    assert r["l0"] == pytest.approx((f != 0).sum(axis=1).mean(), rel=1e-12)
    fvu = ((x - xh) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    assert r["fvu"] == pytest.approx(fvu, rel=1e-10)
    assert r["mse"] == pytest.approx(((x - xh) ** 2).mean(), rel=1e-10)
    cos = (x * xh).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(xh, axis=1)
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-10)
    freq = (f != 0).mean(axis=0)
    np.testing.assert_allclose(r["_frequencies"].numpy(), freq, rtol=1e-12)
    assert r["dead"] == int((freq == 0).sum()) >= 1
    assert r["dense"] == int((freq > 0.1).sum()) >= 1


def test_fvu_is_one_for_the_mean_and_zero_for_perfect():
    x = torch.randn(50, 4, dtype=torch.float64) + 10
    f = torch.ones(50, 3)
    perfect, mean = ReconstructionAccumulator(3), ReconstructionAccumulator(3)
    perfect.update(x, x.clone(), f)
    mean.update(x, x.mean(0, keepdim=True).expand_as(x), f)
    assert perfect.result()["fvu"] == 0
    assert mean.result()["fvu"] == pytest.approx(1.0, rel=1e-12)


def test_density_histogram_matches_numpy():
    freq = torch.tensor([0.0, 0.0, 1e-9, 1e-5, 3e-4, 0.05, 0.2, 0.9, 1.0], dtype=torch.float64)
    s = density_summary(freq, bins=8, low=-8.0)
    assert (s["dead"], s["dense"]) == (2, 3)
    alive = freq[freq > 0].numpy()
    counts, _ = np.histogram(np.clip(np.log10(alive), -8, 0), bins=8, range=(-8, 0))
    assert s["log10_frequency_histogram"]["counts"] == counts.tolist()
    assert sum(s["log10_frequency_histogram"]["counts"]) == 7


def test_delta_loss_loss_recovered_and_by_position_match_numpy():
    g = torch.Generator().manual_seed(1)
    acc = LossAccumulator()
    parts = []
    for _ in range(3):
        clean = torch.rand(4, 9, generator=g) + 2
        spliced = clean + torch.rand(4, 9, generator=g) * 0.3
        zero = clean + 2 + torch.rand(4, 9, generator=g)
        counted = torch.rand(4, 9, generator=g) > 0.2
        counted[:, 0] = False  # e.g. the BOS position
        acc.update(clean, spliced, counted, zero)
        parts.append((clean, spliced, zero, counted))
    r = acc.result(position_bins=9)
    c = np.concatenate([p[0].numpy() for p in parts]).astype(np.float64)
    s = np.concatenate([p[1].numpy() for p in parts]).astype(np.float64)
    z = np.concatenate([p[2].numpy() for p in parts]).astype(np.float64)
    m = np.concatenate([p[3].numpy() for p in parts])
    assert r["clean_loss"] == pytest.approx(c[m].mean(), rel=1e-10)
    assert r["delta_loss"] == pytest.approx(s[m].mean() - c[m].mean(), rel=1e-8)
    assert r["loss_recovered"] == pytest.approx((z[m].mean() - s[m].mean()) / (z[m].mean() - c[m].mean()),
                                                rel=1e-8)
    by_pos = r["delta_loss_by_position"]
    assert 0 not in by_pos["start"]  # no counted token at position 0
    for start, delta in zip(by_pos["start"], by_pos["delta_loss"]):
        col = m[:, start]
        assert delta == pytest.approx((s[col, start] - c[col, start]).mean(), rel=1e-8)
    grouped = acc.result(position_bins=3)["delta_loss_by_position"]
    assert grouped["start"] == [0, 3, 6] or grouped["start"] == [1, 3, 6]
    sl = slice(3, 6)
    assert grouped["delta_loss"][1] == pytest.approx((s[:, sl][m[:, sl]] - c[:, sl][m[:, sl]]).mean(), rel=1e-8)


def _r_l0_numpy(y: np.ndarray) -> float:
    a = np.abs(y[y != 0]).astype(np.float64)
    p = a / a.sum()
    entropy = -(p * np.log(p)).sum()
    return math.exp(entropy) / a.size


def test_uniformity_matches_numpy_and_bounds():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(20, 30, generator=g) * (torch.rand(20, 30, generator=g) > 0.7)
    y[0] = 0  # no active latent: undefined, skipped
    y[1] = 0
    y[1, 3] = -2.5  # one active latent: r = 1
    y[2] = 0
    y[2, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # equal importance: r = 1
    r, count, valid = uniformity_per_token(y)
    assert not bool(valid[0]) and math.isnan(float(r[0]))
    assert float(r[1]) == pytest.approx(1.0) and float(r[2]) == pytest.approx(1.0)
    for i in range(1, 20):
        assert float(r[i]) == pytest.approx(_r_l0_numpy(y[i].numpy()), rel=1e-10)
        assert 1 / int(count[i]) - 1e-12 <= float(r[i]) <= 1 + 1e-12
    acc = UniformityAccumulator()
    acc.update(y[:7])
    acc.update(y[7:])
    expected = np.mean([_r_l0_numpy(y[i].numpy()) for i in range(1, 20)])
    assert acc.result()["r_l0"] == pytest.approx(expected, rel=1e-10)
    assert acc.result()["uniformity_tokens"] == 19
    skewed = torch.tensor([[100.0, 1.0, 1.0, 1.0]])
    assert float(uniformity_per_token(skewed)[0][0]) < 0.5  # one latent dominates


# ------------------------------------------------------------------------------------ the whole suite evaluation
def _tiny_gemma3():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=6, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=20.0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _sae(d_in: int, site: str, layer: int, seed: int, threshold: float) -> JumpReLUSAE:
    sae = JumpReLUSAE(d_in, 48, seed=seed)
    sae.config.site, sae.config.layer = site, layer
    with torch.no_grad():
        sae.threshold.fill_(threshold)
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def test_evaluate_saes_matches_an_independent_computation():
    """L0, FVU and Δ loss from the suite evaluator (shared clean pass, layer-cached splice) equal the same
    numbers computed per SAE with read_sites + numpy and run_with_splice from the embeddings."""
    model = _tiny_gemma3()
    saes = {"res": _sae(32, "resid_post", 1, 0, 0.2), "attn": _sae(32, "attn_out", 2, 1, 0.1),
            "res_sparse": _sae(32, "resid_post", 1, 2, 0.6)}
    g = torch.Generator().manual_seed(3)
    batches = []
    for i in range(3):
        ids = torch.randint(0, 211, (2, 16), generator=g)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False  # BOS
        mask[1, 9] = False  # an EOS inside the window
        batches.append(EvalBatch("python" if i == 1 else "shakespeare", ids, mask))
    results = {r["name"]: r for r in evaluate_saes(model, saes, batches, MetricOptions(uniformity_tokens=0),
                                                   progress=False, token_chunk=5)}
    for name, sae in saes.items():
        site = f"{sae.config.site}/layer_{sae.config.layer}"
        xs, xhs, fs, clean, spliced = [], [], [], [], []
        for b in batches:
            x = read_sites(model, b.input_ids, [site])[site]
            with torch.no_grad():
                f = sae.encode(x[b.mask])
                xs.append(x[b.mask].double().numpy())
                fs.append(f.double().numpy())
                xhs.append(sae.decode(f).double().numpy())
            counted = b.mask[:, :-1].numpy()
            c = run_with_splice(model, b.input_ids, None, None).loss_per_token.double().numpy()
            s = run_with_splice(model, b.input_ids, site, sae.forward, splice_mask=b.mask).loss_per_token
            clean.append(c[counted])
            spliced.append(s.double().numpy()[counted])
        x, xh, f = np.concatenate(xs), np.concatenate(xhs), np.concatenate(fs)
        m = results[name]["metrics"]
        assert m["l0"] == pytest.approx((f != 0).sum(1).mean(), rel=1e-9)
        assert m["fvu"] == pytest.approx(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
        delta = np.concatenate(spliced).mean() - np.concatenate(clean).mean()
        assert m["delta_loss"] == pytest.approx(delta, abs=1e-5)
        assert abs(m["delta_loss"]) > 1e-4  # the splice changed something
        dom = results[name]["domains"]
        assert set(dom) == {"python", "shakespeare"}
        assert dom["python"]["n_tokens"] == int(batches[1].mask.sum())
        assert dom["python"]["delta_loss"] == pytest.approx(spliced[1].mean() - clean[1].mean(), abs=1e-5)
    assert results["res_sparse"]["metrics"]["l0"] < results["res"]["metrics"]["l0"]


def test_suite_uniformity_matches_a_full_model_autograd_computation():
    """App. C.3 through the whole evaluator: y = f ⊙ (W_dec ∇ₓ𝓛) with ∇ₓ𝓛 from autograd on the full model
    (hooked site, full logits), r_L0 = exp(S(p))/‖y‖₀ per token in numpy, averaged over tokens."""
    from saescope.sites import hooked

    model = _tiny_gemma3()
    sae = _sae(32, "mlp_out", 2, 4, 0.05)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 211, (2, 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    result = evaluate_saes(model, {"s": sae}, [EvalBatch("d", ids, mask)], MetricOptions(uniformity_tokens=1000),
                           progress=False)[0]["metrics"]
    site = "mlp_out/layer_2"
    x = read_sites(model, ids, [site])[site]
    leaf = x.clone().requires_grad_(True)
    with hooked(model, [(site, lambda _a: leaf)]), torch.enable_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].double()
        metric = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.mean(-1)
        (metric * mask[:, :-1]).sum().backward()
    take = torch.zeros_like(mask)
    take[:, :-1] = mask[:, :-1]
    with torch.no_grad():
        f = sae.encode(x[take]).double().numpy()
    grad = leaf.grad[take].double().numpy()
    y = f * (grad @ sae.W_dec.detach().double().numpy().T)
    rs = [_r_l0_numpy(row) for row in y if np.any(row != 0)]
    assert len(rs) > 5
    assert result["uniformity_tokens"] == len(rs)
    assert result["r_l0"] == pytest.approx(np.mean(rs), rel=1e-4)
