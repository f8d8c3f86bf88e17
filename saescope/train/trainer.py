"""The training loop: many SAEs (and transcoders) stepping on the same batches (Gemma Scope §3).

Per step, each batch (``dict[site_id, Tensor]`` of raw activations) is read once from the source and every
SAE in the config takes one optimizer step on it:

1. normalize: ``x = x_raw / C`` (``C`` the store's norm scale for the site, App. A; for a transcoder the
   input's ``C`` divides both input and target, App. B);
2. loss and gradients with the sparse fast path (:mod:`saescope.train.fast_path`) or the dense autograd
   reference, with ``λ(t)`` from the linear warm-up; the Gemma Scope 2 options of each :class:`SAESpec`
   (``target_l0``: the quadratic penalty around a target L0; Matryoshka prefixes; a transcoder's affine skip
   ``W_skip``, trained by Adam like the rest and untouched by the decoder-norm constraint) go to both steps;
3. remove the component of each ``W_dec`` row's gradient parallel to the row (:mod:`decoder_norm`);
4. Adam (β1 = 0, β2 = 0.999, ε = 1e-8) at ``lr(t)`` (cosine warm-up); ``θ`` trained as ``log θ`` by default;
5. renormalize ``W_dec`` rows to unit norm.

Checkpoints (every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM) hold everything needed to
continue bit for bit; running the same command again resumes. At the end each SAE is standardized
(App. A) and written to ``<out_dir>/suite/<site>/width_<W>/average_l0_<k>/`` with its training summary.

Where each job lives: one SAE's module, optimizer and step in :mod:`saescope.train.unit`; save/resume in
:mod:`saescope.train.checkpoint` (which differences a resume allows: :mod:`saescope.train.compat`); the
first-batch initialisation in :mod:`saescope.train.initialization`; metrics in :mod:`saescope.train.metrics_log`;
signals in :mod:`saescope.train.signals`; the suite's layout in :mod:`saescope.suite`. This module holds the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saescope import distributed
from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.suite import SuiteMember, write_suite
from saescope.train.checkpoint import resume_training, save_training, unit_prefix
from saescope.train.config import SAESpec, TrainConfig
from saescope.train.initialization import initialize_from_first_batch, needs_first_batch
from saescope.train.metrics_log import MetricsLog
from saescope.train.schedules import learning_rate
from saescope.train.signals import StopRequest, stop_on_signals
from saescope.train.sources import BatchStream
from saescope.train.unit import TrainingUnit


class TrainingInterrupted(SaescopeError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; run the same command to resume."""


