"""Text sources, the held-out split and packing into windows."""

from __future__ import annotations

import json

import pytest
import torch

from saescope.corpus import (
    Document,
    batch_windows,
    documents_from_spec,
    hf_dataset_documents,
    interleave_documents,
    pack_windows,
    python_documents,
    shakespeare_documents,
    split_documents,
    text_file_documents,
)
from saescope.errors import SaescopeError

BOS, EOS, PAD = 2, 1, 0


class CharTokenizer:
    """One token per character (ids 10 + ord % 200): an independent, predictable tokenizer."""

    bos_token_id = BOS
    eos_token_id = EOS
    pad_token_id = PAD

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [10 + ord(ch) % 200 for ch in text]


def _docs(lengths):
    return [Document(id=f"d{i}", text="abcdefghij"[i % 10] * n) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("context_len", [2, 5, 16])
def test_pack_windows_reassembles_the_stream(context_len):
    tok = CharTokenizer()
    docs = _docs([7, 1, 30, 4, 12])
    windows = list(pack_windows(docs, tok, context_len=context_len))
    stream, doc_ids, positions, mask = [], [], [], []
    for window in windows:
        assert window.input_ids.shape == (context_len,) and window.input_ids.dtype == torch.long
        assert window.input_ids[0] == BOS and not window.mask[0]
        assert window.document_ids[0] == -1 and window.positions[0] == -1
        body = window.input_ids[1:] != PAD
        stream += window.input_ids[1:][body].tolist()
        doc_ids += window.document_ids[1:][body].tolist()
        positions += window.positions[1:][body].tolist()
        mask += window.mask[1:][body].tolist()
        assert not window.mask[1:][~body].any()  # padding is masked
    expected, expected_docs, expected_pos, expected_mask = [], [], [], []
    for index, doc in enumerate(docs):
        tokens = tok.encode(doc.text, add_special_tokens=False) + [EOS]
        expected += tokens
        expected_docs += [index] * len(tokens)
        expected_pos += list(range(len(tokens)))
        expected_mask += [True] * (len(tokens) - 1) + [False]  # EOS masked
    assert stream == expected
    assert doc_ids == expected_docs
    assert positions == expected_pos
    assert mask == expected_mask
    # only the final window may hold padding
    assert all((w.input_ids != PAD).all() for w in windows[:-1])


def test_pack_windows_drop_last_and_batching():
    tok = CharTokenizer()
    docs = _docs([10, 10])  # 22 stream tokens with EOS
    padded = list(pack_windows(docs, tok, context_len=8))  # bodies of 7: 3 full + one of 1
    dropped = list(pack_windows(docs, tok, context_len=8, drop_last=True))
    assert len(padded) == 4 and len(dropped) == 3
    assert padded[-1].mask.sum() == 0  # the lone leftover is the last EOS
    batches = list(batch_windows(padded, 3))
    assert [b.input_ids.shape for b in batches] == [(3, 8), (1, 8)]
    assert torch.equal(batches[0].mask[1], padded[1].mask)


def test_pack_windows_is_streaming():
    """It must not read the whole corpus before yielding the first window."""
    tok = CharTokenizer()
    read = []

    def endless():
        i = 0
        while True:
            read.append(i)
            yield Document(id=str(i), text="x" * 50)
            i += 1

    first = next(iter(pack_windows(endless(), tok, context_len=32)))
    assert first.input_ids.shape == (32,)
    assert len(read) == 1


def test_pack_windows_masks_special_tokens_inside_text():
    class Tok(CharTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [BOS if ch == "^" else 50 for ch in text]

    window = next(pack_windows([Document("a", "ab^cd")], Tok(), context_len=8))
    assert window.input_ids.tolist() == [BOS, 50, 50, BOS, 50, 50, EOS, PAD]
    assert window.mask.tolist() == [False, True, True, False, True, True, False, False]


def test_pack_windows_rejects_bad_context_len():
    with pytest.raises(SaescopeError, match="context_len"):
        next(pack_windows(_docs([3]), CharTokenizer(), context_len=1))


def test_split_is_deterministic_disjoint_and_by_document():
    docs = [Document(id=f"doc-{i}", text=str(i)) for i in range(2000)]
    train = list(split_documents(docs, 0.1, part="train"))
    held = list(split_documents(docs, 0.1, part="held_out"))
    assert {d.id for d in train}.isdisjoint({d.id for d in held})
    assert len(train) + len(held) == len(docs)
    assert 150 < len(held) < 250
    # independent of order and of which other documents are read
    reversed_held = list(split_documents(reversed(docs), 0.1, part="held_out"))
    assert {d.id for d in reversed_held} == {d.id for d in held}
    subset_held = list(split_documents(docs[:100], 0.1, part="held_out"))
    assert {d.id for d in subset_held} == {d.id for d in held if int(d.id.split("-")[1]) < 100}
    assert list(split_documents(docs, 0.0, part="held_out")) == []
    assert len(list(split_documents(docs, 1.0, part="held_out"))) == 2000
    with pytest.raises(SaescopeError):
        list(split_documents(docs, 1.5))
    with pytest.raises(SaescopeError):
        list(split_documents(docs, 0.1, part="test"))


def test_shakespeare_has_38_plays():
    plays = list(shakespeare_documents())
    assert len(plays) == 38
    assert len({p.id for p in plays}) == 38
    ids = {p.id for p in plays}
    assert "shakespeare/tragedies/hamlet" in ids
    hamlet = next(p for p in plays if p.id == "shakespeare/tragedies/hamlet")
    assert "HAMLET" in hamlet.text.upper() and len(hamlet.text) > 50_000
    assert [p.id for p in plays] == sorted(p.id for p in plays)


def test_python_documents_are_stdlib_source():
    docs = python_documents()
    first = [next(docs) for _ in range(50)]
    assert all(d.id.startswith("python/") and d.id.endswith(".py") for d in first)
    ids = {d.id for d in python_documents()}
    assert "python/json/decoder.py" in ids
    assert not any("site-packages" in i for i in ids)


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello there", encoding="utf-8")
    with (tmp_path / "b.jsonl").open("w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    docs = list(text_file_documents([tmp_path]))
    assert [d.text for d in docs] == ["hello there", "one", "two"]
    assert docs[1].id.endswith("b.jsonl:1") and docs[2].id.endswith("b.jsonl:3")
    assert [d.text for d in documents_from_spec(f"file:{tmp_path / 'a.txt'}")] == ["hello there"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(SaescopeError, match="bad.jsonl:1.*'text'"):
        list(text_file_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(SaescopeError, match="no such"):
        text_file_documents(tmp_path / "missing.txt")
    (tmp_path / "c.csv").write_text("x", encoding="utf-8")
    with pytest.raises(SaescopeError, match=r"\.txt"):
        text_file_documents(tmp_path / "c.csv")


def test_documents_from_spec():
    it = documents_from_spec("python+shakespeare")
    assert next(it).id.startswith("python/")
    with pytest.raises(SaescopeError, match="cannot read text spec"):
        documents_from_spec("wikipedia")
    with pytest.raises(SaescopeError, match="empty"):
        documents_from_spec("")
    with pytest.raises(SaescopeError, match="cannot read text spec"):
        documents_from_spec("mix:shakespeare+wikipedia")   # every part checked before any is read


def test_interleave_gives_equal_characters_from_each_source():
    a = [Document(f"a/{i}", "x" * 100) for i in range(30)]
    b = [Document(f"b/{i}", "y" * 7) for i in range(500)]
    c = [Document("c/0", "z" * 250)]
    out = list(interleave_documents([a, b, c]))
    assert sorted(d.id for d in out) == sorted(d.id for d in a + b + c)       # nothing lost or repeated
    for source in (a, b):                                                      # each source in its own order
        ids = [d.id for d in source]
        assert [d.id for d in out if d.id in set(ids)] == ids
    # the closed form: after each document, no source is behind another live one by more than one document
    given = {"a": 0, "b": 0, "c": 0}
    longest = {"a": 100, "b": 7, "c": 250}
    a_ends = max(i for i, d in enumerate(out) if d.id.startswith("a/"))   # a runs out first
    for i, d in enumerate(out[:a_ends + 1]):
        given[d.id[0]] += len(d.text)
        if i > 3 and given["c"] < 250:  # while c has text left, it is never more than a document behind
            assert given["c"] >= min(given["a"], given["b"]) - longest["c"]
        assert abs(given["a"] - given["b"]) <= max(longest["a"], longest["b"])
    assert out[0].id == "a/0" and out[1].id == "b/0" and out[2].id == "c/0"   # ties: the earlier source
    assert all(d.id.startswith("b/") for d in out[a_ends + 1:])               # then b goes on alone


def test_mix_spec_interleaves_shakespeare_and_python():
    it = documents_from_spec("mix:shakespeare+python")
    first = [next(it) for _ in range(40)]
    chars = {"shakespeare": 0, "python": 0}
    for d in first:
        chars[d.id.split("/")[0]] += len(d.text)
    assert chars["python"] > 0 and chars["shakespeare"] > 0
    play = max(len(d.text) for d in first if d.id.startswith("shakespeare/"))
    assert abs(chars["python"] - chars["shakespeare"]) <= play


def test_hf_dataset_streamed_and_offline_error(monkeypatch):
    import datasets

    calls = {}

    def fake_load(name, config=None, *, split, streaming):
        calls.update(name=name, split=split, streaming=streaming)
        return iter([{"text": "first", "id": 1}, {"text": "second", "id": 2}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = list(documents_from_spec("hf:someone/corpus:validation"))
    assert calls == {"name": "someone/corpus", "split": "validation", "streaming": True}
    assert [(d.id, d.text) for d in docs] == [("hf:someone/corpus/validation/0", "first"),
                                             ("hf:someone/corpus/validation/1", "second")]
    with pytest.raises(SaescopeError, match="no column 'body'"):
        list(hf_dataset_documents("someone/corpus", column="body"))

    def offline(*_a, **_k):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SaescopeError, match="network access.*shakespeare"):
        hf_dataset_documents("someone/corpus")
