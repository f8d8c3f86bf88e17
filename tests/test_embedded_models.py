"""Integration: the two embedded real models load offline and every site of a layer reads with its width.

The first run dequantizes the GGUFs (about a minute each on 2 cores) and caches them; later runs take seconds.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from saescope.corpus import pack_windows, shakespeare_documents
from saescope.models import load_model
from saescope.sites import hook_site, list_sites, read_sites
from saescope.splice import run_with_splice

pytestmark = pytest.mark.integration

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
KINDS = ("resid_post", "attn_out", "mlp_out", "mlp_in")


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def _ids(loaded):
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    if ids[0, 0] != loaded.tokenizer.bos_token_id:
        ids = torch.cat([torch.tensor([[loaded.tokenizer.bos_token_id]]), ids], dim=1)
    return ids


def test_gemma_loads_offline_and_reads_all_sites(gemma):
    assert (gemma.name, gemma.architecture, gemma.n_layers, gemma.d_model) == ("gemma-3-270m", "gemma3", 18, 640)
    ids = _ids(gemma)
    assert ids[0, 0] == 2  # Gemma's BOS
    got = read_sites(gemma, ids, [f"{kind}/layer_6" for kind in KINDS])
    widths = {"resid_post": 640, "attn_out": 1024, "mlp_out": 640, "mlp_in": 640}  # attn_out: 4 heads × 256
    for kind in KINDS:
        x = got[f"{kind}/layer_6"]
        assert x.shape == (1, ids.shape[1], widths[kind]) and torch.isfinite(x).all()
    # the recipe's measurement: resid_post norms at layer 6 are in the thousands (massive activations)
    norms = got["resid_post/layer_6"][0, 1:].norm(dim=-1)
    assert 300 < norms.median() < 30_000
    assert dict(list_sites(gemma))[next(s for s, _ in list_sites(gemma) if s.id == "attn_out/layer_6")] == 1024


def test_gemma_early_stop_and_splice_identity(gemma):
    ids = _ids(gemma)
    full = {}
    handle = hook_site(gemma.model, "mlp_out/layer_5", lambda x: full.__setitem__("x", x.clone()))
    try:
        with torch.no_grad():
            clean = gemma.model(ids).logits
    finally:
        handle.remove()
    early = read_sites(gemma, ids, "mlp_out/layer_5")["mlp_out/layer_5"]
    assert torch.equal(early, full["x"])
    out = run_with_splice(gemma, ids, "resid_post/layer_5", lambda x: x, return_logits=True)
    torch.testing.assert_close(out.logits, clean, rtol=0, atol=1e-6)
    # a real model on Shakespeare predicts far better than uniform over 262,144 tokens (12.5 nats)
    assert out.mean_loss() < 6.0
    zeroed = run_with_splice(gemma, ids, "resid_post/layer_5", torch.zeros_like)
    assert zeroed.mean_loss() > out.mean_loss() + 1.0


def test_smollm2_loads_offline_and_reads_all_sites(smollm):
    assert (smollm.name, smollm.architecture, smollm.n_layers, smollm.d_model) == ("smollm2-135m", "llama", 30, 576)
    ids = _ids(smollm)
    got = read_sites(smollm, ids, [f"{kind}/layer_15" for kind in KINDS])
    for kind in KINDS:  # 9 heads × 64 = 576 = d_model
        assert got[f"{kind}/layer_15"].shape == (1, ids.shape[1], 576)
        assert torch.isfinite(got[f"{kind}/layer_15"]).all()
    assert run_with_splice(smollm, ids, None, None).mean_loss() < 6.0


def test_cached_weights_equal_a_fresh_gguf_load(smollm):
    fresh = load_model("smollm2-135m", cache=False)
    cached = load_model("smollm2-135m")  # the fixture created or reused the cache
    fresh_state = fresh.model.state_dict()
    for key, value in cached.model.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key
    assert fresh.tokenizer(TEXT).input_ids == cached.tokenizer(TEXT).input_ids


def test_pack_windows_with_the_gemma_tokenizer(gemma):
    tok = gemma.tokenizer
    windows = list(itertools.islice(pack_windows(shakespeare_documents(), tok, context_len=128), 3))
    for window in windows:
        assert window.input_ids.shape == (128,) and window.input_ids[0] == tok.bos_token_id
        assert not window.mask[0]
        assert not window.mask[window.input_ids == tok.eos_token_id].any()
    assert windows[0].positions[1:].tolist() == list(range(127))
    assert windows[1].positions[1] == 127  # the play continues in the next window
    text = tok.decode(windows[0].input_ids[1:])
    assert text == next(shakespeare_documents()).text[: len(text)]
