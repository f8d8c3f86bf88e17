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
from saescope.sae.losses import (
    DEFAULT_FREQUENCY_CAP,
    DEFAULT_FREQUENCY_PENALTY,
    DEFAULT_TARGET_FREQUENCY_CAP,
    LossOptions,
    check_prefixes,
)
from saescope.train.compat import NEW_SPEC_DEFAULTS, fingerprint_payload, without_new_defaults

DEFAULT_TARGET_L0_LAMBDA = 1.0
"""λ of the target-L0 penalty when a spec gives ``target_l0`` without ``sparsity_coefficient``, per unit of the
mean squared norm of the normalized target (the trainer multiplies it by ``E‖t‖²`` on the first batch).
Chosen by measurement: docs/training.md."""

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
    architecture: Literal["jumprelu", "topk", "batchtopk"] = Field(
        "jumprelu", description="jumprelu (the recipe) or a baseline trained on the same batches: topk, batchtopk")
    k: int | None = Field(None, gt=0, description="topk / batchtopk: latents kept per token (mean per token)")
    target_site: str | None = Field(None, description="transcoders only: the site to predict")
    target_l0: float | None = Field(None, gt=0, description="Gemma Scope 2: train toward this L0 with the "
                                    "quadratic penalty instead of λ·L0")
    target_l0_over: Literal["token", "batch"] = Field(
        "token", description="the quadratic target-L0 penalty on each token's L0 (the recipe) or on the batch's "
        "mean L0 (docs/training.md)")
    matryoshka_prefixes: list[int] | None = Field(None, description="SAEs only: nested prefix sizes of the "
                                                  "latents (strictly increasing, last = width), or 'default'")
    matryoshka_weights: list[float] | None = Field(None, description="one weight per Matryoshka prefix (default 1)")
    frequency_penalty: float | None = Field(
        None, ge=0, description="μ of the penalty on latents firing on more than frequency_cap of the tokens "
        "(docs/training.md); None: 10 with target_l0 (Gemma Scope 2), else 0 (off)")
    frequency_cap: float | None = Field(
        None, gt=0, lt=1, description="the firing frequency above which the frequency penalty acts; None: 0.1, "
        "or 2 × target_l0 / width where that is larger (docs/training.md)")
    skip: bool = Field(False, description="transcoders only: an affine skip connection W_skip x (Gemma Scope 2)")
    threshold_lr_scale: float | None = Field(
        None, gt=0, description="this SAE's θ learning-rate scale (None: the run's; docs/training.md)")

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
        if self.architecture != "jumprelu":
            return self._baseline_options()
        if self.k is not None:
            raise ValueError(f"k is for architecture topk or batchtopk; the JumpReLU SAE on {self.site} takes "
                             "sparsity_coefficient or target_l0")
        if self.sparsity_coefficient is None and self.target_l0 is None:
            raise ValueError(f"{self.site} width {self.width}: give sparsity_coefficient (λ) or target_l0")
        if self.target_l0_over != "token" and self.target_l0 is None:
            raise ValueError(f"target_l0_over = {self.target_l0_over!r} needs target_l0")
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
        if self.frequency_penalty is None:
            object.__setattr__(self, "frequency_penalty", self.default_frequency_penalty)
        if self.frequency_cap is None:
            object.__setattr__(self, "frequency_cap", self.default_frequency_cap)
        if self.frequency_penalty and self.target_l0 is not None and self.target_l0 / self.width >= self.frequency_cap:
            raise ValueError(f"target_l0 {self.target_l0:g} of {self.width} latents is a mean firing frequency of "
                             f"{self.target_l0 / self.width:.3g}, at or above frequency_cap {self.frequency_cap:g}: "
                             "the frequency penalty would fight the target; raise frequency_cap or set "
                             "frequency_penalty = 0")
        if self.skip and self.kind != "transcoder":
            raise ValueError(f"skip (an affine skip connection) is for transcoders; the SAE on {self.site} cannot "
                             "have one: drop skip or set kind = 'transcoder' on an mlp_in site")
        return self

    def _baseline_options(self) -> SAESpec:
        """TopK / BatchTopK: ``k`` and nothing of the JumpReLU loss."""
        name = f"{self.architecture} SAE on {self.site}"
        if self.k is None:
            raise ValueError(f"the {name} needs k, the number of latents kept per token")
        if self.k > self.width:
            raise ValueError(f"k={self.k} is more latents than the width {self.width}")
        if self.kind != "sae":
            raise ValueError(f"{self.architecture} is an SAE architecture; transcoders are JumpReLU")
        given = [key for key in ("sparsity_coefficient", "target_l0", "matryoshka_prefixes", "matryoshka_weights",
                                 "frequency_penalty") if getattr(self, key) not in (None, 0.0)]
        if given:
            raise ValueError(f"the {name} has no sparsity penalty (k sets its L0): drop {', '.join(given)}")
        object.__setattr__(self, "frequency_penalty", 0.0)
        if self.frequency_cap is None:
            object.__setattr__(self, "frequency_cap", DEFAULT_FREQUENCY_CAP)
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
        if self.architecture != "jumprelu":
            return f"{self.site}/width_{width_label(self.width)}/{self.architecture}_{self.k}"
        if self.target_l0 is None:
            penalty = f"lambda_{self.sparsity_coefficient:g}"
        else:
            penalty = f"target_l0_{self.target_l0:g}" + ("_batch" if self.target_l0_over == "batch" else "")
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
        other_cap = bool(self.frequency_penalty) and self.frequency_cap != self.default_frequency_cap
        if self.frequency_penalty != self.default_frequency_penalty or other_cap:
            penalty += f"_freq_{self.frequency_penalty:g}"
            if other_cap:
                penalty += f"_cap_{self.frequency_cap:g}"
        return f"{prefix}{self.site}/width_{width_label(self.width)}/{penalty}"

    @property
    def default_frequency_penalty(self) -> float:
        """μ where the spec leaves it out: on with a target L0 (Gemma Scope 2's recipe), off with λ·L0."""
        return DEFAULT_FREQUENCY_PENALTY if self.target_l0 is not None else 0.0

    @property
    def default_frequency_cap(self) -> float:
        """c where the spec leaves it out: :data:`DEFAULT_TARGET_FREQUENCY_CAP` with a target L0, or twice the
        target's mean firing frequency ``target_l0 / width`` where that is larger (small SAEs, whose every latent
        fires often); :data:`DEFAULT_FREQUENCY_CAP` (unused: the penalty is off) without one."""
        if self.target_l0 is None:
            return DEFAULT_FREQUENCY_CAP
        return min(max(DEFAULT_TARGET_FREQUENCY_CAP, 2.0 * self.target_l0 / self.width), 0.99)

    def loss_options(self, sparsity_coefficient: float) -> LossOptions:
        """This SAE's loss with this step's λ (the contract every training step reads)."""
        return LossOptions(sparsity_coefficient=sparsity_coefficient, target_l0=self.target_l0,
                           matryoshka_prefixes=None if self.matryoshka_prefixes is None
                           else tuple(self.matryoshka_prefixes),
                           matryoshka_weights=None if self.matryoshka_weights is None
                           else tuple(self.matryoshka_weights),
                           frequency_penalty=float(self.frequency_penalty or 0.0),
                           frequency_cap=float(self.frequency_cap or DEFAULT_FREQUENCY_CAP),
                           target_l0_over=self.target_l0_over)

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site this SAE reads from a batch."""
        return (self.site,) if self.target_site is None else (self.site, self.target_site)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The spec as JSON data, without the options added later left at their defaults (so checkpoints made
        before those options existed keep their fingerprint: :mod:`saescope.train.compat`)."""
        return without_new_defaults(self.model_dump(mode="json"), NEW_SPEC_DEFAULTS)


