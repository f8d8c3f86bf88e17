"""saescope's own format: ``sae.safetensors`` (the five parameters by their paper names) + ``saescope.json``.

``saescope.json`` holds the :class:`~saescope.config.SAEConfig` (architecture, d_in, d_sae, d_out, site, model,
norm scale, standardized or not, training summary) and a format version. Weights keep their dtype, so a
saved SAE loads back bit for bit. Transcoders store ``W_dec [d_sae, d_out]`` and, with a skip connection,
``W_skip [d_in, d_out]``; their files say ``format_version`` 2 (older saescope versions refuse them by name
instead of misreading them). SAE files stay version 1 and do not write ``d_out``, so older versions read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from saescope.config import SAEConfig
from saescope.errors import SAEFileError
from saescope.formats.checks import check_parameters, read_json, read_safetensors
from saescope.formats.modules import module_from_parameters, upgrade_legacy_config
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.transcoder import SKIP_NAME
from saescope.version import __version__

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "saescope.json"
FORMAT_VERSION = 2        # the newest this code reads and writes (2: transcoders with d_out / W_skip)


def is_native(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def save_native(sae: JumpReLUSAE, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in sae.state_tensors().items()}
    version = 2 if sae.config.is_transcoder else 1
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "saescope", "version": str(version)})
    dumped = sae.config.model_dump(mode="json")
    if dumped.get("d_out") is None:
        dumped.pop("d_out", None)
    config = {"format": "saescope", "format_version": version, "saescope_version": __version__, **dumped}
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
    config = upgrade_legacy_config(config)
    weights = folder / WEIGHTS_FILE
    tensors = read_safetensors(weights)
    params = check_parameters(weights, tensors, expect_d_in=expect_d_in, expect_d_sae=config.d_sae,
                              expect_d_out=config.d_out if config.is_transcoder else None,
                              transcoder=config.is_transcoder, site=config.site)
    if params["W_enc"].shape[0] != config.d_in:
        raise SAEFileError(weights, f"has d_in {params['W_enc'].shape[0]}", key="W_enc",
                           expected=f"d_in {config.d_in} as {config_path.name} says")
    has_skip = SKIP_NAME in params
    if has_skip != (config.architecture == "jumprelu_skip_transcoder"):
        raise SAEFileError(weights, "holds a W_skip matrix" if has_skip else "has no W_skip matrix", key=SKIP_NAME,
                           expected=f"what {config_path.name} says: architecture {config.architecture!r}")
    return module_from_parameters(params, config, device=device)
