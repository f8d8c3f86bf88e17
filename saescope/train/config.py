"""Training configuration: the Gemma Scope recipe as defaults (``shared/reference/gemma-scope-recipe.md`` §2-3).

A :class:`TrainConfig` holds one list of :class:`SAESpec` — every SAE (or transcoder) one run trains on the
same batches — and the optimisation settings they share. It loads from a TOML or JSON file
(:meth:`TrainConfig.from_file`) and from CLI flags (``saescope train``); both go through the same validation.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.formats.gemma_scope import width_name as width_label  # one labelling rule for every layout


class SAESpec(BaseModel):
    """One SAE to train: a site, a width (number of latents) and a sparsity coefficient λ.

    ``kind="transcoder"`` (Gemma Scope App. B) reads ``site`` (must be ``mlp_in``) and predicts
    ``target_site`` (default: ``mlp_out`` at the same layer).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(description="site id, e.g. resid_post/layer_6 (or resid_post:6)")
    width: int = Field(gt=0, description="number of latents d_sae")
    sparsity_coefficient: float = Field(ge=0, description="λ, the coefficient of the L0 penalty")
    kind: Literal["sae", "transcoder"] = "sae"
    target_site: str | None = Field(None, description="transcoders only: the site to predict")

    @field_validator("site", "target_site")
    @classmethod
    def _site_id(cls, value: str | None) -> str | None:
        return None if value is None else Site.parse(value).id

    @model_validator(mode="after")
    def _transcoder_sites(self) -> SAESpec:
        if self.kind == "sae":
            if self.target_site is not None:
                raise ValueError(f"target_site is only for transcoders (SAE on {self.site}); drop it or set "
                                 "kind = 'transcoder'")
            return self
        site = Site.parse(self.site)
        if site.kind != "mlp_in":
            raise ValueError(f"a transcoder reads mlp_in (App. B), not {self.site}; use site = "
                             f"'mlp_in/layer_{site.layer}'")
        if self.target_site is None:
            object.__setattr__(self, "target_site", f"mlp_out/layer_{site.layer}")
        return self

    @property
    def name(self) -> str:
        """A unique, file-name-safe key: ``resid_post/layer_6/width_16k/lambda_0.001``."""
        prefix = "transcoder/" if self.kind == "transcoder" else ""
        return f"{prefix}{self.site}/width_{width_label(self.width)}/lambda_{self.sparsity_coefficient:g}"

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site this SAE reads from a batch."""
        return (self.site,) if self.target_site is None else (self.site, self.target_site)


class TrainConfig(BaseModel):
    """Everything a training run needs. Defaults are the Gemma Scope recipe (§3 and the JumpReLU paper)."""

    model_config = ConfigDict(extra="forbid")

    saes: list[SAESpec] = Field(min_length=1, description="the SAEs trained together on the same batches")
    total_tokens: int = Field(gt=0, description="tokens to train on (steps = total_tokens // batch_size)")
    batch_size: int = Field(4096, gt=0, description="tokens per step")
    lr: float = Field(7e-5, gt=0, description="Adam learning rate after warm-up")
    lr_warmup_steps: int = Field(1000, ge=0, description="cosine warm-up length in steps")
    lr_warmup_start: float = Field(0.1, gt=0, le=1, description="warm-up starts at this fraction of lr")
    adam_beta1: float = Field(0.0, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    sparsity_warmup_steps: int = Field(10_000, ge=0, description="λ rises linearly from 0 over these steps")
    bandwidth: float = Field(0.001, gt=0, description="STE kernel bandwidth ε")
    initial_threshold: float = Field(0.001, gt=0, description="θ at initialisation")
    initial_b_dec: Literal["zeros", "mean"] = Field(
        "zeros", description="b_dec at initialisation: zeros (the recipe) or, for short budgets (not in the "
        "recipe), the mean of the first batch's normalized target (the input for an SAE)")
    initial_threshold_quantile: float | None = Field(
        None, gt=0, lt=1, description="not in the recipe, for short budgets: start each θ_i at this quantile of "
        "its pre-activations on the first batch (at least initial_threshold), so every latent starts firing on "
        "a few tokens and L0 starts small; None: θ = initial_threshold (the recipe)")
    threshold_parameterization: Literal["log", "direct"] = Field(
        "log", description="train log θ (JumpReLU paper) or θ directly (clamped > 0)")
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    device: str = "cpu"
    seed: int = 0
    fast_path: bool = Field(True, description="use the sparse step (same gradients as the dense one)")
    latent_shards: int = Field(
        1, ge=1, description="under torch.distributed (torchrun): ranks that split each SAE's latents (W_enc "
        "columns, W_dec rows, b_enc/θ entries); the world is a grid data_shards × latent_shards, data_shards ranks "
        "read disjoint batch_size/data_shards slices of each global batch. 1: data parallel only; = world size: "
        "latent sharding only. No effect in one process (saescope.distributed)")
    fast_path_max_density: float = Field(
        0.05, ge=0, le=1, description="use the dense step instead while the previous step's L0 / width is above "
        "this (early in training, when thousands of latents fire, the sparse step does not pay)")
    checkpoint_every: int = Field(1000, ge=0, description="steps between checkpoints (0: only at the end "
                                  "and on SIGINT/SIGTERM)")
    log_every: int = Field(100, gt=0, description="steps between log lines")
    dead_window_tokens: int = Field(10_000_000, gt=0, description="a latent is dead if it has not fired "
                                    "in this many tokens (or since the start, if fewer were seen)")
    out_dir: Path = Field(Path("runs/train"), description="run folder: checkpoints/, suite/, metrics.jsonl")
    store: Path | None = Field(None, description="activation store folder (saescope train reads it)")
    shuffle_buffer: int = Field(0, ge=0, description="activation-store shuffle buffer (0: its default)")
    model: str | None = Field(None, description="the language model name, stored in each SAE's config")
    tensorboard: bool = False
    wandb: bool = Field(False, description="log to Weights & Biases in offline mode")

    @model_validator(mode="after")
    def _unique(self) -> TrainConfig:
        names = [spec.name for spec in self.saes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"the same SAE is listed twice: {duplicates}; give each a different width or λ")
        if self.total_tokens < self.batch_size:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one batch of {self.batch_size}")
        return self

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def sites(self) -> list[str]:
        """Every site the run reads, in first-use order."""
        out: list[str] = []
        for spec in self.saes:
            for site in spec.sites:
                if site not in out:
                    out.append(site)
        return out

    def fingerprint(self) -> str:
        """A hash of the settings a resumed run must share with the checkpoint it resumes.

        Length, logging, checkpoint frequency and output options may change between resumes.
        """
        payload = self.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        try:
            return cls(**data)
        except ValidationError as exc:
            raise SaescopeError(f"{source} is not a valid training config:\n{exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a ``.toml`` or ``.json`` file; keyword overrides (e.g. from CLI flags) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise SaescopeError(f"training config {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SaescopeError(f"cannot parse {path}: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    def to_toml(self) -> str:
        """The resolved config as TOML (written into the run folder before training starts)."""
        data = self.model_dump(mode="json", exclude_none=True)
        lines = []
        for key, value in data.items():
            if key != "saes":
                lines.append(f"{key} = {_toml_value(value)}")
        for spec in data["saes"]:
            lines.append("\n[[saes]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in spec.items())
        return "\n".join(lines) + "\n"


RESUMABLE_CHANGES = ("total_tokens", "checkpoint_every", "log_every", "tensorboard", "wandb", "out_dir", "store",
                     "device", "fast_path", "fast_path_max_density", "latent_shards")
"""Settings that may differ between a checkpoint and the run resuming it."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))
