"""TopK and BatchTopK baselines (issue 17): their latents against NumPy references, their gradients against
finite differences, their training in the same run as JumpReLU SAEs, and their files (native, SAELens; BatchTopK
as a JumpReLU with its inference threshold in every format)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saescope.formats import load_sae
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.topk import TopKSAE, batch_topk_latents, topk_latents, update_batch_topk_threshold
from saescope.train import SAESpec
from tests.train_helpers import run_trainer, small_config

SITE = "resid_post/layer_1"


def test_topk_latents_equal_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 40, generator=g, dtype=torch.float64)
    z[:3, :37] = -1.0                          # rows with fewer than k positive entries (3)
    z[:3, 37:] = z[:3, 37:].abs() + 0.1
    k = 5
    f = topk_latents(z, k).numpy()
    zn = z.numpy()
    for b in range(len(zn)):
        keep = np.argsort(-zn[b], kind="stable")[:k]
        expected = np.zeros_like(zn[b])
        expected[keep] = np.maximum(zn[b, keep], 0)
        np.testing.assert_array_equal(f[b], expected)
    assert ((f != 0).sum(axis=1) <= k).all() and (f[:3] != 0).sum() == 9


def test_batch_topk_keeps_the_batch_largest_and_reports_the_smallest_kept():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(30, 20, generator=g, dtype=torch.float64)
    k = 4
    f, kept_min = batch_topk_latents(z, k)
    flat = z.numpy().ravel()
    order = np.argsort(-flat, kind="stable")[:k * 30]
    expected = np.zeros_like(flat)
    expected[order] = np.maximum(flat[order], 0)
    np.testing.assert_array_equal(f.numpy().ravel(), expected)
    assert kept_min == pytest.approx(float(flat[order][flat[order] > 0].min()), rel=0, abs=0)
    assert (f != 0).sum() == k * 30 and len(set((f != 0).sum(dim=1).tolist())) > 1   # per-token L0 varies


def test_batch_topk_threshold_is_a_moving_average():
    sae = JumpReLUSAE(4, 6, dtype=torch.float64, seed=0)
    update_batch_topk_threshold(sae, 2.0, first=True)
    update_batch_topk_threshold(sae, 1.0, first=False, decay=0.9)
    update_batch_topk_threshold(sae, None, first=False, decay=0.9)          # nothing kept: unchanged
    torch.testing.assert_close(sae.threshold.detach(), torch.full((6,), 0.9 * 2.0 + 0.1 * 1.0, dtype=torch.float64))


def test_topk_gradients_equal_finite_differences():
    """With the selection fixed by a small perturbation's margin, the loss is smooth in every parameter:
    central differences of mean_b ‖x − x̂‖² (float64) equal autograd's gradient."""
    g = torch.Generator().manual_seed(2)
    sae = TopKSAE(8, 24, norm_scale=2.0, k=3, dtype=torch.float64, seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 0.1)
        sae.b_enc.copy_(torch.randn(24, generator=g, dtype=torch.float64) * 0.1)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64) * 2
    sae.training_forward(x).loss.backward()
    z = sae.pre_activations(x).detach()
    top = z.topk(4, dim=1).values
    assert float((top[:, 2] - top[:, 3]).min()) > 1e-4 and float(top[:, 2].min()) > 1e-4   # clear selection
    h = 1e-6
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        p = getattr(sae, name)
        flat = p.detach().view(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:6].tolist():
            with torch.no_grad():
                old = float(flat[i])
                flat[i] = old + h
                up = float(sae.training_forward(x).loss)
                flat[i] = old - h
                down = float(sae.training_forward(x).loss)
                flat[i] = old
            assert float(p.grad.view(-1)[i]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9), (name, i)


def _acts(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=g)
    codes = torch.rand(n, 64, generator=g).pow(8)            # sparse-ish non-negative codes
    return {SITE: codes @ basis + 0.05 * torch.randn(n, d, generator=g)}


def test_topk_and_batchtopk_train_beside_jumprelu_and_save(tmp_path):
    acts = _acts()
    specs = [SAESpec(site=SITE, width=48, target_l0=6), SAESpec(site=SITE, width=48, architecture="topk", k=6),
             SAESpec(site=SITE, width=48, architecture="batchtopk", k=6)]
    trainer = run_trainer(small_config(tmp_path / "run", specs, total_steps=40), acts)
    folders = trainer.write_suite()
    units = {u.spec.architecture: u for u in trainer.units}
    x = acts[SITE][:512]
    first_fvu = None
    for arch in ("topk", "batchtopk"):
        m = units[arch].module
        assert units[arch].adam.params.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}     # θ is not trained
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        mine = [r for r in rows if r["sae"] == units[arch].spec.name]
        assert mine[-1]["fvu"] < mine[0]["fvu"]                   # it learned
        first_fvu = first_fvu or mine[0]["fvu"]
        loaded = load_sae(folders[units[arch].spec.name])
        assert loaded.config.training["architecture"] == arch and loaded.config.training["k"] == 6
        l0 = (loaded.encode(x) != 0).sum(dim=1).double()
        if arch == "topk":
            assert isinstance(loaded, TopKSAE) and loaded.k == 6 and float(l0.max()) <= 6
            torch.testing.assert_close(loaded.encode(x), m.standardize().encode(x), rtol=1e-5, atol=1e-5)
        else:       # a JumpReLU at inference: one threshold for every latent, mean L0 near k
            assert type(loaded) is JumpReLUSAE and loaded.config.architecture == "jumprelu"
            theta = loaded.threshold.detach()
            assert float(theta.std()) == 0 and float(theta[0]) > 0
            assert 2 < float(l0.mean()) < 18
    with pytest.raises(ValueError, match="JumpReLU SAEs only"):
        units["topk"].module.save(tmp_path / "gs", format="gemma-scope")
    units["batchtopk"].module.standardize().save(tmp_path / "gs", format="gemma-scope")   # a JumpReLU: fine


def test_topk_saelens_files_have_k_and_no_threshold(tmp_path):
    sae = TopKSAE(8, 24, norm_scale=3.0, k=4, dtype=torch.float32, seed=1, site="resid_post", layer=1)
    folder = sae.save(tmp_path / "sl", format="saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    from safetensors.torch import load_file

    assert set(load_file(str(folder / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    back = load_sae(folder)
    x = torch.randn(10, 8) * 3
    assert isinstance(back, TopKSAE) and back.k == 4
    torch.testing.assert_close(back.encode(x) / 3.0, sae.encode(x), rtol=1e-5, atol=1e-5)   # latents × C
    torch.testing.assert_close(back.decode(back.encode(x)), sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-4)
    native = load_sae(sae.save(tmp_path / "n"))
    torch.testing.assert_close(native.encode(x), sae.encode(x), rtol=0, atol=0)


def test_baseline_specs_are_validated():
    with pytest.raises(ValueError, match="needs k"):
        SAESpec(site=SITE, width=48, architecture="topk")
    with pytest.raises(ValueError, match="no sparsity penalty"):
        SAESpec(site=SITE, width=48, architecture="topk", k=4, target_l0=4)
    with pytest.raises(ValueError, match="k is for architecture"):
        SAESpec(site=SITE, width=48, sparsity_coefficient=1e-3, k=4)
    spec = SAESpec(site=SITE, width=48, architecture="batchtopk", k=4)
    assert spec.name.endswith("width_48/batchtopk_4") and spec.frequency_penalty == 0.0
    assert "architecture" not in SAESpec(site=SITE, width=48, sparsity_coefficient=1e-3).fingerprint_dict()
