"""The compiled CPU kernels of the sparse step (saescope/train/sparse_kernels.cpp) against independent references:
the dense autograd step (float64), torch's compare + nonzero, torch's decoder-gradient projection, and
themselves on other thread counts (bit for bit). tests/test_fast_path.py runs its whole file on both paths too.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import fast_path, sparse_kernels
from saescope.train.decoder_norm import project_out_parallel_gradient
from saescope.train.fast_path import dense_training_step, sparse_training_step
from tests.loss_cases import PARAMS, loss, params
from tests.threshold_margins import clear_decision_edges

pytestmark = pytest.mark.skipif(sparse_kernels.load() is None, reason="no C++ compiler: the kernels cannot be built")


@pytest.fixture
def compiled_only(monkeypatch):
    """Make the torch path fail, so a passing test has run on the compiled kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch path ran; the compiled kernels should have taken this step")
    monkeypatch.setattr(fast_path, "_sparse_step", refuse)


def _module(dtype, apply_b_dec=True, transcoder=False, skip=False, seed=3, d_in=40, d_sae=300, batch=257):
    """A module with thresholds at a per-latent quantile (about 1 in 12 tokens active) and some pre-activations
    planted just inside the window on both sides, and its raw input (and target)."""
    bandwidth = 0.05
    g = torch.Generator().manual_seed(seed)
    if transcoder:
        module = JumpReLUTranscoder(d_in, d_sae, norm_scale=2.0, d_out=24, skip=skip, dtype=dtype, seed=seed,
                                    bandwidth=bandwidth)
        y = torch.randn(batch, 24, generator=g, dtype=torch.float64).to(dtype)
    else:
        module = JumpReLUSAE(d_in, d_sae, norm_scale=2.0, dtype=dtype, seed=seed, bandwidth=bandwidth,
                             apply_b_dec_to_input=apply_b_dec)
        y = None
    x = (torch.randn(batch, d_in, generator=g, dtype=torch.float64) * 2).to(dtype)
    with torch.no_grad():
        module.b_enc.copy_((torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.1).to(dtype))
        module.b_dec.copy_((torch.randn(module.b_dec.shape[0], generator=g, dtype=torch.float64) * 0.1).to(dtype))
        if skip:
            module.W_skip.copy_((torch.randn(d_in, 24, generator=g, dtype=torch.float64) * 0.2).to(dtype))
        z = module.pre_activations(x).to(torch.float64)
        module.threshold.copy_(torch.quantile(z, 11 / 12, dim=0).clamp_min(0.05).to(dtype))
        z = module.pre_activations(x)
        for i in range(0, d_sae, 4):
            side = 0.25 if i % 8 else -0.25
            module.b_enc[i] += (module.threshold[i] + side * bandwidth - z[i % batch, i]).to(dtype)
    clear_decision_edges(module, x, bandwidth)      # `fired` and the window agree on every CPU
    return module, x, y


RUNTIME = ("kernels", "project_decoder_gradient", "reuse_gradient_buffers", "reduce_counts")


def _step(module, x_raw, y_raw, lam=0.3, **options):
    x = module.normalize(x_raw)
    y = module.normalize_target(y_raw) if y_raw is not None else None
    runtime = {k: options.pop(k) for k in RUNTIME if k in options}
    return sparse_training_step(params(module), x, y, loss(lam, **options), **runtime)


def _assert_same(fast, dense, rtol, atol, names):
    assert fast.loss == pytest.approx(dense.loss, rel=rtol)
    assert fast.l0 == pytest.approx(dense.l0, rel=1e-12)
    assert fast.reconstruction == pytest.approx(dense.reconstruction, rel=rtol)
    assert fast.total_variance == pytest.approx(dense.total_variance, rel=rtol)
    assert torch.equal(fast.fired, dense.fired)
    for name in names:
        torch.testing.assert_close(fast.grads[name], dense.grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-13), (torch.float32, 2e-4, 2e-6)])
