"""The Gemma Scope release format (Gemma 2, 2024): ``params.npz`` with ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``, in ``layer_<L>/width_<W>/average_l0_<k>/``.

The parameters are *standardized* (Gemma Scope Appendix A): they read raw activations, with no norm scale
and no pre-encoder bias. Saving an SAE that is not yet standardized standardizes it first (eqs. 7-9), so
the file gives the same reconstructions (latents are then ``C ×`` the training-time latents). The format
holds no metadata: site, model and training summary are not kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saescope.config import SAEConfig
from saescope.formats.checks import check_parameters, read_npz
from saescope.sae.jumprelu import PARAMETER_NAMES, JumpReLUSAE, dtype_name

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
    params = check_parameters(path, read_npz(path), expect_d_in=expect_d_in)
    d_in, d_sae = params["W_enc"].shape
    layer = _layer_from_path(folder)
    config = SAEConfig(d_in=d_in, d_sae=d_sae, norm_scale=1.0, apply_b_dec_to_input=False, standardized=True,
                       dtype=dtype_name(params["W_enc"].dtype), layer=layer,
                       training={"source": "gemma-scope params.npz", "path": str(folder)})
    return JumpReLUSAE.from_parameters({n: params[n] for n in PARAMETER_NAMES}, config, device=device)


def _layer_from_path(folder: Path) -> int | None:
    for part in folder.resolve().parts:
        if part.startswith("layer_") and part[6:].isdigit():
            return int(part[6:])
    return None