class Trainer:
    """Trains every SAE in ``config.saes`` on batches from ``source`` (see module docstring).

    ``source``: an iterable of ``dict[site_id, Tensor[batch, d]]`` (raw activations), optionally with
    ``state_dict()/load_state_dict()``. ``norm_scales``: ``C`` per site id (the store's ``norm_scale``).
    ``dims``: ``d`` per site id (read from the first batch when not given).
    """

    def __init__(self, config: TrainConfig, source: Iterable[dict[str, torch.Tensor]],
                 norm_scales: dict[str, float], dims: dict[str, int] | None = None, *, progress: bool = True):
        self.config = config
        self.source = source
        self.stream = BatchStream(source)
        self.norm_scales = {Site.parse(k).id: float(v) for k, v in norm_scales.items()}
        needed = {spec.site for spec in config.saes}
        if config.transcoder_target_scale == "target":
            needed |= {spec.target_site for spec in config.saes if spec.kind == "transcoder"}
        missing = sorted(needed - set(self.norm_scales))
        if missing:
            raise SaescopeError(f"no norm scale C for site(s) {missing}; the activation store estimates it "
                                f"(have: {sorted(self.norm_scales)})")
        for site, c in self.norm_scales.items():
            if not (math.isfinite(c) and c > 0):
                raise SaescopeError(f"norm scale for {site} is {c}; it must be a positive number")
        self.dims = dict(dims) if dims else None
        self.parallel = distributed.current(config.latent_shards)
        self.is_main = self.parallel is None or self.parallel.is_main
        self.progress = progress and self.is_main
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.units: list[TrainingUnit] = []
        self.step = 0
        self.tokens_seen = 0
        self.stop = StopRequest()

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        """One :class:`TrainingUnit` per spec (widths from ``dims``, or from the first batch, kept for step 0)."""
        if self.units:
            return
        if self.dims is None:
            self.dims = {k: int(v.shape[-1]) for k, v in self.stream.peek().items()}
        for site in self.config.sites:
            if site not in self.dims:
                raise SaescopeError(f"the activations hold no site {site} (have: {sorted(self.dims)}); "
                                    "cache it first or remove the SAE that reads it")
        self.units = [
            TrainingUnit(spec, self.config, self.norm_scales[spec.site], self.dims[spec.site],
                         self.dims[spec.target_site] if spec.target_site else self.dims[spec.site], self.parallel,
                         self.norm_scales[spec.target_site] if self._own_target_scale(spec) else None)
            for spec in self.config.saes
        ]

    def _own_target_scale(self, spec: SAESpec) -> bool:
        """Whether this transcoder's target is divided by its own norm scale (``transcoder_target_scale``)."""
        return spec.kind == "transcoder" and self.config.transcoder_target_scale == "target"

    def initialize_from_first_batch(self) -> None:
        """The short-budget initialisation (:mod:`saescope.train.initialization`) from the batch step 0 trains on."""
        initialize_from_first_batch(self.units, self.stream.peek(), self.config, self.parallel)

    def log_line(self, text: str) -> None:
        if self.progress:
            tqdm.write(text)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write a checkpoint (:func:`saescope.train.checkpoint.save_training`; every rank must call)."""
        return save_training(self)

    def resume(self) -> bool:
        """Continue from the newest checkpoint in the run folder, if there is one."""
        path = resume_training(self)
        if path is not None:
            self.log_line(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens)")
        return path is not None

    # ------------------------------------------------------------------ main loop
    def run(self, max_steps: int | None = None) -> dict[str, Path]:
        """Train (resuming from the newest checkpoint if there is one) and write the suite.

        ``max_steps`` stops after that many steps *of this call* (a checkpoint is written; used by tests to
        simulate an interruption). Returns ``{sae name: suite folder}`` once training is complete (empty if
        stopped early by ``max_steps``).
        """
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._build()
        if not self.resume():
            if self.is_main:
                (self.out_dir / "config.toml").write_text(config.to_toml())
            if needs_first_batch(config, self.units):
                self.initialize_from_first_batch()
        log = MetricsLog(config, self.log_line, writes=self.is_main)
        log.open()
        start_step, start_time = self.step, time.perf_counter()
        bar = tqdm(total=config.total_steps * config.batch_size, initial=self.step * config.batch_size,
                   unit="tok", unit_scale=True, desc="train", disable=not self.progress, dynamic_ncols=True)
        finished = True
        try:
            with stop_on_signals(self.stop):
                while self.step < config.total_steps:
                    if max_steps is not None and self.step - start_step >= max_steps:
                        finished = False
                        break
                    batch = self.stream.next()
                    if batch is None:
                        self.log_line(f"the data ran out after {self.step} steps; finishing there")
                        break
                    self._train_step(batch)
                    bar.update(self.units[0].batch_tokens)
                    if self.step % config.log_every == 0:
                        elapsed = time.perf_counter() - start_time
                        rate = (self.step - start_step) * config.batch_size / elapsed if elapsed > 0 else math.nan
                        for unit, row in zip(self.units, log.write(self.step, self.tokens_seen, self.units, rate)):
                            unit.reset_window({k: v for k, v in row.items()
                                               if k in ("loss", "mse", "l0", "fvu", "lambda", "lr")})
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._stop_requested():
                        path = self.save_checkpoint()
                        raise TrainingInterrupted(f"stopped by {self.stop.signal} at step {self.step}; checkpoint "
                                                  f"written to {path}; run the same command again to resume")
        finally:
            bar.close()
            log.close()
        self.save_checkpoint()
        return self.write_suite() if finished else {}

    def _train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Every SAE takes its step on ``batch`` at this step's learning rate (§3: the cosine warm-up)."""
        config = self.config
        lr = learning_rate(self.step, config.lr, config.lr_warmup_steps, config.lr_warmup_start,
                           decay_steps=config.lr_decay_steps, total_steps=config.total_steps)
        for unit in self.units:
            unit.step(batch, self.step, config, lr)
        self.step += 1
        self.tokens_seen += self.units[0].batch_tokens     # the global batch's rows

    def _stop_requested(self) -> bool:
        stop = self.stop.signal is not None
        if self.parallel is not None:     # a signal may reach the ranks at different steps
            stop = distributed.any_rank(stop, self.config.device)
            self.stop.signal = self.stop.signal or ("SIGTERM" if stop else None)
        return stop

    # ------------------------------------------------------------------ output
    def write_suite(self) -> dict[str, Path]:
        """Standardize each SAE (App. A) and write the suite (:func:`saescope.suite.write_suite`).

        Under torch.distributed every rank must call: latent slices are gathered, rank 0 writes, every rank
        returns the folders."""
        if self.parallel is not None:
            for i, unit in enumerate(self.units):
                unit.unshard(unit_prefix(i))
            par, self.parallel = self.parallel, None
            try:
                out = self.write_suite() if par.is_main else None
            finally:
                self.parallel = par
            return distributed.broadcast_object(out)
        members = []
        for unit in self.units:
            training = unit.training_record(self.tokens_seen, self.step, self.config)
            unit.module.config = unit.module.config.model_copy(update={"training": training})
            members.append(SuiteMember(unit.spec.name, unit.module.standardize(), unit.spec.site, unit.spec.kind,
                                       unit.spec.width, training))
        return write_suite(self.out_dir, members)


