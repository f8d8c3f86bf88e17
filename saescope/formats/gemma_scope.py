"""The Gemma Scope release format (Gemma 2, 2024): ``params.npz`` with ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``, in ``layer_<L>/width_<W>/average_l0_<k>/``.

The parameters are *standardized* (Gemma Scope Appendix A): they read raw activations, with no norm scale
and no pre-encoder bias. Saving an SAE that is not yet standardized standardizes it first (eqs. 7-9), so
the file gives the same reconstructions (latents are then ``C ×`` the training-time latents). The format
holds no metadata: site, model and training summary are not kept.

Transcoders (the ``gemma-scope-<size>-pt-transcoders`` release) use the same keys with ``W_dec [d_sae, d_out]``;
a file is read as a transcoder when ``W_dec`` writes another width than ``W_enc`` reads or when a folder on its
path names transcoders (then it reads ``mlp_in`` of its layer). The format has no key for a skip matrix, so a
skip transcoder is refused (save it as ``gemma-scope-2``, ``saelens`` or ``native``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saescope.config import SAEConfig
from saescope.errors import SaescopeError
from saescope.formats.checks import check_parameters, read_npz
from saescope.formats.modules import module_from_parameters
from saescope.sae.jumprelu import JumpReLUSAE, dtype_name

PARAMS_FILE = "params.npz"


def width_name(d_sae: int) -> str:
    """The release's width folder label: powers of two ≥ 1024 in (truncated) thousands or millions
    (16384 → ``16k``, 131072 → ``131k``, 1048576 → ``1m``); any other width as is (1500 → ``1500``), so two
    different widths never share a label."""
    if d_sae >= 1024 and d_sae & (d_sae - 1) == 0:
        return f"{d_sae // 10**6}m" if d_sae >= 10**6 else f"{d_sae // 1000}k"
    return str(d_sae)


def release_folder(root: str | Path, layer: int, d_sae: int, average_l0: float) -> Path:
    """``<root>/layer_<L>/width_<W>/average_l0_<k>`` with ``k`` the measured mean L0 rounded."""
    return Path(root) / f"layer_{layer}" / f"width_{width_name(d_sae)}" / f"average_l0_{round(average_l0)}"


def is_gemma_scope(folder: Path) -> bool:
    return (folder / PARAMS_FILE).is_file()


def save_gemma_scope(sae: JumpReLUSAE, folder: Path) -> Path:
    if getattr(sae, "W_skip", None) is not None:
        raise SaescopeError("the Gemma Scope params.npz format has no skip matrix, so it cannot hold a skip "
                            "transcoder (W_skip); save it with format='gemma-scope-2' (its affine_skip_connection), "
                            "'saelens' or 'native'")
    if not sae.config.standardized:
        sae = sae.standardize()
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, t in sae.state_tensors().items():
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.to(torch.float32)   # numpy has no bfloat16; float32 holds it exactly
        arrays[name] = t.cpu().numpy()
    with open(folder / PARAMS_FILE, "wb") as fh:
        np.savez(fh, **arrays)
    return folder


def load_gemma_scope(folder: Path, *, expect_d_in: int | None = None,
                     device: torch.device | str | None = None) -> JumpReLUSAE:
    path = folder / PARAMS_FILE
    arrays = read_npz(path)
    named_transcoder = _transcoder_folder(folder)
    w_enc, w_dec = arrays.get("W_enc"), arrays.get("W_dec")
    wider = (getattr(w_enc, "ndim", 0) == 2 and getattr(w_dec, "ndim", 0) == 2 and w_enc.shape[0] != w_dec.shape[1])
    transcoder = named_transcoder or wider
    params = check_parameters(path, arrays, expect_d_in=expect_d_in, transcoder=transcoder)
    d_in, d_sae = params["W_enc"].shape
    layer = _layer_from_path(folder)
    config = SAEConfig(d_in=d_in, d_sae=d_sae, norm_scale=1.0, apply_b_dec_to_input=False, standardized=True,
                       dtype=dtype_name(params["W_enc"].dtype), layer=layer,
                       site="mlp_in" if transcoder and layer is not None else None,
                       architecture="jumprelu_transcoder" if transcoder or "W_skip" in params else "jumprelu",
                       d_out=int(params["W_dec"].shape[1]) if transcoder or "W_skip" in params else None,
                       training={"source": "gemma-scope params.npz", "path": str(folder)})
    return module_from_parameters(params, config, device=device)


def _layer_from_path(folder: Path) -> int | None:
    for part in folder.resolve().parts:
        if part.startswith("layer_") and part[6:].isdigit():
            return int(part[6:])
    return None


def _transcoder_folder(folder: Path) -> bool:
    """True when the folder holding ``layer_<L>`` (the site folder, e.g. ``transcoder/``) or a hub cache folder
    (``models--google--gemma-scope-2b-pt-transcoders``) names transcoders."""
    parts = folder.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and "transcoder" in part.lower():
            return True
        if part.startswith("layer_") and part[6:].isdigit() and i > 0 and "transcoder" in parts[i - 1].lower():
            return True
    return False