@pytest.mark.parametrize("case", ["sae", "sae_no_pre_bias", "sae_target_l0", "transcoder", "skip_transcoder",
                                  "matryoshka", "matryoshka_target_l0_no_pre_bias"])
def test_compiled_step_equals_dense_autograd(compiled_only, dtype, rtol, atol, case):
    """Every option of the step (recipe §1 and Gemma Scope 2's, recipe §6) on the kernels = autograd."""
    module, x, y = _module(dtype, apply_b_dec="no_pre_bias" not in case, transcoder="transcoder" in case,
                           skip="skip_transcoder" in case)
    options = {"target_l0": 20.0} if case in ("sae_target_l0", "skip_transcoder") else {}
    if case == "matryoshka":           # blocks of 7, 33, 110 and 150 latents, unequal weights
        options = {"matryoshka_prefixes": [7, 40, 150, 300], "matryoshka_weights": [0.4, 1.0, 0.25, 2.0]}
    elif case == "matryoshka_target_l0_no_pre_bias":
        options = {"matryoshka_prefixes": [19, 300], "target_l0": 25.0}
    z = module.pre_activations(x).detach().to(torch.float64)
    u = (z - module.threshold.detach().to(torch.float64)) / module.config.bandwidth
    assert int(((u > 0) & (u < 0.5)).sum()) >= 20 and int(((u <= 0) & (u > -0.5)).sum()) >= 20   # window used
    dense = dense_training_step(module, x, loss(0.3, **options), y)
    fast = _step(module, x, y, **options)
    names = (*PARAMS, "W_skip") if "skip_transcoder" in case else PARAMS
    _assert_same(fast, dense, rtol, atol, names)
    if "matryoshka" in case:           # FVU's numerator: the whole dictionary's error, not the prefix sum
        assert fast.full_reconstruction == pytest.approx(dense.full_reconstruction, rel=rtol)
        assert fast.full_reconstruction != pytest.approx(fast.reconstruction, rel=1e-3)


def _scan(lib, dtype, block, lower, col_offset, cols, values, capacity, counts, threads):
    B, width = block.shape
    return lib.saescope_scan_candidates(sparse_kernels.DTYPES[dtype], block.data_ptr(), lower.data_ptr(), B, width,
                                        col_offset, cols.data_ptr(), values.data_ptr(), capacity,
                                        counts.data_ptr(), threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("d", "width"), [(16, 16), (200, 200), (4093, 4093), (4093, 640), (200, 64)])
