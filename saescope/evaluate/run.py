"""``saescope evaluate RUN_DIR``: evaluate every SAE of a run's suite on held-out text, per text domain.

Reads ``RUN_DIR/suite/**`` (one folder per SAE, any supported format), builds held-out windows of each
domain with :mod:`saescope.corpus` (documents on the held-out side of the by-document split, never the
training side), evaluates the whole suite in one pass per batch (:func:`~saescope.evaluate.suite.evaluate_saes`)
and writes ``RUN_DIR/eval/<sae>.json`` and ``RUN_DIR/eval/table.json``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from saescope.errors import SaescopeError
from saescope.evaluate.suite import (
    EvalBatch,
    EvalTarget,
    MetricOptions,
    evaluate_saes,
    table_rows,
    write_eval,
)


class EvalConfig(BaseModel):
    """Settings of an evaluation. Gemma Scope used 2,048 sequences of 1,024 tokens (§4.1); the defaults here
    are sized for a CPU, raise ``windows_per_domain`` for tighter numbers."""

    model_config = ConfigDict(extra="forbid")

    domains: list[str] = Field(default_factory=lambda: ["shakespeare", "python"],
                               description="text specs (saescope.corpus.documents_from_spec), one per domain")
    held_out_fraction: float = Field(0.1, gt=0, le=1, description="must match the fraction the activations "
                                     "were cached with, so evaluation never reads training documents")
    context_len: int = Field(1024, ge=2, description="tokens per window, BOS first (Gemma Scope: 1024)")
    windows_per_domain: int = Field(8, gt=0)
    batch_size: int = Field(2, gt=0, description="windows per forward pass")
    uniformity_tokens: int = Field(2048, ge=0, description="tokens per SAE for App. C.3 (a backward pass)")
    chunk_size: int = Field(512, gt=0, description="tokens unembedded at once (bounds memory on big vocabularies)")
    position_bins: int = Field(32, gt=0, description="groups of positions for Δ loss by position (App. C.2)")
    principal_directions: int = Field(1, ge=0, description="k of fvu_top / fvu_rest: FVU along the top-k "
                                      "principal directions of the site and on the rest (0: skip)")
    bootstrap_samples: int = Field(2000, ge=1, description="bootstrap replicates of the Δ loss interval "
                                   "(windows resampled with replacement, clean and spliced paired)")
    confidence: float = Field(0.95, gt=0, lt=1, description="coverage of the Δ loss percentile interval")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap's generator (reproducible intervals)")
    zero_ablation_tokens: int | None = Field(16384, gt=0, description="tokens per site and domain also run "
                                             "zero-ablated, for loss recovered (None: all)")
    model: str | None = Field(None, description="language model; default: the one the SAEs name")
    dtype: str = "float32"
    device: str = "cpu"

    @field_validator("domains")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one text domain, e.g. shakespeare")
        return value

    def metric_options(self) -> MetricOptions:
        """The settings :func:`~saescope.evaluate.suite.evaluate_saes` reads from this config."""
        return MetricOptions(uniformity_tokens=self.uniformity_tokens, position_bins=self.position_bins,
                             principal_directions=self.principal_directions,
                             bootstrap_samples=self.bootstrap_samples, confidence=self.confidence,
                             bootstrap_seed=self.bootstrap_seed, zero_ablation_tokens=self.zero_ablation_tokens)


def find_suite(run_dir: str | Path) -> list[Path]:
    """Every SAE folder under ``RUN_DIR/suite`` (or under RUN_DIR itself if it has no suite/), sorted."""
    from saescope.suite import sae_folders

    return sae_folders(run_dir)


def load_targets(run_dir: str | Path, folders: Sequence[Path] | None = None, *, device: str = "cpu"
                 ) -> list[EvalTarget]:
    """Load the suite's SAEs as :class:`EvalTarget` (name = folder relative to ``suite/``)."""
    from saescope.formats import load_sae

    root = Path(run_dir)
    base = root / "suite" if (root / "suite").is_dir() else root
    targets = []
    for folder in folders if folders is not None else find_suite(root):
        sae = load_sae(folder, device=device)
        sae.eval()
        name = str(folder.relative_to(base)) if folder.is_relative_to(base) else folder.name
        training = getattr(sae.config, "training", {}) or {}
        target = EvalTarget.of(name, sae, folder)
        if training.get("target_site"):
            from saescope.config import Site
            target.write_site = Site.parse(training["target_site"])
            if target.write_site != target.read_site:
                target.kind = "transcoder"
        targets.append(target)
    return targets


