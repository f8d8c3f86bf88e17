"""Sites on tiny random models, checked by independent means.

* Every site of layer 1 is recomputed by hand in float64 from resid_post of layer 0 and the module weights
  (norms, o_proj, MLP), closing the residual identity ``resid_post = resid_pre + attn + mlp_out``.
* ``attn_out`` equals the input that ``o_proj`` itself receives, and ``o_proj(attn_out)`` the attention output.
* ``resid_post`` equals Hugging Face's own ``output_hidden_states``.
* Early stop gives the same values as a capture during a full forward pass, and no later block runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, D_MODEL, LLAMA_LIKE, N_LAYERS, tiny_ids, tiny_model

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.sites import (
    ARCHITECTURES,
    architecture_of,
    decoder_layers,
    hook_point,
    hook_site,
    list_sites,
    read_sites,
    site_width,
)

ALL_KINDS = ("resid_post", "attn_out", "mlp_out", "mlp_in")


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module, offset: float) -> torch.Tensor:
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + norm.weight)


def _layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _by_hand(arch: str, block: torch.nn.Module, resid_pre: torch.Tensor, attn_out: torch.Tensor, config):
    """(attention contribution, mlp_in, mlp_out) of one block, written out from its weights (float64)."""
    if arch == "gemma":  # Gemma 1: no post-norms
        attn = attn_out @ block.self_attn.o_proj.weight.T
        mid = resid_pre + attn
        mlp_in = _rms_norm(mid, block.post_attention_layernorm, 1.0)
        act = F.gelu(mlp_in @ block.mlp.gate_proj.weight.T, approximate="tanh")
        mlp_out = (act * (mlp_in @ block.mlp.up_proj.weight.T)) @ block.mlp.down_proj.weight.T
    elif arch.startswith("gemma"):
        attn = _rms_norm(attn_out @ block.self_attn.o_proj.weight.T, block.post_attention_layernorm, 1.0)
        mid = resid_pre + attn
        mlp_in = _rms_norm(mid, block.pre_feedforward_layernorm, 1.0)
        act = F.gelu(mlp_in @ block.mlp.gate_proj.weight.T, approximate="tanh")
        hidden = act * (mlp_in @ block.mlp.up_proj.weight.T)
        mlp_out = _rms_norm(hidden @ block.mlp.down_proj.weight.T, block.post_feedforward_layernorm, 1.0)
    elif arch in ("llama", *LLAMA_LIKE):
        attn = attn_out @ block.self_attn.o_proj.weight.T
        if block.self_attn.o_proj.bias is not None:
            attn = attn + block.self_attn.o_proj.bias
        mid = resid_pre + attn
        mlp_in = _rms_norm(mid, block.post_attention_layernorm, 0.0)
        hidden = F.silu(mlp_in @ block.mlp.gate_proj.weight.T) * (mlp_in @ block.mlp.up_proj.weight.T)
        mlp_out = hidden @ block.mlp.down_proj.weight.T
    elif arch == "gpt2":
        attn = attn_out @ block.attn.c_proj.weight + block.attn.c_proj.bias
        mid = resid_pre + attn
        mlp_in = _layer_norm(mid, block.ln_2)
        hidden = F.gelu(mlp_in @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
        mlp_out = hidden @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    else:
        raise ValueError(arch)
    return attn, mlp_in, mlp_out


@pytest.mark.parametrize("arch", (*ARCHS, *LLAMA_LIKE, "gemma"))
def test_layer_recomputed_by_hand_in_float64(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = tiny_ids()
    sites = ["resid_post/layer_0"] + [f"{kind}/layer_1" for kind in ALL_KINDS]
    got = read_sites(model, ids, sites)
    block = decoder_layers(model)[1]
    with torch.no_grad():
        attn, mlp_in, mlp_out = _by_hand(arch, block, got["resid_post/layer_0"], got["attn_out/layer_1"],
                                         model.config)
    # HF norms compute in float32 even in a float64 model, hence float32-level tolerances
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got["mlp_in/layer_1"], mlp_in, **tol)
    torch.testing.assert_close(got["mlp_out/layer_1"], mlp_out, **tol)
    resid_post = got["resid_post/layer_0"] + attn + mlp_out
    torch.testing.assert_close(got["resid_post/layer_1"], resid_post, **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_attn_out_is_o_proj_input_and_maps_to_attention_output(arch):
    model = tiny_model(arch)
    ids = tiny_ids()
    block = decoder_layers(model)[2]
    attention = block.self_attn if arch != "gpt2" else block.attn
    o_proj = attention.o_proj if arch != "gpt2" else attention.c_proj
    seen = {}
    h1 = o_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("in", args[0].detach()))
    h2 = attention.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h1.remove()
        h2.remove()
    got = read_sites(model, ids, "attn_out/layer_2")["attn_out/layer_2"]
    # read_sites runs with use_cache=False; the plain call above fills a KV cache, whose other tensor layout
    # sends GPT-2's attention through other kernels: equal to float32 rounding, not bitwise (AVX2: 3.7e-9)
    torch.testing.assert_close(got, seen["in"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(o_proj(got), seen["out"])
    # attn_out is the concatenation of the heads, wider than d_model when n_heads·head_dim > d_model
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or D_MODEL // heads
    assert got.shape == (2, 10, heads * head_dim) == (2, 10, site_width(model, "attn_out/layer_2"))


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_post_matches_hf_hidden_states(arch):
    model = tiny_model(arch)
    ids = tiny_ids()
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    got = read_sites(model, ids, [f"resid_post/layer_{layer}" for layer in range(N_LAYERS - 1)])
    for layer in range(N_LAYERS - 1):  # the last entry of hidden_states has the final norm applied
        # same tolerance as above: HF's call here uses a KV cache, read_sites does not (other kernels)
        torch.testing.assert_close(got[f"resid_post/layer_{layer}"], hidden[layer + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_equals_full_run_and_skips_later_layers(arch):
    model = tiny_model(arch)
    ids = tiny_ids(seq=7)
    sites = [Site(kind=kind, layer=layer) for layer in (0, 1) for kind in ALL_KINDS]
    full: dict[str, torch.Tensor] = {}
    handles = [hook_site(model, site, lambda x, key=site.id: full.__setitem__(key, x.clone())) for site in sites]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    calls: list[str] = []
    blocks = decoder_layers(model)
    counters = [block.register_forward_hook(lambda *_a, i=i: calls.append(f"block{i}"))
                for i, block in enumerate(blocks)]
    counters.append(model.get_output_embeddings().register_forward_hook(lambda *_a: calls.append("unembed")))
    try:
        got = read_sites(model, ids, sites)
    finally:
        for handle in counters:
            handle.remove()
    assert calls == ["block0", "block1"]
    assert list(got) == [site.id for site in sites]
    for site in sites:
        assert torch.equal(got[site.id], full[site.id]), site.id
    # nothing left behind: a plain forward afterwards runs every block and the unembedding
    assert not any(block._forward_hooks for block in blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_list_sites_and_widths(arch):
    model = tiny_model(arch)
    sites = list_sites(model)
    assert len(sites) == 4 * N_LAYERS
    assert {site.kind for site, _ in sites} == set(ALL_KINDS)
    attn_width = 32 if arch == "gpt2" else 48
    for site, width in sites:
        assert width == (attn_width if site.kind == "attn_out" else D_MODEL)
    out = read_sites(model, tiny_ids(), [site for site, _ in sites])
    for site, width in sites:
        assert out[site.id].shape == (2, 10, width)


def test_attention_mask_is_passed_through():
    model = tiny_model("llama")
    ids = tiny_ids(batch=1, seq=6)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    short = read_sites(model, ids, "resid_post/layer_2")["resid_post/layer_2"]
    long = read_sites(model, padded, "resid_post/layer_2", attention_mask=mask)["resid_post/layer_2"]
    torch.testing.assert_close(long[:, :6], short)


def test_architecture_table_and_hook_points():
    assert architecture_of(tiny_model("gemma3")) == "gemma3"
    assert architecture_of(tiny_model("gemma3_multimodal")) == "gemma3_multimodal"
    assert hook_point(tiny_model("gemma3_multimodal"), "mlp_out:0") == \
        "model.language_model.layers.0.post_feedforward_layernorm:output"
    assert architecture_of(tiny_model("mistral")) == "llama"
    assert architecture_of(tiny_model("qwen2")) == "llama"
    assert hook_point(tiny_model("gemma2"), "attn_out/layer_1") == "model.layers.1.self_attn.o_proj:input"
    assert hook_point(tiny_model("gpt2"), "mlp_in:2") == "transformer.h.2.ln_2:output"
    assert hook_point(tiny_model("llama"), "resid_post:0") == "model.layers.0:output"
    assert {"gemma2", "gemma3", "llama", "gpt2"} <= set(ARCHITECTURES)


def test_unsupported_architecture_lists_supported():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(SaescopeError, match="unsupported architecture.*gpt_neox.*gemma3.*llama.*gpt2"):
        architecture_of(model)
    with pytest.raises(SaescopeError, match="unsupported architecture"):
        read_sites(model, tiny_ids(seq=3) % 50, "resid_post/layer_0")


def test_bad_site_or_layer_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(SaescopeError, match="has 3 layers.*0..2"):
        read_sites(model, tiny_ids(), "resid_post/layer_3")
    with pytest.raises(SaescopeError, match="resid_post, attn_out, mlp_out, mlp_in"):
        read_sites(model, tiny_ids(), "resid_pre/layer_1")
    with pytest.raises(SaescopeError, match="no sites"):
        read_sites(model, tiny_ids(), [])


def test_loaded_model_wrapper_is_accepted():
    from saescope.models import LoadedModel

    model = tiny_model("gemma3")
    wrapped = LoadedModel(model=model, tokenizer=None, name="tiny", architecture="gemma3", n_layers=3, d_model=32)
    a = read_sites(wrapped, tiny_ids(), "mlp_out:1")["mlp_out/layer_1"]
    b = read_sites(model, tiny_ids(), "mlp_out:1")["mlp_out/layer_1"]
    assert torch.equal(a, b)
    assert site_width(wrapped, "attn_out:0") == 48


class _Gate:
    """A forward pre-hook for block 0 that holds every forward pass there until ``n`` of them are inside the
    model (at most ``patience`` seconds, once): all the calls' hooks are then installed on the shared modules
    at the same time, the worst case for calls that would react to each other's forward passes."""

    def __init__(self, n: int, patience: float = 10.0) -> None:
        import threading

        self.n, self.patience, self.arrived, self.gave_up = n, patience, 0, False
        self.cond = threading.Condition()

    def __call__(self, _module, _args) -> None:
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
            if not self.gave_up and not self.cond.wait_for(lambda: self.arrived >= self.n, self.patience):
                self.gave_up = True


