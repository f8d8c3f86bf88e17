"""saescope's own format: ``sae.safetensors`` (the five parameters by their paper names) + ``saescope.json``.

``saescope.json`` holds the :class:`~saescope.config.SAEConfig` (architecture, d_in, d_sae, site, model,
norm scale, standardized or not, training summary) and a format version. Weights keep their dtype, so a
saved SAE loads back bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from saescope import __version__
from saescope.config import SAEConfig
from saescope.errors import SAEFileError
from saescope.formats.checks import check_parameters, read_json, read_safetensors
from saescope.sae.jumprelu import JumpReLUSAE

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "saescope.json"
FORMAT_VERSION = 1


def is_native(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def save_native(sae: JumpReLUSAE, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in sae.state_tensors().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "saescope", "version": str(FORMAT_VERSION)})
    config = {"format": "saescope", "format_version": FORMAT_VERSION, "saescope_version": __version__,
              **sae.config.model_dump(mode="json")}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_native(folder: Path, *, expect_d_in: int | None = None, device: torch.device | str | None = None
                ) -> JumpReLUSAE:
    config_path = folder / CONFIG_FILE
    raw = read_json(config_path)
    version = raw.pop("format_version", None)
    raw.pop("format", None)
    raw.pop("saescope_version", None)
    if version is not None and version > FORMAT_VERSION:
        raise SAEFileError(config_path, f"has format_version {version}",
                           expected=f"<= {FORMAT_VERSION}; upgrade saescope to read it")
    try:
        config = SAEConfig(**raw)
    except (ValidationError, TypeError) as exc:
        raise SAEFileError(config_path, f"is not a valid SAE config:\n{exc}") from exc
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    params = check_parameters(folder / WEIGHTS_FILE, tensors, expect_d_in=expect_d_in,
                              expect_d_sae=config.d_sae, site=config.site)
    if params["W_enc"].shape[0] != config.d_in:
        raise SAEFileError(folder / WEIGHTS_FILE, f"has d_in {params['W_enc'].shape[0]}", key="W_enc",
                           expected=f"d_in {config.d_in} as {config_path.name} says")
    return JumpReLUSAE.from_parameters(params, config, device=device)
