"""Reading and writing SAEs in the formats researchers use; :func:`load_sae` detects which.

| format          | files                                        | module          |
|-----------------|----------------------------------------------|-----------------|
| ``native``      | ``sae.safetensors`` + ``saescope.json``       | ``native``      |
| ``gemma-scope`` | ``params.npz`` (standardized)                 | ``gemma_scope`` |
| ``gemma-scope-2`` | ``params.safetensors`` + ``config.json``    | ``gemma_scope_2`` |
| ``saelens``     | ``sae_weights.safetensors`` + ``cfg.json``    | ``saelens``     |

Transcoders (``W_dec [d_sae, d_out]``) can be saved in every format and load back as
:class:`~saescope.sae.transcoder.JumpReLUTranscoder`; skip transcoders (``W_skip``) in every format but
``gemma-scope``, whose ``params.npz`` has no key for the skip matrix (:mod:`saescope.formats.modules`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from saescope.errors import SAEFileError
from saescope.formats.checks import looks_like_pickle
from saescope.formats.gemma_scope import is_gemma_scope, load_gemma_scope, save_gemma_scope
from saescope.formats.gemma_scope_2 import is_gemma_scope_2, load_gemma_scope_2, save_gemma_scope_2
from saescope.formats.hub import hub_folder, looks_like_repo_id
from saescope.formats.native import is_native, load_native, save_native
from saescope.formats.saelens import is_saelens, load_saelens, save_saelens
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.saving import register_saver

FORMATS = ("native", "gemma-scope", "gemma-scope-2", "saelens")
_SAVERS = {"native": save_native, "gemma-scope": save_gemma_scope, "gemma-scope-2": save_gemma_scope_2,
           "saelens": save_saelens}
_LOADERS = {"native": load_native, "gemma-scope": load_gemma_scope, "gemma-scope-2": load_gemma_scope_2,
            "saelens": load_saelens}
_DETECT = (("native", is_native), ("saelens", is_saelens), ("gemma-scope-2", is_gemma_scope_2),
           ("gemma-scope", is_gemma_scope))


def save_sae(sae: JumpReLUSAE, path: str | Path, format: str = "native") -> Path:
    """Write ``sae`` to the folder ``path`` in one of :data:`FORMATS`."""
    if format not in _SAVERS:
        raise ValueError(f"unknown SAE format {format!r}; choose one of {', '.join(FORMATS)}")
    if sae.config.architecture == "topk" and format not in ("native", "saelens"):
        raise ValueError(f"the {format} layout holds JumpReLU SAEs only; save a TopK SAE as native or saelens "
                         "(a BatchTopK SAE is a JumpReLU and saves in every format)")
    return _SAVERS[format](sae, Path(path))


def detect_format(path: str | Path) -> tuple[str, Path]:
    """The format of the SAE at ``path`` (a folder, or a file inside one) and its folder."""
    path = Path(path)
    if not path.exists():
        raise SAEFileError(path, "does not exist", expected="a folder holding an SAE")
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt") or (
            path.is_file() and path.suffix not in (".npz", ".safetensors", ".json") and looks_like_pickle(path)):
        raise SAEFileError(path, "is a pickle-based file; saescope never unpickles files",
                           expected="safetensors or .npz; convert it with safetensors.torch.save_file")
    for name, test in _DETECT:
        if test(folder):
            return name, folder
    present = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
    raise SAEFileError(folder, f"holds no SAE saescope can read (found: {present or 'nothing'})",
                       expected="saescope.json + sae.safetensors, params.npz, params.safetensors, "
                                "or cfg.json + sae_weights.safetensors")


def load_sae(path: str | Path, *, format: str | None = None, expect_d_in: int | None = None,
             device: torch.device | str | None = None, folder: str | None = None,
             revision: str | None = None, cache_dir: str | Path | None = None) -> JumpReLUSAE:
    """Load an SAE or transcoder from a folder in any of :data:`FORMATS` (detected unless ``format`` is given).

    ``expect_d_in`` is the width of the site you mean to use it on; a file made for another width is
    refused with a message naming the file and key. ``path`` may also be a hub repository id with ``folder``
    inside it, e.g. ``load_sae("google/gemma-scope-2-270m-pt", folder="resid_post/layer_12_width_16k_l0_medium")``
    (see :mod:`saescope.formats.hub`).
    """
    if folder is not None:
        if not looks_like_repo_id(str(path)):
            path = Path(path) / folder
        else:
            path = hub_folder(str(path), folder, revision=revision, cache_dir=cache_dir)
    elif looks_like_repo_id(str(path)):
        raise SAEFileError(Path(str(path)), "does not exist locally and looks like a hub repository id",
                           expected="load_sae(repo_id, folder='<site>/layer_<L>_width_<W>_l0_<size>')")
    detected, path_folder = detect_format(path)
    if format is not None and format != detected:
        if format not in _LOADERS:
            raise ValueError(f"unknown SAE format {format!r}; choose one of {', '.join(FORMATS)}")
        detected = format
    return _LOADERS[detected](path_folder, expect_d_in=expect_d_in, device=device)


register_saver(save_sae)  # JumpReLUSAE.save writes through this layer (saescope.sae.saving)

__all__ = ["FORMATS", "detect_format", "load_sae", "save_sae"]