def held_out_batches(tokenizer: Any, config: EvalConfig) -> list[EvalBatch]:
    """``windows_per_domain`` held-out windows of each domain, in batches of ``batch_size``."""
    from saescope.corpus import batch_windows, documents_from_spec, pack_windows, split_documents

    batches: list[EvalBatch] = []
    for domain in config.domains:
        documents = split_documents(documents_from_spec(domain), config.held_out_fraction, part="held_out")
        windows = itertools.islice(pack_windows(documents, tokenizer, config.context_len, drop_last=True),
                                   config.windows_per_domain)
        count = 0
        for batch in batch_windows(windows, config.batch_size):
            batches.append(EvalBatch(domain, batch.input_ids, batch.mask))
            count += batch.input_ids.shape[0]
        if count == 0:
            raise SaescopeError(f"domain {domain!r} has no held-out window of {config.context_len} tokens; "
                                "raise held_out_fraction or lower context_len")
    return batches


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return {}


def evaluate_run(run_dir: str | Path, config: EvalConfig | None = None, *, model: Any = None,
                 progress: bool = True, **overrides: Any) -> Path:
    """Evaluate every SAE of ``run_dir``'s suite; writes ``run_dir/eval/`` and returns ``eval/table.json``.

    ``model``: an already loaded causal LM or :class:`saescope.models.LoadedModel` (with its tokenizer) to
    reuse, e.g. from the demo; otherwise the model named by ``config.model`` or the SAEs is loaded.
    Keyword overrides set :class:`EvalConfig` fields.
    """
    try:
        config = (config or EvalConfig()).model_copy(update=overrides) if overrides else (config or EvalConfig())
        config = EvalConfig.model_validate(config.model_dump())
    except ValidationError as exc:
        raise SaescopeError(f"invalid evaluation settings:\n{exc}") from exc
    run_dir = Path(run_dir)
    targets = load_targets(run_dir, device=config.device)
    run_cfg = _run_config(run_dir)
    if model is None:
        from saescope.models import load_model
        names = {getattr(t.sae.config, "model", None) for t in targets} - {None}
        name = config.model or run_cfg.get("model") or (names.pop() if len(names) == 1 else None)
        if name is None:
            raise SaescopeError("cannot tell which language model the SAEs were trained on "
                                f"(they name {sorted(names) or 'none'}); pass --model NAME")
        model = load_model(name, dtype=config.dtype, device=config.device)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SaescopeError("evaluate_run needs the model's tokenizer: pass a saescope LoadedModel")
    lm = model.model if hasattr(model, "tokenizer") else model
    from saescope.sites import site_width
    for t in targets:
        for site in {t.read_site, t.write_site}:
            width = site_width(lm, site)
            expected = t.sae.d_in if site == t.read_site else t.sae.W_dec.shape[-1]
            if width != expected:
                raise SaescopeError(f"{t.name} expects width {expected} at {site.id} but the model has {width} "
                                    f"there; is it the right model ({getattr(model, 'name', '?')})?")
    batches = held_out_batches(tokenizer, config)
    start = time.perf_counter()
    with torch.inference_mode(False):
        results = evaluate_saes(lm, targets, batches, config.metric_options(), chunk_size=config.chunk_size,
                                progress=progress, total_batches=len(batches))
    seconds = time.perf_counter() - start
    return write_eval(results, run_dir / "eval", extra={
        "eval_config": config.model_dump(), "model": getattr(model, "name", None), "seconds": seconds,
        "run_config": run_cfg})


__all__ = ["EvalConfig", "evaluate_run", "find_suite", "held_out_batches", "load_targets", "table_rows"]
