"""Splicing on tiny random models: identity = clean logits, loss = reference cross-entropy, and a splice at
mlp_out matches a computation written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, N_LAYERS, tiny_ids, tiny_model

from saescope.errors import SaescopeError
from saescope.sites import read_sites
from saescope.splice import run_with_splice, token_cross_entropy


def _reference_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").reshape(ids.shape[0], -1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out", "mlp_in"])
def test_identity_splice_gives_clean_logits(arch, kind):
    model = tiny_model(arch)
    ids = tiny_ids()
    with torch.no_grad():
        clean = model(ids).logits
    out = run_with_splice(model, ids, f"{kind}/layer_1", lambda x: x, return_logits=True)
    torch.testing.assert_close(out.logits, clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss_per_token.double(), _reference_loss(clean, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_clean_run_loss_matches_reference_cross_entropy(arch):
    model = tiny_model(arch)  # gemma2 has final-logit soft-capping (5.0) in the tiny config
    ids = tiny_ids(batch=3, seq=12)
    with torch.no_grad():
        clean = model(ids).logits
    out = run_with_splice(model, ids, None, None, chunk_size=5)
    assert out.logits is None
    assert out.loss_per_token.shape == (3, 11) and out.loss_per_token.dtype == torch.float32
    torch.testing.assert_close(out.loss_per_token.double(), _reference_loss(clean, ids), rtol=1e-5, atol=1e-5)
    assert out.mean_loss() == pytest.approx(float(_reference_loss(clean, ids).mean()), rel=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "in-place"])
@pytest.mark.parametrize("scale", [1.0, 60.0])          # 60: logits in the hundreds (exp overflows unshifted)
def test_token_cross_entropy_chunks_agree_with_float64_reference(grad, scale):
    """Both paths — out-of-place under autograd, in place without it — equal float64 cross-entropy."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 16, generator=generator) * scale
    unembed = torch.nn.Linear(16, 300, bias=False)
    targets = torch.randint(0, 300, (2, 7), generator=generator)
    with torch.no_grad():
        logits64 = unembed(hidden).double()
    reference = F.cross_entropy(logits64.reshape(-1, 300), targets.reshape(-1), reduction="none").reshape(2, 7)
    reference_capped = F.cross_entropy((2.0 * torch.tanh(logits64 / 2.0)).reshape(-1, 300),
                                       targets.reshape(-1), reduction="none").reshape(2, 7)
    with torch.set_grad_enabled(grad):
        for chunk in (1, 3, 14, 1000):
            got = token_cross_entropy(hidden, targets, unembed, chunk_size=chunk)
            assert got.requires_grad == grad
            torch.testing.assert_close(got.detach().double(), reference, rtol=1e-5, atol=1e-5 * scale)
        capped = token_cross_entropy(hidden, targets, unembed, softcap=2.0, chunk_size=4)
    torch.testing.assert_close(capped.detach().double(), reference_capped, rtol=1e-5, atol=1e-5)