def test_scan_finds_exactly_the_entries_above_the_bound(dtype, threads, d, width):
    """Blocks of columns scanned then merged = torch's ``nonzero(xw > lower)`` in row-major order, with the
    values there: ties are not candidates (strict >), the next float up is, NaN never is; widths not a
    multiple of the vector length."""
    g = torch.Generator().manual_seed(d + threads + width)
    B = 37
    xw = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    lower = torch.quantile(xw.double(), 0.9, dim=0).to(dtype)
    xw[::2, 7 % d] = lower[7 % d]
    xw[1::3, 8 % d] = torch.nextafter(lower[8 % d], torch.tensor(float("inf"), dtype=dtype))
    xw[5, : d // 2] = float("nan")
    expected = torch.nonzero((xw > lower).view(-1)).squeeze(1)
    capacity = B * d
    found_cols = torch.empty(capacity, dtype=torch.int32)
    found_values = torch.empty(capacity, dtype=dtype)
    starts = list(range(0, d, width))
    counts = torch.empty(len(starts), B, dtype=torch.int64)
    block_start = torch.zeros(len(starts), dtype=torch.int64)
    lib = sparse_kernels.load()
    P = 0
    for k, c0 in enumerate(starts):
        block = xw[:, c0:c0 + width].contiguous()
        block_start[k] = P
        P += _scan(lib, dtype, block, lower[c0:c0 + width].contiguous(), c0, found_cols[P:], found_values[P:],
                   capacity - P, counts[k], threads)
    assert P == len(expected) > 0
    cols = torch.empty(P, dtype=torch.int32)
    values = torch.empty(P, dtype=dtype)
    offsets = torch.empty(B + 1, dtype=torch.int64)
    lib.saescope_merge_blocks(sparse_kernels.DTYPES[dtype], len(starts), B, counts.data_ptr(), block_start.data_ptr(),
                              found_cols.data_ptr(), found_values.data_ptr(), cols.data_ptr(), values.data_ptr(),
                              offsets.data_ptr())
    rows = torch.repeat_interleave(torch.arange(B), offsets.diff())
    assert torch.equal(rows * d + cols.long(), expected)
    assert torch.equal(values, xw.view(-1)[expected])
    # too small a buffer: -1 (the caller then takes the torch path), never a write past its end
    guard = torch.full((P + 64,), -7, dtype=torch.int32)
    assert _scan(lib, dtype, xw, lower, 0, guard, found_values, P - 1, counts[0], threads) == -1
    assert torch.all(guard[P - 1:] == -7)


@pytest.mark.parametrize("block_bytes", [1, 128 * 257 * 8, 1 << 30])
def test_compiled_step_with_product_blocks(compiled_only, monkeypatch, block_bytes):
    """The encoder product made block by block (blocks of 64 latents, of 128 and a remainder of 44, one block)
    gives the dense step's result."""
    monkeypatch.setattr(fast_path, "PRODUCT_BLOCK_BYTES", block_bytes)
    module, x, _ = _module(torch.float64)
    _assert_same(_step(module, x, None), dense_training_step(module, x, 0.3), 1e-10, 1e-13, PARAMS)


@pytest.mark.parametrize("options", [{}, {"target_l0": 15.0, "matryoshka_prefixes": [30, 100, 300]}])
def test_compiled_step_is_the_same_on_any_thread_count(compiled_only, options):
    """Work is split by tokens (forward) and latents (backward), each output written by one thread in a fixed
    order: 1, 2 and 3 threads give the same bits (so CPU runs resume bit for bit)."""
    module, x, _ = _module(torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_step(module, x, None, **options))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert other.loss == results[0].loss
        for name in PARAMS:
            assert torch.equal(other.grads[name], results[0].grads[name]), name


@pytest.mark.parametrize("kernels", [True, False])
def test_projected_decoder_gradient(kernels):
    """``project_decoder_gradient``: ∂L/∂W_dec with each row's component along its decoder row removed, as
    decoder_norm.project_out_parallel_gradient does (on rows of any norm)."""
    module, x, _ = _module(torch.float64)
    with torch.no_grad():
        module.W_dec.mul_(torch.linspace(0.5, 2.0, module.d_sae, dtype=torch.float64).unsqueeze(1))
    plain = _step(module, x, None, kernels=kernels)
    projected = _step(module, x, None, kernels=kernels, project_decoder_gradient=True)
    assert not plain.decoder_gradient_projected and projected.decoder_gradient_projected
    expected = project_out_parallel_gradient(module.W_dec.detach(), plain.grads["W_dec"].clone())
    torch.testing.assert_close(projected.grads["W_dec"], expected, rtol=1e-10, atol=1e-13)
    dots = (projected.grads["W_dec"] * module.W_dec.detach()).sum(dim=1)
    assert dots.abs().max() < 1e-12 < plain.grads["W_dec"].mul(module.W_dec.detach()).sum(dim=1).abs().max()


def test_full_buffer_falls_back_to_torch(monkeypatch):
    """More candidate pairs than the buffer holds: the step runs on torch ops, with the same result."""
    module, x, _ = _module(torch.float64)
    reference = _step(module, x, None, kernels=False)
    calls = []
    torch_step = fast_path._sparse_step
    monkeypatch.setattr(fast_path, "_sparse_step", lambda *a: calls.append(1) or torch_step(*a))
    monkeypatch.setattr(fast_path, "_pair_capacity", lambda B, d_sae: 10)
    result = _step(module, x, None)
    assert calls
    assert result.loss == reference.loss
    for name in PARAMS:
        assert torch.equal(result.grads[name], reference.grads[name]), name


def test_no_compiler_means_torch_ops_and_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(sparse_kernels, "_STATE", {})
    monkeypatch.setattr(sparse_kernels, "_compiler", lambda: None)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert sparse_kernels.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparse_kernels.load() is None          # said once
        module, x, _ = _module(torch.float64)
        dense = dense_training_step(module, x, 0.3)
        _assert_same(_step(module, x, None), dense, 1e-10, 1e-13, PARAMS)


def test_build_is_cached_per_source(monkeypatch, tmp_path):
    """A build lands in $SAESCOPE_CACHE/kernels under a hash of source, flags, compiler and CPU: loading again
    reuses it; a changed source builds its own."""
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(sparse_kernels, "_STATE", {})
    assert sparse_kernels.load() is not None
    built = sorted((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    monkeypatch.setattr(sparse_kernels, "_STATE", {})
    assert sparse_kernels.load() is not None
    assert sorted((tmp_path / "kernels").glob("*.so")) == built
    changed = tmp_path / "sparse_kernels.cpp"
    changed.write_text(sparse_kernels.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(sparse_kernels, "SOURCE", changed)
    monkeypatch.setattr(sparse_kernels, "_STATE", {})
    assert sparse_kernels.load() is not None
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 2


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SAESCOPE_CPU_KERNELS", "0")
    assert sparse_kernels.load() is None


def test_reused_gradient_buffers_give_the_same_gradients(compiled_only):
    """``reuse_gradient_buffers``: the big gradients land in buffers kept between calls (overwritten by the
    next call), with the values of fresh ones — also when another module's step used them in between."""
    module, x, _ = _module(torch.float32)
    other, x_other, _ = _module(torch.float32, seed=9)
    fresh = _step(module, x, None)
    first = _step(module, x, None, reuse_gradient_buffers=True)
    _step(other, x_other, None, reuse_gradient_buffers=True)
    again = _step(module, x, None, reuse_gradient_buffers=True)
    assert again.grads["W_dec"].data_ptr() == first.grads["W_dec"].data_ptr()     # the same buffer
    for name in PARAMS:
        assert torch.equal(again.grads[name], fresh.grads[name]), name


def test_trainer_on_kernels_equals_trainer_on_torch_ops(tmp_path, monkeypatch):
    """A whole run (two SAEs — one Matryoshka with target L0 — and a skip transcoder, float64, 24 steps with
    Adam, the decoder projection and renorm) on the kernels ends at the weights of the run on torch ops."""
    from saescope.train import SAESpec
    from tests.train_helpers import run_trainer, small_config, weights

    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, 24, generator=gen, dtype=torch.float64)
    codes = torch.rand(2048, 48, generator=gen, dtype=torch.float64) * (torch.rand(2048, 48, generator=gen) < 0.1)
    x = codes @ dirs + 0.05 * torch.randn(2048, 24, generator=gen, dtype=torch.float64)
    acts = {"resid_post/layer_2": x * 7.0, "mlp_in/layer_1": x / x.norm(dim=1, keepdim=True) * 24 ** 0.5,
            "mlp_out/layer_1": torch.randn(2048, 24, generator=gen, dtype=torch.float64)}
    specs = [SAESpec(site="resid_post/layer_2", width=64, sparsity_coefficient=0.02),
             SAESpec(site="resid_post/layer_2", width=96, sparsity_coefficient=0.2, target_l0=8.0,
                     matryoshka_prefixes=[16, 48, 96]),
             SAESpec(site="mlp_in/layer_1", width=32, sparsity_coefficient=0.05, kind="transcoder", skip=True)]
    compiled = fast_path._compiled_step
    calls = []
    monkeypatch.setattr(fast_path, "_compiled_step", lambda *a: calls.append(1) or compiled(*a))
    runs = {}
    for kernels in (True, False):
        cfg = small_config(tmp_path / str(kernels), specs, dtype="float64", cpu_kernels=kernels)
        trainer = run_trainer(cfg, acts)
        assert all(u.density <= cfg.fast_path_max_density for u in trainer.units)     # the sparse step ran
        runs[kernels] = weights(trainer)
        assert len(calls) == 24 * 3      # each step of each SAE once on the kernels; the torch run adds none
    for name, tensors in runs[True].items():
        for key, value in tensors.items():
            torch.testing.assert_close(value, runs[False][name][key], rtol=1e-9, atol=1e-11, msg=f"{name} {key}")


def test_build_falls_back_to_flags_the_compiler_accepts(monkeypatch, tmp_path):
    """A compiler that rejects the first flags (e.g. the x86 vector-width flag on ARM) gets the next ones."""
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(sparse_kernels, "_STATE", {})
    monkeypatch.setattr(sparse_kernels, "ARCH_FLAGS", (["--no-such-flag-here"], []))
    lib = sparse_kernels.load()
    assert lib is not None and len(list((tmp_path / "kernels").glob("*.so"))) == 1
    module, x, _ = _module(torch.float64)
    _assert_same(_step(module, x, None), dense_training_step(module, x, 0.3), 1e-10, 1e-13, PARAMS)


def test_sparse_step_up_to_a_higher_density_on_the_kernels(tmp_path, monkeypatch):
    """fast_path_max_density None: the sparse step up to L0/width 0.1 on the kernels, 0.05 on torch ops (where
    it stops paying); an explicit value wins."""
    from saescope.train import SAESpec, TrainConfig
    from saescope.train.unit import max_sparse_density

    cfg = TrainConfig(saes=[SAESpec(site="resid_post/layer_2", width=64, sparsity_coefficient=0.1)],
                      total_tokens=10_000)
    assert cfg.fast_path_max_density is None
    assert max_sparse_density(cfg) == 0.1
    assert max_sparse_density(cfg.model_copy(update={"cpu_kernels": False})) == 0.05
    assert max_sparse_density(cfg.model_copy(update={"dtype": "bfloat16"})) == 0.05
    assert max_sparse_density(cfg.model_copy(update={"fast_path_max_density": 0.3})) == 0.3
    monkeypatch.setenv("SAESCOPE_CPU_KERNELS", "0")
    assert max_sparse_density(cfg) == 0.05


@pytest.mark.parametrize("block_bytes", [1, 1 << 30])
def test_room_for_pairs_grows_within_a_step(compiled_only, monkeypatch, block_bytes):
    """The pair buffers start small (twice the last step's count), and a block that overflows them is scanned
    again into larger ones, keeping the pairs found before it: same result as the dense step."""
    monkeypatch.setattr(fast_path, "PRODUCT_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(fast_path, "FIRST_PAIRS_PER_TOKEN", 0)
    monkeypatch.setattr(fast_path, "_LAST_PAIRS", {})
    monkeypatch.setattr(fast_path, "_PAIRS", {})
    module, x, _ = _module(torch.float64, batch=2000)          # > 4096 pairs: the first room is too small
    result = _step(module, x, None)
    pairs = len(fast_path._PAIRS[torch.float64][0])
    assert pairs >= fast_path._LAST_PAIRS[(2000, 300)] > 1 << 12
    _assert_same(result, dense_training_step(module, x, 0.3), 1e-10, 1e-13, PARAMS)
    again = _step(module, x, None)                            # the next step starts with twice the count
    assert len(fast_path._PAIRS[torch.float64][0]) >= 2 * fast_path._LAST_PAIRS[(2000, 300)]
    assert again.loss == result.loss