class TrainConfig(BaseModel):
    """Everything a training run needs. Defaults are the Gemma Scope recipe (§3 and the JumpReLU paper)."""

    model_config = ConfigDict(extra="forbid")

    saes: list[SAESpec] = Field(min_length=1, description="the SAEs trained together on the same batches")
    total_tokens: int = Field(gt=0, description="tokens to train on (steps = total_tokens // batch_size)")
    batch_size: int = Field(4096, gt=0, description="tokens per step")
    lr: float = Field(7e-5, gt=0, description="Adam learning rate after warm-up")
    lr_warmup_steps: int = Field(1000, ge=0, description="cosine warm-up length in steps")
    lr_warmup_start: float = Field(0.1, gt=0, le=1, description="warm-up starts at this fraction of lr")
    lr_decay_steps: int = Field(0, ge=0, description="linear decay of lr to 0 over the last this many steps "
                                "(0: constant, the recipe; docs/training.md)")
    adam_beta1: float = Field(0.0, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    adam_update_clip: float | None = Field(None, gt=0, description="bound each Adam step to this many times the "
                                           "lr (None: unbounded, the recipe; docs/training.md)")
    sparsity_warmup_steps: int = Field(10_000, ge=0, description="λ rises linearly from 0 over these steps")
    bandwidth: float = Field(0.001, gt=0, description="STE kernel bandwidth ε")
    initial_threshold: float = Field(0.001, gt=0, description="θ at initialisation")
    initial_b_dec: Literal["zeros", "mean"] = Field(
        "zeros", description="b_dec at initialisation: zeros (the recipe) or the first batch's mean target "
        "(short budgets; docs/training.md)")
    initial_threshold_quantile: float | None = Field(
        None, gt=0, lt=1, description="start each θ_i at this quantile of its first-batch pre-activations "
        "(short budgets; docs/training.md); None: initial_threshold (the recipe)")
    initial_exclude_top_pcs: int = Field(
        0, ge=0, description="remove the first batch's top principal directions from the initial encoder "
        "directions (short budgets, massive activations; docs/training.md); 0: the recipe")
    initial_transcoder_W_dec: Literal["random", "fired_target_mean"] = Field(
        "random", description="transcoders' initial decoder rows: random (App. B) or each latent's mean fired "
        "target (docs/training.md)")
    initial_W_skip: Literal["zeros", "least_squares"] = Field(
        "zeros", description="skip transcoders' initial W_skip: zeros (Gemma Scope 2) or the first batch's "
        "least-squares map (short budgets; docs/training.md)")
    threshold_parameterization: Literal["log", "direct"] = Field(
        "log", description="train log θ (JumpReLU paper) or θ directly (clamped > 0)")
    threshold_lr_scale: float = Field(
        1.0, gt=0, description="θ's learning rate as a fraction of lr (1: the recipe; < 1 for short budgets at a "
        "large lr: docs/training.md)")
    transcoder_target_scale: Literal["input", "target"] = Field(
        "input", description="a transcoder's target is divided by the input's C (App. B) or by its own norm "
        "scale (short budgets; docs/training.md)")
    dtype: Literal["float32", "float64", "bfloat16"] = Field("float32", description="the SAEs' parameter dtype")
    device: str = Field("cpu", description="where the SAEs train: cpu, cuda, cuda:1, ...")
    seed: int = Field(0, description="seed for initialisation (per SAE) and the data order")
    fast_path: bool = Field(True, description="use the sparse step (same gradients as the dense one)")
    cpu_kernels: bool = Field(
        True, description="on the CPU, run the sparse step on its compiled kernels (docs/training.md)")
    latent_shards: int = Field(
        1, ge=1, description="under torchrun: ranks that split each SAE's latents; the rest split the batch "
        "(docs/training.md)")
    fast_path_max_density: float | None = Field(
        None, ge=0, le=1, description="take the dense step while the last L0 / width is above this; None: 0.1 "
        "on the compiled kernels, 0.05 on torch ops (docs/training.md)")
    checkpoint_every: int = Field(1000, ge=0, description="steps between checkpoints (0: only at the end "
                                  "and on SIGINT/SIGTERM)")
    log_every: int = Field(100, gt=0, description="steps between log lines")
    dead_window_tokens: int = Field(10_000_000, gt=0, description="a latent is dead if it has not fired "
                                    "in this many tokens (or since the start, if fewer were seen)")
    out_dir: Path = Field(Path("runs/train"), description="run folder: checkpoints/, suite/, metrics.jsonl")
    store: Path | None = Field(None, description="activation store folder (saescope train reads it)")
    shuffle_buffer: int = Field(0, ge=0, description="activation-store shuffle block in rows (0: 65536), whole "
                                "global batches; one order for any number of data ranks")
    model: str | None = Field(None, description="the language model name, stored in each SAE's config")
    tensorboard: bool = Field(False, description="log to TensorBoard (out_dir/tensorboard)")
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
        if self.lr_decay_steps > self.total_steps:
            raise ValueError(f"lr_decay_steps={self.lr_decay_steps} is more than the run's {self.total_steps} steps "
                             f"(total_tokens / batch_size); give at most {self.total_steps}")
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
        payload = fingerprint_payload(self.model_dump(mode="json"))
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