def test_concurrent_reads_of_one_model_each_get_their_own_sites():
    """Threads sharing one model (``saescope browse``): each read_sites call's hooks and early stop react only
    to its own forward pass. Reference: the same calls one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model("gemma3")
    jobs = [(tiny_ids(batch=1, seq=4 + i, seed=i), site)
            for i, site in enumerate(["resid_post/layer_1", "attn_out/layer_0", "mlp_out/layer_2", "mlp_in/layer_1",
                                      "resid_post/layer_0", "resid_post/layer_1", "attn_out/layer_2", "mlp_out/layer_0"])]
    expected = [read_sites(model, ids, site)[site] for ids, site in jobs]
    gate = _Gate(len(jobs))
    handle = decoder_layers(model)[0].register_forward_pre_hook(gate)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda job: read_sites(model, job[0], job[1])[job[1]], jobs))
    finally:
        handle.remove()
    assert gate.arrived == len(jobs) and not gate.gave_up  # all the forward passes overlapped
    for (_, site), want, have in zip(jobs, expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=site)
    assert not any(block._forward_hooks for block in decoder_layers(model))


def test_a_forward_pass_that_skips_the_site_is_a_layout_error():
    """A genuine layout mismatch: the model runs only its first block (its config says 1 layer while the module
    tree holds 3), so the forward pass ends without reaching layer 2."""
    model = tiny_model("gemma3")
    model.config.num_hidden_layers = 1
    with pytest.raises(SaescopeError, match=r"never reached resid_post/layer_2: it ran to its end .*"
                                            r"Gemma3ForCausalLM may not follow the gemma3 layout"):
        read_sites(model, tiny_ids(), "resid_post/layer_2")
    assert read_sites(model, tiny_ids(), "resid_post/layer_0")["resid_post/layer_0"].shape == (2, 10, D_MODEL)
