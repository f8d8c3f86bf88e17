"""cache_activations: rows vs an independent full forward pass, provenance, resume, non-finite errors;
and the embedded Gemma 3 270M on Shakespeare (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from store_synthetic import read_store_with_safetensors
from tiny_models import tiny_model

from saescope.corpus import Document
from saescope.errors import SaescopeError
from saescope.models import LoadedModel
from saescope.store import (
    ActivationLoader,
    LoaderOutput,
    StoreFormat,
    StoreIndex,
    cache_activations,
    verify_store,
)

BOS, EOS, PAD = 1, 2, 0


class CharTokenizer:
    """Characters → ids 3..96 (no merges), so the reference stream below is written by hand."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(ch) % 94 for ch in text]


DOCS = [Document(id=f"doc{i}", text=("to be or not to be " * (i + 1))[: 7 + 13 * i]) for i in range(9)]


def tiny_loaded(seed=0):
    return LoadedModel(model=tiny_model("gemma3", seed=seed), tokenizer=CharTokenizer(), name="tiny-gemma3",
                       architecture="gemma3", n_layers=3, d_model=32)


def reference_rows(model, context_len):
    """Pack by hand, run the whole model with output_hidden_states, keep non-special positions."""
    stream = []
    for d, doc in enumerate(DOCS):
        ids = CharTokenizer().encode(doc.text) + [EOS]
        stream += [(t, d, p) for p, t in enumerate(ids)]
    body = context_len - 1
    rows = {"token_ids": [], "document_ids": [], "positions": [], "resid_post/layer_0": [], "resid_post/layer_1": []}
    for start in range(0, len(stream), body):
        part = stream[start:start + body]
        ids = torch.tensor([[BOS] + [t for t, _, _ in part] + [PAD] * (body - len(part))])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for j, (t, d, p) in enumerate(part):
            if t == EOS:
                continue
            rows["token_ids"].append(t)
            rows["document_ids"].append(d)
            rows["positions"].append(p)
            rows["resid_post/layer_0"].append(hidden[1][0, j + 1])  # hidden_states[L + 1] = block L output
            rows["resid_post/layer_1"].append(hidden[2][0, j + 1])  # (the last entry has the final norm)
    return {k: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v) for k, v in rows.items()}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cached_rows_match_a_full_forward_pass_and_trace_back_to_text(tmp_path):
    lm = tiny_loaded()
    index = cache_activations(lm, DOCS, ["resid_post/layer_0", "resid_post/layer_1"], tmp_path / "s",
                              context_len=16, batch_size=3, store_format=StoreFormat(shard_rows=40), text_name="to-be", progress=False, held_out_fraction=0.0)
    want = reference_rows(lm.model, 16)
    got = read_store_with_safetensors(tmp_path / "s")
    assert index.rows == want["token_ids"].numel() and index.complete
    for key in ("token_ids", "document_ids", "positions"):
        assert torch.equal(got[key].long(), want[key]), key
    for site in ("resid_post/layer_0", "resid_post/layer_1"):
        torch.testing.assert_close(got[site], want[site], rtol=1e-5, atol=1e-5)
    # every row traces back to its character in its document
    for t, d, p in zip(got["token_ids"].tolist(), got["document_ids"].tolist(), got["positions"].tolist()):
        assert CharTokenizer().encode(DOCS[d].text[p]) == [t]
    assert index.model == "tiny-gemma3" and index.context_len == 16 and index.settings["text"] == "to-be"
    assert {s: e.d for s, e in index.sites.items()} == {"resid_post/layer_0": 32, "resid_post/layer_1": 32}
    c = want["resid_post/layer_1"].double().square().sum(1).mean().sqrt().item()
    assert index.sites["resid_post/layer_1"].norm_scale == pytest.approx(c, rel=1e-5)
    verify_store(tmp_path / "s")


def test_only_the_training_part_of_the_split_is_stored(tmp_path):
    from saescope.corpus import held_out_score

    lm = tiny_loaded()
    cache_activations(lm, DOCS, "resid_post/layer_0", tmp_path / "s", context_len=16, progress=False,
                      held_out_fraction=0.5)
    train = [d for d in DOCS if held_out_score(d.id) >= 0.5]
    assert 0 < len(train) < len(DOCS)      # the split really removes some documents here
    got = read_store_with_safetensors(tmp_path / "s")
    assert sorted(set(got["document_ids"].tolist())) == list(range(len(train)))
    for t, d, p in zip(got["token_ids"].tolist(), got["document_ids"].tolist(), got["positions"].tolist()):
        assert CharTokenizer().encode(train[d].text[p]) == [t]
    assert StoreIndex.load(tmp_path / "s").settings["held_out_fraction"] == 0.5


