"""The Gemma Scope 2 release format (Gemma 3, Dec 2025): ``params.safetensors`` with lower-case keys
``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``, plus ``config.json``
(``architecture: "jump_relu"``, ``type`` (``sae`` / ``transcoder``), ``model_name``, ``hf_hook_point_in``,
``hf_hook_point_out``, ``affine_connection``, ``width``, ``l0``; ``shared/reference/formats.md``, and release
config.json files quoted in public code, e.g. ``{"hf_hook_point_in": "model.layers.17.output",
"hf_hook_point_out": "model.layers.17.output", "width": 65536, "architecture": "jump_relu", "l0": 60,
"affine_connection": false, "type": "sae"}``).

Like Gemma Scope 1 the parameters are standardized (Appendix A); saving standardizes first.
Folders in the release are ``<site>/layer_<L>_width_<W>_l0_<small|medium|big>``; transcoders live under
``transcoder/`` (``transcoder_all/`` in the release), skip transcoders with the suffix ``_affine``.

Transcoders: ``w_dec [d_sae, d_out]``, ``b_dec [d_out]``; a skip transcoder also holds
``affine_skip_connection [d_in, d_out]`` (our ``W_skip``, same orientation) and says ``affine_connection: true``;
``hf_hook_point_in`` is ``model.layers.<L>.pre_feedforward_layernorm.output`` and ``hf_hook_point_out``
``model.layers.<L>.post_feedforward_layernorm.output``. (Key and config names as SAELens 6.54's
``gemma_3_sae_huggingface_loader`` reads the release: it transposes the skip matrix into its own
``W_skip [d_out, d_in]``; its folder-name fallback marks ``_affine`` folders as skip transcoders.)
A file is read as a transcoder when it holds the skip matrix, says ``affine_connection: true``, has an
output hook point other than its input one, a ``w_dec`` of another width than ``w_enc`` reads, or sits in a
``transcoder*``/``clt`` site folder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from saescope.config import SAEConfig
from saescope.errors import SAEFileError
from saescope.formats.checks import check_parameters, read_json, read_safetensors
from saescope.formats.gemma_scope import width_name
from saescope.formats.modules import module_from_parameters
from saescope.sae.jumprelu import JumpReLUSAE, dtype_name
from saescope.version import __version__

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
KEYS = {"W_enc": "w_enc", "b_enc": "b_enc", "W_dec": "w_dec", "b_dec": "b_dec", "threshold": "threshold",
        "W_skip": "affine_skip_connection"}
TRANSCODER_SITE = "transcoder"

# Hugging Face module paths of the Gemma sites, as Gemma Scope 2's config.json names them
HF_HOOK_POINTS = {
    "resid_post": "model.layers.{layer}.output",
    "attn_out": "model.layers.{layer}.self_attn.o_proj.input",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
    "mlp_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
}


def release_folder(root: str | Path, site: str, layer: int, d_sae: int, size: str, *, affine: bool = False) -> Path:
    """``<root>/<site>/layer_<L>_width_<W>_l0_<size>`` with ``size`` one of small, medium, big; skip transcoders
    (``affine``) get the release's ``_affine`` suffix."""
    return Path(root) / site / f"layer_{layer}_width_{width_name(d_sae)}_l0_{size}{'_affine' if affine else ''}"


def hook_points(config: SAEConfig) -> tuple[str | None, str | None]:
    """``(hf_hook_point_in, hf_hook_point_out)`` for a config: an SAE reads and writes one hook point; a
    transcoder reads ``mlp_in`` (the pre-feedforward norm's output) and writes ``mlp_out`` of its layer."""
    c = config
    hook_in = c.hook_point or (HF_HOOK_POINTS[c.site].format(layer=c.layer)
                               if c.site in HF_HOOK_POINTS and c.layer is not None else None)
    if not c.is_transcoder:
        return hook_in, hook_in
    hook_out = HF_HOOK_POINTS["mlp_out"].format(layer=c.layer) if c.layer is not None else None
    return hook_in, hook_out


def site_from_hook_point(hook: str | None) -> tuple[str | None, int | None]:
    """``model.layers.12.output`` → ``("resid_post", 12)``; unknown hook points give ``(None, None)``."""
    for name, template in HF_HOOK_POINTS.items():
        match = re.match("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$", hook or "")
        if match:
            return name, int(match.group(1))
    return None, None


def is_gemma_scope_2(folder: Path) -> bool:
    return (folder / PARAMS_FILE).is_file()


def save_gemma_scope_2(sae: JumpReLUSAE, folder: Path) -> Path:
    if not sae.config.standardized:
        sae = sae.standardize()
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.config
    tensors = {KEYS[name]: t.contiguous().cpu() for name, t in sae.state_tensors().items()}
    save_file(tensors, str(folder / PARAMS_FILE))
    hook_in, hook_out = hook_points(c)
    config = {"architecture": "jump_relu", "type": "transcoder" if c.is_transcoder else "sae",
              "model_name": c.model, "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out,
              "affine_connection": c.architecture == "jumprelu_skip_transcoder", "width": c.d_sae}
    l0 = c.training.get("target_l0", c.training.get("final_l0"))
    if isinstance(l0, (int, float)) and math.isfinite(l0):
        config["l0"] = round(l0)
    config.update({"saescope_version": __version__, "saescope_config": c.model_dump(mode="json")})
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
    path = folder / PARAMS_FILE
    tensors = read_safetensors(path)
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    w_enc, w_dec = tensors.get(KEYS["W_enc"]), tensors.get(KEYS["W_dec"])
    wider = w_enc is not None and w_dec is not None and w_enc.dim() == 2 and w_dec.dim() == 2 \
        and w_enc.shape[0] != w_dec.shape[1]
    site_folder = folder.parent.name.lower()
    transcoder = (KEYS["W_skip"] in tensors or bool(cfg.get("affine_connection")) or wider
                  or cfg.get("type") == "transcoder"
                  or bool(hook_out and hook_in and hook_out != hook_in)
                  or site_folder.startswith(TRANSCODER_SITE) or site_folder.startswith("clt"))
    params = check_parameters(path, tensors, KEYS, expect_d_in=expect_d_in, transcoder=transcoder)
    skip = "W_skip" in params
    if "affine_connection" in cfg and bool(cfg["affine_connection"]) != skip:
        raise SAEFileError(path, "holds an affine_skip_connection" if skip else "has no affine_skip_connection",
                           key=KEYS["W_skip"],
                           expected=f"what {CONFIG_FILE} says: affine_connection {cfg['affine_connection']}")
    d_in, d_sae = params["W_enc"].shape
    site, layer = site_from_hook_point(hook_in)
    if transcoder and site is None and layer is None:
        match = re.match(r"^layer_(\d+)_", folder.name)
        site, layer = ("mlp_in", int(match.group(1))) if match else (None, None)
    config = SAEConfig(d_in=d_in, d_sae=d_sae, norm_scale=1.0, apply_b_dec_to_input=False, standardized=True,
                       dtype=dtype_name(params["W_enc"].dtype), model=cfg.get("model_name"), site=site,
                       layer=layer, hook_point=hook_in, training={"source": "gemma-scope-2", "path": str(folder)},
                       architecture=("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder") if transcoder
                       else "jumprelu", d_out=int(params["W_dec"].shape[1]) if transcoder else None)
    saved = cfg.get("saescope_config")
    if isinstance(saved, dict):
        keep = {k: saved[k] for k in ("site", "layer", "model", "hook_point", "training", "bandwidth")
                if saved.get(k) is not None}
        config = config.model_copy(update=keep)
    return module_from_parameters(params, config, device=device)
