"""Training configuration: the Gemma Scope recipe as defaults (``shared/reference/gemma-scope-recipe.md`` §2-3).

A :class:`TrainConfig` holds one list of :class:`SAESpec` — every SAE (or transcoder) one run trains on the
same batches — and the optimisation settings they share. It loads from a TOML or JSON file
(:meth:`TrainConfig.from_file`) and from CLI flags (``saescope train``); both go through the same validation.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.formats.gemma_scope import width_name as width_label  # one labelling rule for every layout
from saescope.sae.losses import check_prefixes

DEFAULT_TARGET_L0_LAMBDA = 1.0
"""λ of the target-L0 penalty when a spec gives ``target_l0`` without ``sparsity_coefficient``, per unit of the
mean squared norm of the normalized target (the trainer multiplies it by ``E‖t‖²`` on the first batch: ≈ 1 for an
SAE, whose input is normalized to ``E‖x‖² = 1``, and ≈ 2,500 for a Gemma 3 transcoder, whose ``mlp_out`` target
is divided by the input's C). Chosen by measurement on Gemma 3 270M ``resid_post/layer_6`` (width 4096, target
60, 1.05M Shakespeare tokens, the short-budget preset): λ = 0.1 / 1 / 10 ended at L0 62.4 / 61.3 / 62.0 with
training FVU 0.061 / 0.057 / 0.060 and 48% / 45% / 47% dead latents — the mean L0 is held near the target over
two decades of λ (the penalty's L0-gradient ``4λ(L0 − L0_t)/L0_t`` dwarfs the reconstruction's value of one
latent, ~1e-3), and λ = 1 (also SAELens's default coefficient) gave the best FVU."""

MATRYOSHKA_DEFAULT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)
"""Default Matryoshka prefixes as fractions of the width (a doubling ladder, equal weights). The Gemma Scope 2
report's exact prefix sizes were not available offline; this ladder is our documented choice."""


def default_matryoshka_prefixes(width: int) -> list[int]:
    """Doubling prefixes ``width/16, width/8, width/4, width/2, width`` (duplicates and zeros dropped)."""
    out: list[int] = []
    for fraction in MATRYOSHKA_DEFAULT_FRACTIONS:
        size = max(1, round(width * fraction))
        if not out or size > out[-1]:
            out.append(size)
    return out