def test_a_split_that_holds_out_every_document_is_a_clear_error(tmp_path):
    from saescope.corpus import held_out_score

    lm = tiny_loaded()
    held = [d for d in DOCS if held_out_score(d.id) < 0.5]
    assert held
    with pytest.raises(SaescopeError, match=r"all 1 document\(s\) fall in the held-out part.*--held-out-fraction 0"):
        cache_activations(lm, held[:1], "resid_post/layer_0", tmp_path / "s", context_len=16, progress=False,
                          held_out_fraction=0.5)


def test_crash_mid_run_then_same_call_resumes_to_the_same_store(tmp_path):
    lm = tiny_loaded()
    kwargs = {"context_len": 16, "batch_size": 2, "store_format": StoreFormat(dtype="bfloat16", shard_rows=25), "text_name": "to-be",
              "progress": False, "held_out_fraction": 0.0}
    sites = ["resid_post/layer_1", "mlp_out/layer_0"]
    reference = cache_activations(lm, DOCS, sites, tmp_path / "ref", **kwargs)

    def crashing(after):
        for i, doc in enumerate(DOCS):
            if i == after:
                raise RuntimeError("simulated crash")
            yield doc

    for after in (4, 6, 8):
        with pytest.raises(RuntimeError, match="simulated"):
            cache_activations(lm, crashing(after), sites, tmp_path / "s", **kwargs)
        assert not StoreIndex.load(tmp_path / "s").complete
    again = cache_activations(lm, DOCS, sites, tmp_path / "s", **{**kwargs, "batch_size": 3})
    assert again == reference
    assert tree(tmp_path / "s") == tree(tmp_path / "ref")
    before = tree(tmp_path / "s")
    cache_activations(lm, DOCS, sites, tmp_path / "s", **kwargs)  # finished: nothing is rewritten
    assert tree(tmp_path / "s") == before
    with pytest.raises(SaescopeError, match="other settings"):
        cache_activations(lm, DOCS, sites, tmp_path / "s", **{**kwargs, "context_len": 32})


def test_max_tokens_and_bad_sites(tmp_path):
    lm = tiny_loaded()
    index = cache_activations(lm, DOCS, "resid_post/layer_1", tmp_path / "s", context_len=16, max_tokens=37,
                              store_format=StoreFormat(shard_rows=10), progress=False, held_out_fraction=0.0)
    assert index.rows == 37 and [s.rows for s in index.shards] == [10, 10, 10, 7]
    with pytest.raises(SaescopeError, match="cannot read site"):
        cache_activations(lm, DOCS, "resid_pre/layer_1", tmp_path / "t", progress=False, held_out_fraction=0.0)
    with pytest.raises(SaescopeError):
        cache_activations(lm, DOCS, "resid_post/layer_7", tmp_path / "t", progress=False, held_out_fraction=0.0)
    assert not (tmp_path / "t").exists()