def test_token_cross_entropy_materialises_only_chunk_rows():
    rows_seen = []

    def unembed(h):
        rows_seen.append(h.shape[0])
        return h @ torch.ones(4, 10)

    token_cross_entropy(torch.randn(3, 9, 4), torch.zeros(3, 9, dtype=torch.long), unembed, chunk_size=4)
    assert max(rows_seen) == 4 and sum(rows_seen) == 27


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_out_splice_in_last_layer_matches_hand_computation(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = tiny_ids()
    last = N_LAYERS - 1
    clean = read_sites(model, ids, [f"resid_post/layer_{last}", f"mlp_out/layer_{last}"])

    def g(x):
        return 0.5 * x.flip(-1) + 0.25

    out = run_with_splice(model, ids, f"mlp_out/layer_{last}", g, return_logits=True)
    resid = clean[f"resid_post/layer_{last}"] - clean[f"mlp_out/layer_{last}"] + g(clean[f"mlp_out/layer_{last}"])
    with torch.no_grad():
        final_norm = {"gpt2": lambda: model.transformer.ln_f,
                      "gemma3_multimodal": lambda: model.model.language_model.norm}.get(arch, lambda: model.model.norm)()
        logits = model.lm_head(final_norm(resid))
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(out.logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss_per_token.double(), _reference_loss(logits, ids), rtol=1e-5, atol=1e-5)
    clean_logits = run_with_splice(model, ids, None, None, return_logits=True).logits
    assert (out.logits - clean_logits).abs().max() > 1e-2  # the splice did change the prediction


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_out_splice_equals_the_same_edit_at_resid_post(arch):
    """A change at mlp_out of layer 1 reaches the residual stream additively: splicing resid_post with
    ``x − m + g(m)`` (m read from the clean run) must give the same logits."""
    model = tiny_model(arch, dtype=torch.float64)
    ids = tiny_ids()
    m = read_sites(model, ids, "mlp_out/layer_1")["mlp_out/layer_1"]

    def g(x):
        return torch.zeros_like(x)

    a = run_with_splice(model, ids, "mlp_out/layer_1", g, return_logits=True)
    b = run_with_splice(model, ids, "resid_post/layer_1", lambda x: x - m + g(m), return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.loss_per_token, b.loss_per_token, rtol=1e-6, atol=1e-6)


def test_splice_mask_leaves_masked_positions_clean():
    model = tiny_model("gemma3")
    ids = tiny_ids()
    seen = {}

    def zero(x):
        seen["x"] = x
        return torch.zeros_like(x)

    keep_bos = torch.ones_like(ids, dtype=torch.bool)
    keep_bos[:, 0] = False
    out = run_with_splice(model, ids, "resid_post/layer_0", zero, splice_mask=keep_bos, return_logits=True)
    clean = run_with_splice(model, ids, None, None, return_logits=True)
    # position 0 only sees itself, so its logits stay clean; later positions changed
    torch.testing.assert_close(out.logits[:, 0], clean.logits[:, 0], rtol=0, atol=0)
    assert (out.logits[:, 1:] - clean.logits[:, 1:]).abs().max() > 1e-3
    none = run_with_splice(model, ids, "resid_post/layer_0", zero, splice_mask=torch.zeros_like(keep_bos),
                           return_logits=True)
    torch.testing.assert_close(none.logits, clean.logits, rtol=0, atol=0)


def test_attention_mask_gives_target_mask():
    model = tiny_model("llama")
    ids = tiny_ids(batch=2, seq=6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    out = run_with_splice(model, ids, "mlp_out:0", lambda x: x, attention_mask=mask)
    assert out.target_mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    short = run_with_splice(model, ids[1:, :4], None, None)
    torch.testing.assert_close(out.loss_per_token[1, :3], short.loss_per_token[0])


def test_bad_splice_function_and_inputs_are_clear_errors():
    model = tiny_model("llama")
    ids = tiny_ids()
    with pytest.raises(SaescopeError, match="must return a tensor of shape"):
        run_with_splice(model, ids, "resid_post:1", lambda x: x[..., :3])
    with pytest.raises(SaescopeError, match="has 3 layers"):
        run_with_splice(model, ids, "resid_post:7", lambda x: x)
    with pytest.raises(SaescopeError, match="at least 2 tokens"):
        run_with_splice(model, ids[:, :1], None, None)
    with pytest.raises(SaescopeError, match="chunk_size"):
        run_with_splice(model, ids, None, None, chunk_size=0)


def test_sae_forward_can_be_spliced():
    from saescope.sae.jumprelu import JumpReLUSAE

    model = tiny_model("gemma2")
    ids = tiny_ids()
    sae = JumpReLUSAE(32, 64, seed=0)
    out = run_with_splice(model, ids, "resid_post/layer_1", sae.forward)
    assert torch.isfinite(out.loss_per_token).all()


def test_grad_mode_gives_the_gradient_at_the_site():
    """With grad=True the loss is differentiable w.r.t. the spliced activation; check one coordinate by a
    central finite difference."""
    model = tiny_model("gemma3", dtype=torch.float64)
    ids = tiny_ids(batch=1, seq=6)
    delta = torch.zeros(1, 6, 32, dtype=torch.float64, requires_grad=True)
    out = run_with_splice(model, ids, "resid_post/layer_1", lambda x: x + delta, grad=True)
    out.loss_per_token.sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert run_with_splice(model, ids, None, None).loss_per_token.requires_grad is False
    eps = 0.1  # the loss is reduced in float32 and HF norms compute in float32: a coarse step
    bump = torch.zeros(1, 6, 32, dtype=torch.float64)
    bump[0, 2, 7] = eps
    plus = run_with_splice(model, ids, "resid_post/layer_1", lambda x: x + bump).loss_per_token.sum()
    minus = run_with_splice(model, ids, "resid_post/layer_1", lambda x: x - bump).loss_per_token.sum()
    assert float(delta.grad[0, 2, 7]) == pytest.approx(float(plus - minus) / (2 * eps), rel=5e-3)
