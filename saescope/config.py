"""Typed, validated configuration objects shared by the library and the CLI.

Defaults reproduce the Gemma Scope recipe (``shared/reference/gemma-scope-recipe.md``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPES = ("float32", "float64", "bfloat16", "float16")


class SAEConfig(BaseModel):
    """Everything needed to rebuild an SAE besides its weights; stored beside them in every native file.

    ``norm_scale`` is the scalar ``C`` of Gemma Scope Appendix A (``x = x_raw / C`` with ``E‖x‖² = 1``).
    ``apply_b_dec_to_input`` is the pre-encoder subtraction of ``b_dec`` (on for SAEs, off for transcoders,
    App. B). A *standardized* SAE (Appendix A, eqs. 7-11) has ``norm_scale == 1`` and no pre-encoder bias.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    architecture: Literal["jumprelu"] = "jumprelu"
    d_in: int = Field(gt=0, description="width of the activation the SAE reads")
    d_sae: int = Field(gt=0, description="number of latents")
    norm_scale: float = Field(1.0, description="C: raw activations are divided by C before encoding")
    apply_b_dec_to_input: bool = Field(True, description="subtract b_dec from the input before encoding")
    standardized: bool = Field(False, description="parameters folded for raw activations (Appendix A)")
    bandwidth: float = Field(0.001, gt=0, description="STE kernel bandwidth ε (JumpReLU paper)")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    model: str | None = Field(None, description="the language model the SAE was trained on")
    site: str | None = Field(None, description="site name, e.g. resid_post")
    layer: int | None = Field(None, ge=0, description="layer index of the site")
    hook_point: str | None = Field(None, description="Hugging Face module path of the site")
    training: dict[str, Any] = Field(default_factory=dict, description="summary of how it was trained")

    @field_validator("norm_scale")
    @classmethod
    def _positive_finite(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"norm_scale must be a positive finite number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _standardized_is_raw(self) -> SAEConfig:
        if self.standardized and (self.norm_scale != 1.0 or self.apply_b_dec_to_input):
            raise ValueError(
                "a standardized SAE has norm_scale 1 and apply_b_dec_to_input false "
                f"(got norm_scale={self.norm_scale}, apply_b_dec_to_input={self.apply_b_dec_to_input}); "
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