def test_non_finite_activation_stops_with_site_document_and_position(tmp_path):
    lm = tiny_loaded()
    bad_token = CharTokenizer().encode("n")[0]
    seen = {}
    # NaN in the block output exactly at the token "n" (a NaN embedding would spread through attention,
    # since 0 · NaN = NaN in the masked probabilities)
    lm.model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(ids=kw["input_ids"]),
                                             with_kwargs=True)

    def poison(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[seen["ids"] == bad_token] = float("nan")

    lm.model.model.layers[0].register_forward_hook(poison)
    first_doc = next(i for i, d in enumerate(DOCS) if "n" in d.text)
    position = DOCS[first_doc].text.index("n")
    with pytest.raises(SaescopeError) as err:
        cache_activations(lm, DOCS, "resid_post/layer_0", tmp_path / "s", context_len=16, progress=False, held_out_fraction=0.0)
    message = str(err.value)
    assert "resid_post/layer_0" in message
    assert f"document {first_doc} (doc{first_doc})" in message and f"position {position} " in message


@pytest.mark.integration
def test_embedded_gemma_resid_post_middle_layer_on_shakespeare(tmp_path):
    from saescope.corpus import shakespeare_documents, split_documents
    from saescope.models import load_model
    from saescope.sites import read_sites

    lm = load_model("gemma-3-270m")
    site = f"resid_post/layer_{lm.n_layers // 3}"  # layer 6 of 18
    index = cache_activations(lm, "shakespeare", [site], tmp_path / "s", context_len=128, batch_size=4,
                              store_format=StoreFormat(shard_rows=512), max_tokens=1500, progress=False)
    assert index.rows == 1500 and index.sites[site].d == lm.d_model == 640
    assert len(index.shards) == 3 and index.model == "gemma-3-270m" and index.settings["text"] == "shakespeare"
    loader = ActivationLoader(tmp_path / "s", site, batch_size=100, epochs=1, output=LoaderOutput(with_tokens=True))
    batch = next(iter(loader))
    x = batch[site]
    assert torch.isfinite(x).all() and x.shape == (100, 640)
    # C from the recipe's measurement on this model (median norm ≈ 3,200, so C of a few thousand)
    assert 1000 < loader.norm_scale(site) < 10000
    # over the whole store (15 batches of 100 = all 1500 rows) E‖x/C‖² = 1
    everything = torch.cat([batch[site]] + [b[site] for b in loader])
    assert everything.shape[0] == 1500
    mean_sq = (everything.double() / loader.norm_scale(site)).square().sum(1).mean().item()
    assert mean_sq == pytest.approx(1.0, rel=1e-6)
    # a row re-derived from its token, document and position: rerun that window and compare
    tokenizer = lm.tokenizer
    doc_text = next(iter(split_documents(shakespeare_documents(), 0.1, part="train"))).text
    ids = tokenizer.encode(doc_text, add_special_tokens=False)
    row = int(torch.argmax(batch["positions"]))
    pos = int(batch["positions"][row])
    assert int(batch["document_ids"][row]) == 0 and ids[pos] == int(batch["token_ids"][row])
    start = (pos // 127) * 127  # the window holding this position: BOS + 127 stream tokens
    window = torch.tensor([[tokenizer.bos_token_id, *ids[start:start + 127]]])
    again = read_sites(lm.model, window, [site])[site][0, pos - start + 1]
    torch.testing.assert_close(x[row], again.float(), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("argv, words", [
    (["--sites", "resid_pre/layer_6"], "cannot read site"),
    (["--sites", "resid_post/layer_6", "--dtype", "float16"], "float32 or bfloat16"),
    (["--sites", "resid_post/layer_6", "--max-tokens", "0"], "--max-tokens must be positive"),
    (["--sites", "resid_post/layer_6", "--text", "poems"], "cannot read text spec"),
])
def test_cli_cache_refuses_bad_input_before_loading_the_model(tmp_path, argv, words):
    from typer.testing import CliRunner

    from saescope.cli import app

    result = CliRunner().invoke(app, ["cache", "no-such-model", *argv, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_cli_cache_end_to_end_on_a_saved_tiny_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from saescope.cli import app

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, **{chr(29 + i): i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    fast.save_pretrained(folder)
    (tmp_path / "text.txt").write_text("to be or not to be, that is the question\n" * 4)
    argv = ["cache", str(folder), "--sites", "resid_post/layer_1", "--sites", "mlp_out/layer_2",
            "--text", f"file:{tmp_path / 'text.txt'}", "--out", str(tmp_path / "s"), "--context-len", "16",
            "--shard-rows", "30", "--dtype", "bfloat16", "--held-out-fraction", "0"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    index = StoreIndex.load(tmp_path / "s")
    assert index.complete and index.dtype == "bfloat16" and set(index.sites) == {"resid_post/layer_1",
                                                                              "mlp_out/layer_2"}
    assert index.rows == len(fast.encode((tmp_path / "text.txt").read_text(), add_special_tokens=False))
    assert f"norm scale C = {index.sites['mlp_out/layer_2'].norm_scale:.6g}" in result.output
    before = tree(tmp_path / "s")
    again = CliRunner().invoke(app, argv)  # finished store: the same command changes nothing
    assert again.exit_code == 0 and tree(tmp_path / "s") == before
    batch = next(iter(ActivationLoader(tmp_path / "s", batch_size=16, output=LoaderOutput(with_tokens=True))))
    assert batch["resid_post/layer_1"].shape == (16, 32) and batch["mlp_out/layer_2"].shape == (16, 32)


def test_caching_mlp_in_folds_the_norm_gain_first(tmp_path):
    """Transcoder inputs are gain-free (App. B): the cached mlp_in rows have RMS 1 over d (x / rms(x))."""
    from saescope.folding import mlp_in_is_folded

    lm = tiny_loaded()
    assert not mlp_in_is_folded(lm.model)
    index = cache_activations(lm, DOCS, ["mlp_in/layer_1", "mlp_out/layer_1"], tmp_path / "s", context_len=16,
                              progress=False, held_out_fraction=0.0)
    assert mlp_in_is_folded(lm.model) and index.settings["mlp_in_folded"]
    rows = read_store_with_safetensors(tmp_path / "s")["mlp_in/layer_1"].double()
    rms = rows.square().mean(1).sqrt()
    # Gemma's RMSNorm: x / sqrt(mean(x²) + eps), so the RMS is just below 1
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
