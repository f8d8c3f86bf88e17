"""The Gemma Scope 2 release format (Gemma 3, Dec 2025): ``params.safetensors`` with lower-case keys
``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``, plus ``config.json``
(``architecture: "jump_relu"``, ``model_name``, ``hf_hook_point_in``; ``shared/reference/formats.md``).

Like Gemma Scope 1 the parameters are standardized (Appendix A); saving standardizes first.
Folders in the release are ``<site>/layer_<L>_width_<W>_l0_<small|medium|big>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from saescope import __version__
from saescope.config import SAEConfig
from saescope.errors import SAEFileError
from saescope.formats.checks import check_parameters, read_json, read_safetensors
from saescope.formats.gemma_scope import width_name
from saescope.sae.jumprelu import PARAMETER_NAMES, JumpReLUSAE, dtype_name

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
KEYS = {"W_enc": "w_enc", "b_enc": "b_enc", "W_dec": "w_dec", "b_dec": "b_dec", "threshold": "threshold"}

# Hugging Face module paths of the Gemma sites, as Gemma Scope 2's config.json names them
HF_HOOK_POINTS = {
    "resid_post": "model.layers.{layer}.output",
    "attn_out": "model.layers.{layer}.self_attn.o_proj.input",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
    "mlp_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
}


def release_folder(root: str | Path, site: str, layer: int, d_sae: int, size: str) -> Path:
    """``<root>/<site>/layer_<L>_width_<W>_l0_<size>`` with ``size`` one of small, medium, big."""
    return Path(root) / site / f"layer_{layer}_width_{width_name(d_sae)}_l0_{size}"


def is_gemma_scope_2(folder: Path) -> bool:
    return (folder / PARAMS_FILE).is_file()


def save_gemma_scope_2(sae: JumpReLUSAE, folder: Path) -> Path:
    if not sae.config.standardized:
        sae = sae.standardize()
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.config
    tensors = {KEYS[name]: t.contiguous().cpu() for name, t in sae.state_tensors().items()}
    save_file(tensors, str(folder / PARAMS_FILE))
    hook = c.hook_point or (HF_HOOK_POINTS[c.site].format(layer=c.layer)
                            if c.site in HF_HOOK_POINTS and c.layer is not None else None)
    config = {"architecture": "jump_relu", "model_name": c.model, "hf_hook_point_in": hook,
              "hf_hook_point_out": hook, "affine_connection": False, "width": c.d_sae,
              "saescope_version": __version__, "saescope_config": c.model_dump(mode="json")}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_gemma_scope_2(folder: Path, *, expect_d_in: int | None = None,
                       device: torch.device | str | None = None) -> JumpReLUSAE:
    config_path = folder / CONFIG_FILE
    cfg = read_json(config_path) if config_path.is_file() else {}
    architecture = cfg.get("architecture", "jump_relu")
    if architecture not in ("jump_relu", "jumprelu"):
        raise SAEFileError(config_path, f"describes a '{architecture}' model", key="architecture",
                           expected="'jump_relu'")
    if cfg.get("affine_connection"):
        raise SAEFileError(config_path, "describes a skip transcoder (affine_connection true)",
                           key="affine_connection", expected="a JumpReLU SAE; transcoders load elsewhere")
    path = folder / PARAMS_FILE
    params = check_parameters(path, read_safetensors(path), KEYS, expect_d_in=expect_d_in)
    d_in, d_sae = params["W_enc"].shape
    hook = cfg.get("hf_hook_point_in")
    site, layer = None, None
    for name, template in HF_HOOK_POINTS.items():
        match = re.match("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$", hook or "")
        if match:
            site, layer = name, int(match.group(1))
    config = SAEConfig(d_in=d_in, d_sae=d_sae, norm_scale=1.0, apply_b_dec_to_input=False, standardized=True,
                       dtype=dtype_name(params["W_enc"].dtype), model=cfg.get("model_name"), site=site,
                       layer=layer, hook_point=hook, training={"source": "gemma-scope-2", "path": str(folder)})
    saved = cfg.get("saescope_config")
    if isinstance(saved, dict):
        keep = {k: saved[k] for k in ("site", "layer", "model", "hook_point", "training", "bandwidth")
                if saved.get(k) is not None}
        config = config.model_copy(update=keep)
    return JumpReLUSAE.from_parameters({n: params[n] for n in PARAMETER_NAMES}, config, device=device)
