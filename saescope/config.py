"""Typed, validated configuration objects shared by the library and the CLI.

Defaults reproduce the Gemma Scope recipe (``shared/reference/gemma-scope-recipe.md``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPES = ("float32", "float64", "bfloat16", "float16")
ARCHITECTURES = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRANSCODER_ARCHITECTURES = ("jumprelu_transcoder", "jumprelu_skip_transcoder")


class SAEConfig(BaseModel):
    """Everything needed to rebuild an SAE besides its weights; stored beside them in every native file.

    ``norm_scale`` is the scalar ``C`` of Gemma Scope Appendix A (``x = x_raw / C`` with ``E‖x‖² = 1``).
    ``apply_b_dec_to_input`` is the pre-encoder subtraction of ``b_dec`` (on for SAEs, off for transcoders,
    App. B). A *standardized* SAE (Appendix A, eqs. 7-11) has ``norm_scale == 1`` and no pre-encoder bias.

    ``architecture`` says which module the weights belong to: ``jumprelu`` (an SAE), ``jumprelu_transcoder``
    (App. B: reads ``d_in``, writes ``d_out``) or ``jumprelu_skip_transcoder`` (Gemma Scope 2: plus an affine
    skip ``W_skip [d_in, d_out]``) or ``topk`` (a TopK SAE, with ``k``; :mod:`saescope.sae.topk`). ``d_out`` is None for an SAE (it writes what it reads, ``d_in``). Files
    written before these keys existed load as ``jumprelu`` with ``d_out`` None.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    architecture: Literal["jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder", "topk"] = "jumprelu"
    k: int | None = Field(None, gt=0, description="TopK SAEs: latents kept per token")
    d_in: int = Field(gt=0, description="width of the activation the SAE reads")
    d_sae: int = Field(gt=0, description="number of latents")
    d_out: int | None = Field(None, gt=0, description="width a transcoder writes; None for an SAE (= d_in)")
    norm_scale: float = Field(1.0, description="C: raw activations are divided by C before encoding")
    target_norm_scale: float | None = Field(
        None, description="transcoders: the target (mlp_out) is divided by this during training and the output "
        "multiplied by it; None: by norm_scale, the input's C (App. B)")
    apply_b_dec_to_input: bool = Field(True, description="subtract b_dec from the input before encoding")
    standardized: bool = Field(False, description="parameters folded for raw activations (Appendix A)")
    bandwidth: float = Field(0.001, gt=0, description="STE kernel bandwidth ε (JumpReLU paper)")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    model: str | None = Field(None, description="the language model the SAE was trained on")
    site: str | None = Field(None, description="site name, e.g. resid_post")
    layer: int | None = Field(None, ge=0, description="layer index of the site")
    hook_point: str | None = Field(None, description="Hugging Face module path of the site")
    training: dict[str, Any] = Field(default_factory=dict, description="summary of how it was trained")

    @field_validator("norm_scale", "target_norm_scale")
    @classmethod
    def _positive_finite(cls, value: float | None, info) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{info.field_name} must be a positive finite number, got {value!r}")
        return value

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODER_ARCHITECTURES

    @property
    def output_width(self) -> int:
        """The width of what the module writes: ``d_out`` for a transcoder, ``d_in`` for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @model_validator(mode="after")
    def _architecture_fits(self) -> SAEConfig:
        if not self.is_transcoder and self.d_out not in (None, self.d_in):
            raise ValueError(f"an SAE writes what it reads (d_out = d_in = {self.d_in}), got d_out={self.d_out}; "
                             "set architecture='jumprelu_transcoder' for a transcoder")
        if (self.architecture == "topk") != (self.k is not None):
            raise ValueError("k (latents kept per token) is set exactly for architecture 'topk'")
        if self.k is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is more than the d_sae={self.d_sae} latents")
        if not self.is_transcoder and self.target_norm_scale is not None:
            raise ValueError("target_norm_scale is for transcoders (an SAE's target is its input: norm_scale)")
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise ValueError("a transcoder has no pre-encoder bias (Gemma Scope App. B): set "
                             "apply_b_dec_to_input to false")
        return self

    @model_validator(mode="after")
    def _standardized_is_raw(self) -> SAEConfig:
        if self.standardized and (self.norm_scale != 1.0 or self.apply_b_dec_to_input
                                  or self.target_norm_scale not in (None, 1.0)):
            raise ValueError(
                "a standardized SAE has norm_scale 1 (target_norm_scale None or 1) and apply_b_dec_to_input false "
                f"(got norm_scale={self.norm_scale}, target_norm_scale={self.target_norm_scale}, "
                f"apply_b_dec_to_input={self.apply_b_dec_to_input}); "
                "call sae.standardize() instead of setting the flag"
            )
        return self


SITE_KINDS = ("resid_post", "attn_out", "mlp_out", "mlp_in")


class Site(BaseModel):
    """A place in the model to read or splice: a site kind at a layer.

    Its string form ``"<kind>/layer_<L>"`` (e.g. ``resid_post/layer_6``) is used as a folder name in run
    directories, mirroring the Gemma Scope release layout ``<site>/layer_<L>/...``.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["resid_post", "attn_out", "mlp_out", "mlp_in"]
    layer: int = Field(ge=0)

    @property
    def id(self) -> str:
        return f"{self.kind}/layer_{self.layer}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """``"resid_post/layer_6"`` (also ``"resid_post:6"``) → ``Site(kind="resid_post", layer=6)``."""
        if isinstance(text, Site):
            return text
        raw = str(text).strip()
        kind, sep, layer = raw.partition("/layer_")
        if not sep:
            kind, sep, layer = raw.partition(":")
        if not sep or not layer.isdigit() or kind not in SITE_KINDS:
            raise ValueError(f"cannot read site {text!r}: write '<kind>/layer_<L>' or '<kind>:<L>' "
                             f"with kind one of {', '.join(SITE_KINDS)} (e.g. resid_post/layer_6)")
        return cls(kind=kind, layer=int(layer))
