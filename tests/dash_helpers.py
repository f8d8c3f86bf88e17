"""Shared fixtures for the dashboard, browse and steer tests: a tiny word-level Llama, a store, an SAE."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "in", "park", "a", "bird", "sang", "song", "sun", "rose", "over", "hill", "king", "queen", "said", "to", "his", "her", "and", "of", "river", "water", "flows", "down", "sea", "ship", "sails", "far", "away", "night", "stars", "shine", "bright"]
SCRIPT = "<script>alert('x')</script>"


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3}
    for w in [*WORDS, SCRIPT, "&amp;"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>")


def make_model(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def documents(n: int = 40, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)]
        if d == 3:
            words.insert(2, SCRIPT)
        docs.append(" ".join(words))
    return docs


def write_store(path: Path, model, tokenizer, site: str, docs: list[str], shard_rows: int = 64) -> None:
    """A real store: each document's activations at ``site`` (BOS dropped), rows in document order."""
    from saescope.sites import read_sites, site_width
    from saescope.store import StoreWriter

    writer = StoreWriter(path, {site: site_width(model, site)}, shard_rows=shard_rows, model="tiny")
    for doc_id, text in enumerate(docs):
        ids = tokenizer(text, return_tensors="pt").input_ids
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        acts = read_sites(model, ids, [site])[site][0, 1:]
        n = acts.shape[0]
        writer.add({site: acts}, token_ids=ids[0, 1:], document_ids=torch.full((n,), doc_id),
                   positions=torch.arange(1, n + 1))
    writer.close()


def make_sae(d_in: int, d_sae: int, site: str, model_name: str = "tiny", seed: int = 0, norm_scale: float = 1.0):
    from saescope.config import Site
    from saescope.sae.jumprelu import JumpReLUSAE

    parsed = Site.parse(site)
    sae = JumpReLUSAE(d_in, d_sae, norm_scale=norm_scale, seed=seed, site=parsed.kind, layer=parsed.layer,
                      model=model_name)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g))
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(1.2)
    return sae