def train(config: TrainConfig, source: Iterable[dict[str, torch.Tensor]], norm_scales: dict[str, float],
          *, progress: bool = True) -> dict[str, Path]:
    """Train every SAE in ``config`` on ``source`` (resuming if ``out_dir`` holds a checkpoint); returns the
    suite folder of each SAE."""
    return Trainer(config, source, norm_scales, progress=progress).run()


def train_from_store(config: TrainConfig, *, progress: bool = True) -> dict[str, Path]:
    """Train on the activation store at ``config.store`` (``saescope cache`` writes it); resumes if
    ``config.out_dir`` holds a checkpoint. Every check (store complete, sites present) runs before training.

    Under ``torchrun`` it joins the process group (gloo on CPU, NCCL on CUDA) and trains across the ranks
    (:mod:`saescope.distributed`; ``batch_size`` is the global tokens per step)."""
    if config.store is None:
        raise SaescopeError("no activation store given: set store = 'PATH' in the config or pass --store PATH "
                            "(make one with `saescope cache`)")
    if not Path(config.store).exists():
        raise SaescopeError(f"the activation store {config.store} does not exist; make it with `saescope cache`")
    kwargs: dict[str, Any] = {"seed": config.seed, "epochs": None}
    if config.shuffle_buffer:
        kwargs["shuffle_buffer"] = config.shuffle_buffer
    # under torchrun: join the process group; each data rank reads its share of every global batch
    with distributed.process_group(config.device) as device:
        if device != config.device:
            config = config.model_copy(update={"device": device})
        return _train_from_store(config, kwargs, progress)


def _train_from_store(config: TrainConfig, kwargs: dict[str, Any], progress: bool) -> dict[str, Path]:
    from saescope.store.loader import ActivationLoader

    parallel = distributed.current(config.latent_shards)
    batch_size = config.batch_size            # global rows per step: the loader gives each data rank its share
    if parallel is not None:
        kwargs.update(rank=parallel.data_rank, world_size=parallel.data_shards)
    loader = ActivationLoader(config.store, config.sites, batch_size, **kwargs)
    config = _with_store_model(config, loader.index.model)
    norm_scales = {site: loader.norm_scale(site) for site in config.sites}
    dims = {site: loader.d(site) for site in config.sites}
    return Trainer(config, loader, norm_scales, dims, progress=progress).run()


def _with_store_model(config: TrainConfig, store_model: str | None) -> TrainConfig:
    """The SAEs name the language model the store was cached from (``index.json``'s ``model``), so that
    ``evaluate``/``browse``/``steer`` need no ``--model``; a ``model`` given that names another one is an error."""
    if store_model is None:
        return config
    if config.model is None:
        return config.model_copy(update={"model": store_model})
    if config.model != store_model:
        raise SaescopeError(f"--model {config.model!r} disagrees with the activation store {config.store}, which "
                            f"was cached from {store_model!r}; leave --model out (the store's model is recorded) "
                            f"or cache the store from {config.model!r}")
    return config
