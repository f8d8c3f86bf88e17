"""The SAELens format (``SAE.save_model`` / ``SAE.load_from_disk``, SAELens 6.x): a folder with ``cfg.json``
and ``sae_weights.safetensors`` (keys ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``,
``threshold``).

SAELens computes ``z = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc`` and ``x̂ = f W_dec + b_dec`` on the
activations as given (``normalize_activations: "none"``); it has no constant norm scale. So an SAE with
``C ≠ 1`` is written with ``C`` folded in (:func:`saescope.sae.standardize.fold_norm_scale`: the same
reconstructions; latents ``C ×`` the training-time latents), keeping the pre-encoder bias.

Transcoders are written as SAELens's ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``: ``d_out`` beside
``d_in``, ``W_dec [d_sae, d_out]``, ``apply_b_dec_to_input: false`` (SAELens refuses it for transcoders),
``metadata.hook_name_out`` (``blocks.<L>.hook_mlp_out``) and, for the skip variant, ``W_skip`` stored as SAELens
keeps it, ``[d_out, d_in]`` (the transpose of ours; SAELens computes ``x W_skipᵀ``). Their ``C`` is folded
by the transcoder's own standardization (it leaves ``W_skip`` unchanged).

The facts here were read from SAELens 6.54 (``saes/transcoder.py``, (``saes/sae.py``, ``saes/jumprelu_sae.py``,
``loading/pretrained_sae_loaders.py``); the code is our own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saescope.config import SAEConfig
from saescope.errors import SAEFileError
from saescope.formats.checks import check_parameters, read_json, read_safetensors
from saescope.formats.modules import module_from_parameters
from saescope.sae.jumprelu import JumpReLUSAE, dtype_name
from saescope.sae.transcoder import SKIP_NAME
from saescope.version import __version__

ARCHITECTURES = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder", "topk")   # SAELens names = ours
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION_WRITTEN = "6.54.12"   # the cfg layout we write is the one this SAELens version writes

# saescope site name -> TransformerLens hook name template (what SAELens uses as hook_name)
TRANSFORMERLENS_HOOKS = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.attn.hook_z",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_in": "blocks.{layer}.hook_mlp_in",
}
_HOOK_PATTERNS = [(site, re.compile("^" + re.escape(t).replace(re.escape("{layer}"), r"(\d+)") + "$"))
                  for site, t in TRANSFORMERLENS_HOOKS.items()]


def hook_name(site: str | None, layer: int | None) -> str | None:
    """The TransformerLens hook name SAELens uses for a saescope site, if there is one."""
    if site is None or layer is None or site not in TRANSFORMERLENS_HOOKS:
        return None
    return TRANSFORMERLENS_HOOKS[site].format(layer=layer)


def site_from_hook_name(name: str | None) -> tuple[str | None, int | None]:
    for site, pattern in _HOOK_PATTERNS:
        match = pattern.match(name or "")
        if match:
            return site, int(match.group(1))
    return None, None


def is_saelens(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def save_saelens(sae: JumpReLUSAE, folder: Path, *, context_size: int | None = None,
                 prepend_bos: bool = True) -> Path:
    from saescope.sae.standardize import fold_norm_scale

    if sae.config.is_transcoder:
        if sae.config.norm_scale != 1.0:
            sae = sae.standardize()     # a transcoder has no pre-encoder bias: folding C is standardizing
    elif sae.config.norm_scale != 1.0:
        sae = fold_norm_scale(sae)
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.config
    tensors = {name: (t.T if name == SKIP_NAME else t).contiguous().cpu() for name, t in sae.state_tensors().items()}
    if c.architecture == "topk":        # SAELens's TopK SAE has no threshold (ours is 0: ReLU before TopK)
        tensors.pop("threshold")
    save_file(tensors, str(folder / WEIGHTS_FILE))
    cfg: dict[str, Any] = {
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.site == "attn_out" else "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION_WRITTEN,
            "sae_lens_training_version": None,
            "model_name": c.model,
            "hook_name": hook_name(c.site, c.layer) or c.hook_point,
            "hook_head_index": None,
            "context_size": context_size or c.training.get("context_size"),
            "prepend_bos": prepend_bos,
            "saescope_version": __version__,
            "saescope_config": c.model_dump(mode="json"),
        },
        "architecture": c.architecture,
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if c.is_transcoder:
        cfg["d_out"] = c.output_width
        cfg["metadata"]["hook_name_out"] = hook_name("mlp_out", c.layer) if c.site == "mlp_in" else None
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load_saelens(folder: Path, *, expect_d_in: int | None = None,
                 device: torch.device | str | None = None) -> JumpReLUSAE:
    cfg_path = folder / CFG_FILE
    cfg = read_json(cfg_path)
    architecture = cfg.get("architecture", "standard")   # SAELens < 6 defaults to "standard"
    if architecture not in ARCHITECTURES:
        raise SAEFileError(cfg_path, f"describes a '{architecture}' SAE", key="architecture",
                           expected=f"one of {', '.join(ARCHITECTURES)}; saescope reads JumpReLU SAEs and transcoders")
    transcoder = architecture not in ("jumprelu", "topk")
    topk = architecture == "topk"
    if topk and (not isinstance(cfg.get("k"), int) or cfg["k"] <= 0):
        raise SAEFileError(cfg_path, f"is {cfg.get('k')!r}", key="k", expected="a positive integer (TopK's k)")
    if topk and cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEFileError(cfg_path, "is true", key="rescale_acts_by_decoder_norm",
                           expected="false: fold the decoder norms into the weights in SAELens, then save again")
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None):
        raise SAEFileError(cfg_path, f"asks for run-time activation normalization '{normalize}'",
                           key="normalize_activations",
                           expected="'none': fold the scaling into the weights in SAELens, then save again")
    for key in ("d_in", "d_sae") + (("d_out",) if transcoder else ()):
        if not isinstance(cfg.get(key), int):
            raise SAEFileError(cfg_path, f"is {cfg.get(key)!r}", key=key, expected="a positive integer")
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SAEFileError(cfg_path, "is not an object", key="metadata", expected="a JSON object")

    def meta(key: str) -> Any:   # SAELens >= 6 nests these under "metadata"; older files keep them flat
        return metadata.get(key, cfg.get(key))

    weights_path = folder / WEIGHTS_FILE
    tensors = read_safetensors(weights_path)
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if topk and "threshold" not in tensors and "b_enc" in tensors:      # TopK: ReLU, then the k largest
        tensors["threshold"] = torch.zeros_like(tensors["b_enc"])
    skip = architecture == "jumprelu_skip_transcoder"
    if skip != (SKIP_NAME in tensors):
        raise SAEFileError(weights_path, "holds a W_skip matrix" if not skip else "has no W_skip matrix",
                           key=SKIP_NAME, expected=f"what {CFG_FILE} says: architecture {architecture!r}")
    params = check_parameters(weights_path, tensors, expect_d_in=expect_d_in, expect_d_sae=cfg["d_sae"],
                              expect_d_out=cfg["d_out"] if transcoder else None, transcoder=transcoder,
                              transposed=(SKIP_NAME,))
    if params["W_enc"].shape[0] != cfg["d_in"]:
        raise SAEFileError(weights_path, f"has d_in {params['W_enc'].shape[0]}", key="W_enc",
                           expected=f"d_in {cfg['d_in']} as cfg.json says")
    site, layer = site_from_hook_name(meta("hook_name"))
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if transcoder and apply_b_dec:
        raise SAEFileError(cfg_path, "is true for a transcoder", key="apply_b_dec_to_input",
                           expected="false: a transcoder's b_dec lives in the output space")
    dtype = cfg.get("dtype", "float32")
    dtype = dtype.removeprefix("torch.") if isinstance(dtype, str) else "float32"
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        dtype = dtype_name(params["W_enc"].dtype)
    config = SAEConfig(
        d_in=cfg["d_in"], d_sae=cfg["d_sae"], norm_scale=1.0, apply_b_dec_to_input=apply_b_dec,
        standardized=not apply_b_dec, dtype=dtype, model=meta("model_name"), site=site, layer=layer,
        hook_point=meta("hook_name"), architecture=architecture, d_out=cfg["d_out"] if transcoder else None,
        k=cfg["k"] if topk else None,
        training={"source": "saelens", "sae_lens_version": meta("sae_lens_version"),
                  "context_size": meta("context_size")},
    )
    saved = metadata.get("saescope_config")
    if isinstance(saved, dict):   # written by saescope: keep its site/model/training summary
        keep = {k: saved[k] for k in ("site", "layer", "model", "hook_point", "training", "bandwidth")
                if saved.get(k) is not None}
        config = config.model_copy(update=keep)
    return module_from_parameters(params, config, device=device)
