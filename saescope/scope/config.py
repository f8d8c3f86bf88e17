"""What ``saescope scope`` trains: layers × sites × widths × target L0s, and how (typed, validated once).

The target-L0 ladder ``--l0 small|medium|big`` follows Gemma Scope 2's release for gemma-3-270m
(``shared/reference/gemma-scope-recipe.md`` §6, SAELens ``pretrained_saes.yaml``):

* ``small``: 10, 11, 13, 15, 16, 18 at layers 0–5, then 20 (the ``*_all`` folders);
* ``big``: 60, 70, 80, 90, 100, 110 at layers 0–5, then 120 (the ``*_all`` folders);
* ``medium``: the ``*_all`` folders have none; we use the 4-layer sweep's medium where it exists (55 at layer 5,
  60 at layers 9, 12, 15), 60 at the other layers from 6 on, and ``round(√(small·big))`` at layers 0–4 (our
  choice, between the release's two ends).

For another model, layer ``L`` of ``n`` takes the value of gemma-3-270m's layer ``round(L · 17 / (n − 1))``
(the same relative depth), which is a documented guess, not a published recipe.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saescope.errors import SaescopeError

SCOPE_SITES = ("resid_post", "attn_out", "mlp_out")
L0_SIZES = ("small", "medium", "big")
_GEMMA3_270M_LAYERS = 18
_SMALL = (10, 11, 13, 15, 16, 18)
_BIG = (60, 70, 80, 90, 100, 110)


def ladder_l0(size: str, layer: int, n_layers: int = _GEMMA3_270M_LAYERS) -> int:
    """Gemma Scope 2's target L0 of ``size`` at ``layer`` (see the module docstring for other models)."""
    if size not in L0_SIZES:
        raise SaescopeError(f"unknown L0 size {size!r}; choose small, medium or big")
    if not 0 <= layer < n_layers:
        raise SaescopeError(f"layer {layer} is outside 0-{n_layers - 1}")
    ref = layer if n_layers == _GEMMA3_270M_LAYERS else (
        round(layer * (_GEMMA3_270M_LAYERS - 1) / (n_layers - 1)) if n_layers > 1 else 0)
    small = _SMALL[ref] if ref < len(_SMALL) else 20
    big = _BIG[ref] if ref < len(_BIG) else 120
    if size == "small":
        return small
    if size == "big":
        return big
    if ref == 5:
        return 55
    return 60 if ref > 5 else round(math.sqrt(small * big))


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``all`` · ``0-17`` · ``5,9,12`` · ``0-3,8`` → sorted layers; raises on a layer the model lacks."""
    text = text.strip()
    if text == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise SaescopeError(f"cannot read --layers {text!r}: write all, a range like 0-17, or a list like 5,9,12")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise SaescopeError(f"--layers range {part!r} runs backwards; write {high}-{low}")
        layers.update(range(low, high + 1))
    bad = sorted(x for x in layers if x >= n_layers)
    if bad:
        raise SaescopeError(f"--layers {text!r} names layer(s) {', '.join(map(str, bad))}, but the model has layers "
                            f"0-{n_layers - 1}")
    return sorted(layers)


class ScopeConfig(BaseModel):
    """Settings of ``saescope scope`` (CLI flags and library share them). Defaults are sized for a CPU run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="embedded name, folder, .gguf or hub id")
    out: Path = Field(description="run folder (re-running resumes)")
    layers: str = Field("all", description="all, a range 0-17, or a list 5,9,12")
    sites: list[Literal["resid_post", "attn_out", "mlp_out"]] = Field(
        default_factory=lambda: ["resid_post"], description="site kinds trained at every layer")
    transcoders: bool = Field(False, description="also a transcoder mlp_in → mlp_out at every layer")
    widths: list[int] = Field(default_factory=lambda: [4096], description="latents per SAE (each width is trained)")
    target_l0: list[float] = Field(default_factory=list, description="target L0s (each one is trained)")
    l0: list[Literal["small", "medium", "big"]] = Field(
        default_factory=list, description="Gemma Scope 2's per-layer target-L0 ladder (default: medium)")
    tokens: int = Field(300_000, gt=0, description="training tokens (every SAE sees the same ones)")
    text: str = Field("shakespeare", description="training text (saescope.corpus spec)")
    eval_domains: list[str] | None = Field(None, description="held-out text domains (default: the training text)")
    eval_windows: int = Field(4, gt=0, description="held-out windows per domain")
    preset: str | None = Field("short-budget", description="training preset (None: the paper's schedule)")
    stream: bool = Field(False, description="train from the model's forward passes, no activation store")
    batch_size: int = Field(1024, gt=0, description="tokens per step")
    buffer_rows: int = Field(16384, gt=0, description="streaming shuffle buffer, rows (rounded to whole batches)")
    context_len: int = Field(256, ge=16, description="tokens per window (Gemma Scope: 1024)")
    windows_per_pass: int = Field(4, gt=0, description="windows per forward pass")
    norm_sample_tokens: int = Field(8192, gt=0, description="streaming: tokens from which each site's C is estimated")
    held_out_fraction: float = Field(0.1, gt=0, lt=1, description="documents kept for evaluation (by id hash)")
    prefetch: int = Field(1, ge=0, description="streaming: forward passes computed ahead in a thread (0: none)")
    export: bool = Field(False, description="also write the Gemma Scope 2 release layout to <out>/release")
    dashboards: bool = Field(False, description="also build every SAE's latent dashboards (<sae folder>/dashboards)")
    dashboard_tokens: int = Field(65_536, gt=0, description="training-text tokens the dashboards are computed from "
                                  "(--stream: cached to <out>/dashboard_activations)")
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @field_validator("widths")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if not value or any(w <= 0 for w in value):
            raise ValueError("give at least one positive --width")
        return sorted(set(value))

    @field_validator("target_l0")
    @classmethod
    def _targets(cls, value: list[float]) -> list[float]:
        if any(not (t > 0 and math.isfinite(t)) for t in value):
            raise ValueError("every --target-l0 must be a positive number")
        return sorted(set(value))

    @model_validator(mode="after")
    def _one_ladder(self) -> ScopeConfig:
        if self.target_l0 and self.l0:
            raise ValueError("give either --target-l0 numbers or --l0 small|medium|big, not both")
        if not self.sites and not self.transcoders:
            raise ValueError("nothing to train: give --sites or --transcoders")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"a site kind is listed twice: {', '.join(self.sites)}")
        if self.tokens < self.batch_size * 10:
            raise ValueError(f"--tokens {self.tokens} gives fewer than 10 steps of {self.batch_size}; raise --tokens "
                             "or lower --batch-size")
        return self

    def targets(self, layer: int, n_layers: int) -> list[tuple[float, str]]:
        """``(target L0, size name)`` for every SAE at ``layer``: the ladder's names with ``--l0``; with
        ``--target-l0`` the release's names by rank of the target (one: medium; two: small, big; three: small,
        medium, big; more: the target itself)."""
        if self.target_l0:
            names = {1: ["medium"], 2: ["small", "big"], 3: ["small", "medium", "big"]}.get(
                len(self.target_l0), [f"{t:g}" for t in self.target_l0])
            return list(zip(self.target_l0, names))
        sizes = self.l0 or ["medium"]
        return [(float(ladder_l0(size, layer, n_layers)), size) for size in sizes]