class SAESpec(BaseModel):
    """One SAE to train: a site, a width (number of latents) and its sparsity penalty.

    The penalty is ``λ·L0`` (Gemma Scope, ``sparsity_coefficient`` = λ) or, with ``target_l0`` set, Gemma Scope
    2's quadratic penalty ``λ·(2/L0_target)(L0 − L0_target)²`` per token (recipe §6); there λ may be left out
    (:data:`DEFAULT_TARGET_L0_LAMBDA` × the target's mean squared norm). ``matryoshka_prefixes`` (SAEs only;
    ``"default"`` for :func:`default_matryoshka_prefixes`) sums the reconstruction loss over nested latent
    prefixes, weighted by ``matryoshka_weights`` (default all 1).

    ``kind="transcoder"`` (Gemma Scope App. B) reads ``site`` (must be ``mlp_in``) and predicts
    ``target_site`` (default: ``mlp_out`` at the same layer); ``skip=True`` adds Gemma Scope 2's affine skip
    connection ``W_skip x`` (zero at initialisation, trained with the rest).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(description="site id, e.g. resid_post/layer_6 (or resid_post:6)")
    width: int = Field(gt=0, description="number of latents d_sae")
    sparsity_coefficient: float | None = Field(
        None, ge=0, description="λ, the coefficient of the L0 penalty (of the quadratic penalty with target_l0, "
        "where it may be left out)")
    kind: Literal["sae", "transcoder"] = "sae"
    target_site: str | None = Field(None, description="transcoders only: the site to predict")
    target_l0: float | None = Field(None, gt=0, description="Gemma Scope 2: train toward this L0 with the "
                                    "quadratic penalty instead of λ·L0")
    matryoshka_prefixes: list[int] | None = Field(None, description="SAEs only: nested prefix sizes of the "
                                                  "latents (strictly increasing, last = width), or 'default'")
    matryoshka_weights: list[float] | None = Field(None, description="one weight per Matryoshka prefix (default 1)")
    skip: bool = Field(False, description="transcoders only: an affine skip connection W_skip x (Gemma Scope 2)")
    threshold_lr_scale: float | None = Field(
        None, gt=0, description="this SAE's θ learning-rate scale (None: the run's threshold_lr_scale); a "
        "transcoder, whose target is ~2,500× an SAE's input on Gemma 3, may need θ to move faster than the SAEs")

    @field_validator("site", "target_site")
    @classmethod
    def _site_id(cls, value: str | None) -> str | None:
        return None if value is None else Site.parse(value).id

    @model_validator(mode="before")
    @classmethod
    def _default_prefixes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("matryoshka_prefixes") == "default":
            width = data.get("width")
            if not isinstance(width, int) or width <= 0:
                raise ValueError("matryoshka_prefixes = 'default' needs a positive integer width")
            data = {**data, "matryoshka_prefixes": default_matryoshka_prefixes(width)}
        return data

    @model_validator(mode="after")
    def _penalty_and_options(self) -> SAESpec:
        if self.sparsity_coefficient is None and self.target_l0 is None:
            raise ValueError(f"{self.site} width {self.width}: give sparsity_coefficient (λ) or target_l0")
        if self.target_l0 is not None and self.target_l0 > self.width:
            raise ValueError(f"target_l0={self.target_l0:g} is more latents than the width {self.width}")
        if self.matryoshka_weights is not None and self.matryoshka_prefixes is None:
            raise ValueError("matryoshka_weights needs matryoshka_prefixes (or matryoshka_prefixes = 'default')")
        if self.matryoshka_prefixes is not None:
            if self.kind != "sae":
                raise ValueError("Matryoshka prefixes are for SAEs; drop matryoshka_prefixes from the transcoder")
            sizes, weights = check_prefixes(self.matryoshka_prefixes, self.matryoshka_weights, self.width)
            object.__setattr__(self, "matryoshka_prefixes", sizes)
            if self.matryoshka_weights is not None:
                object.__setattr__(self, "matryoshka_weights", weights)
        if self.skip and self.kind != "transcoder":
            raise ValueError(f"skip (an affine skip connection) is for transcoders; the SAE on {self.site} cannot "
                             "have one: drop skip or set kind = 'transcoder' on an mlp_in site")
        return self

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
        """A unique, file-name-safe key: ``resid_post/layer_6/width_16k/lambda_0.001``;
        ``.../target_l0_60`` (``target_l0_60_lambda_0.5`` with an explicit λ), ``_matryoshka`` (default
        prefixes and weights) or ``_matryoshka_<hash>`` appended, ``transcoder_skip/`` for skip transcoders."""
        prefix = ("transcoder_skip/" if self.skip else "transcoder/") if self.kind == "transcoder" else ""
        if self.target_l0 is None:
            penalty = f"lambda_{self.sparsity_coefficient:g}"
        else:
            penalty = f"target_l0_{self.target_l0:g}"
            if self.sparsity_coefficient is not None:
                penalty += f"_lambda_{self.sparsity_coefficient:g}"
        if self.matryoshka_prefixes is not None:
            default = (self.matryoshka_prefixes == default_matryoshka_prefixes(self.width)
                       and (self.matryoshka_weights is None or set(self.matryoshka_weights) == {1.0}))
            if default:
                penalty += "_matryoshka"
            else:
                key = json.dumps([self.matryoshka_prefixes, self.matryoshka_weights])
                penalty += "_matryoshka_" + hashlib.sha256(key.encode()).hexdigest()[:8]
        return f"{prefix}{self.site}/width_{width_label(self.width)}/{penalty}"

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site this SAE reads from a batch."""
        return (self.site,) if self.target_site is None else (self.site, self.target_site)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The spec as JSON data, without the Gemma Scope 2 options left at their defaults (so checkpoints made
        before those options existed keep their fingerprint)."""
        data = self.model_dump(mode="json")
        for key, default in NEW_SPEC_DEFAULTS.items():
            if data.get(key) == default:
                data.pop(key, None)
        return data


NEW_SPEC_DEFAULTS: dict[str, Any] = {"target_l0": None, "matryoshka_prefixes": None, "matryoshka_weights": None,
                                     "skip": False, "threshold_lr_scale": None}
"""Spec fields added later (Gemma Scope 2, per-SAE θ lr), with the defaults that leave the fingerprint as before."""


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
    initial_exclude_top_pcs: int = Field(
        0, ge=0, description="not in the recipe, for short budgets: remove the first batch's top principal "
        "directions (of the centered normalized input) from every latent's initial encoder direction (and, for an "
        "SAE, its tied decoder direction). Models with massive activations (Gemma 3: one residual dimension holds "
        "~88% of the variance) otherwise make every random latent read mostly that one dimension, so latents fire "
        "together on the same tokens, over-reconstruct it together and die together. Training can still move "
        "latents onto those directions. 0: the recipe's plain random directions")
    initial_transcoder_W_dec: Literal["random", "fired_target_mean"] = Field(
        "random", description="transcoders' decoder rows at initialisation: random unit vectors (App. B) or, for "
        "short budgets (not in the recipe), each latent's mean centered target over the first-batch tokens it "
        "fires on (after θ is set from the first batch), normalized — the transcoder's analogue of an SAE's tied "
        "W_dec = W_encᵀ: a latent's first firings then point its output where the target goes. Latents that fire "
        "on no first-batch token keep their random row. Measured on Gemma 3 layer 6 (800k tokens, width 4096): it "
        "halves the latents unfired in the last 262k tokens (71% → 36%), but at equal L0 (~40) held-out FVU was "
        "0.40 vs 0.34 and Δ loss 0.110 vs 0.098, so it is not in the short-budget preset")
    initial_W_skip: Literal["zeros", "least_squares"] = Field(
        "zeros", description="skip transcoders' W_skip at initialisation: zeros (Gemma Scope 2) or, for short "
        "budgets (not in the recipe), the least-squares linear map from the first batch's normalized input to its "
        "normalized target (b_dec then takes the rest of the target's mean when initial_b_dec = 'mean'). Adam moves "
        "each entry by about lr per step, and on Gemma 3 the map's entries are O(1): a zero W_skip cannot get there "
        "in a few hundred steps")
    threshold_parameterization: Literal["log", "direct"] = Field(
        "log", description="train log θ (JumpReLU paper) or θ directly (clamped > 0)")
    threshold_lr_scale: float = Field(
        1.0, gt=0, description="θ's learning rate as a fraction of lr (1: the recipe, one lr for all). Not in the "
        "recipe, for short budgets trained directly at a large lr: Adam's step on θ is about lr/√(fraction of "
        "steps with a token inside θ's bandwidth window), so at lr 1e-3 one window hit moves θ by several ε and "
        "can lift it past every token for good (the latent dies); a smaller scale keeps θ's steps near ε")
    transcoder_target_scale: Literal["input", "target"] = Field(
        "input", description="what a transcoder's target (mlp_out) is divided by: 'input' (App. B) the input's "
        "norm scale C; 'target' its own (the store's norm scale of mlp_out, E‖y‖² = 1). Not in the recipe, for "
        "short budgets: on Gemma 3 mlp_out is ~57× the normalized input's scale, so with C the latents, W_enc "
        "and θ must grow ~57× — more than Adam's bounded steps manage in 10⁶ tokens (a target-L0 60 transcoder "
        "ended at L0 ~700); with 'target' it reaches L0 57. The saved transcoder maps raw mlp_in to raw mlp_out "
        "either way (target_norm_scale in its config; standardization folds it)")
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    device: str = "cpu"
    seed: int = 0
    fast_path: bool = Field(True, description="use the sparse step (same gradients as the dense one)")
    cpu_kernels: bool = Field(
        True, description="on the CPU, run the sparse step on its compiled kernels (saescope.train.sparse_kernels: "
        "built on first use with the machine's C++ compiler; torch ops where there is none). Same gradients to "
        "float rounding")
    latent_shards: int = Field(
        1, ge=1, description="under torch.distributed (torchrun): ranks that split each SAE's latents (W_enc "
        "columns, W_dec rows, b_enc/θ entries); the world is a grid data_shards × latent_shards, data_shards ranks "
        "read disjoint batch_size/data_shards slices of each global batch. 1: data parallel only; = world size: "
        "latent sharding only. No effect in one process (saescope.distributed)")
    fast_path_max_density: float | None = Field(
        None, ge=0, le=1, description="use the dense step instead while the previous step's L0 / width is above "
        "this (early in training, when thousands of latents fire, the sparse step does not pay). None: 0.1 where "
        "the step runs on the compiled CPU kernels (at 16k latents they are 3.3× faster than the dense step at "
        "density 0.1), 0.05 on torch ops (about as fast as the dense step at 0.1)")
    checkpoint_every: int = Field(1000, ge=0, description="steps between checkpoints (0: only at the end "
                                  "and on SIGINT/SIGTERM)")
    log_every: int = Field(100, gt=0, description="steps between log lines")
    dead_window_tokens: int = Field(10_000_000, gt=0, description="a latent is dead if it has not fired "
                                    "in this many tokens (or since the start, if fewer were seen)")
    out_dir: Path = Field(Path("runs/train"), description="run folder: checkpoints/, suite/, metrics.jsonl")
    store: Path | None = Field(None, description="activation store folder (saescope train reads it)")
    shuffle_buffer: int = Field(0, ge=0, description="activation-store shuffle block in rows (0: its default, 65536), rounded down to whole global batches; one order for any number of data ranks")
    model: str | None = Field(None, description="the language model name, stored in each SAE's config")
    tensorboard: bool = False
    wandb: bool = Field(False, description="log to Weights & Biases in offline mode")

    @model_validator(mode="after")
    def _unique(self) -> TrainConfig:
        names = [spec.name for spec in self.saes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"the same SAE is listed twice: {duplicates}; give each a different width, λ or "
                             "target_l0")
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
        payload["saes"] = [spec.fingerprint_dict() for spec in self.saes]
        # the language model's name only labels the SAEs (train --store fills it from the store, whose rows are
        # what a resume must share); kept as None so fingerprints made before that stay as they were
        payload["model"] = None
        for key, default in (("initial_W_skip", "zeros"), ("initial_exclude_top_pcs", 0), ("threshold_lr_scale", 1.0),
                             ("transcoder_target_scale", "input"), ("initial_transcoder_W_dec", "random")):
            if payload.get(key) == default:      # added later: at their defaults, fingerprints stay as before
                payload.pop(key)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", preset: str | None = None) -> TrainConfig:
        """Validate ``data``; a named ``preset`` (:mod:`saescope.train.presets`) fills the settings it leaves out."""
        from saescope.train.presets import apply_preset

        data = apply_preset(preset, data)
        try:
            return cls(**data)
        except ValidationError as exc:
            raise SaescopeError(f"{source} is not a valid training config:\n{exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path, *, preset: str | None = None, **overrides: Any) -> TrainConfig:
        """Read a ``.toml`` or ``.json`` file; keyword overrides (e.g. from CLI flags) win over the file, and both
        over a named ``preset``."""
        path = Path(path)
        if not path.is_file():
            raise SaescopeError(f"training config {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SaescopeError(f"cannot parse {path}: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path), preset=preset)

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
                     "device", "fast_path", "cpu_kernels", "fast_path_max_density", "latent_shards")
"""Settings that may differ between a checkpoint and the run resuming it."""


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))
