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
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saescope import distributed
from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.topk import TopKSAE, batch_topk_training_forward, update_batch_topk_threshold
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import checkpoint as ckpt
from saescope.train import sparse_kernels
from saescope.train.config import (
    DEFAULT_TARGET_L0_LAMBDA,
    NEW_SPEC_DEFAULTS,
    RESUMABLE_CHANGES,
    SAESpec,
    TrainConfig,
    width_label,
)
from saescope.train.decoder_norm import normalize_rows, project_out_parallel_gradient
from saescope.train.fast_path import dense_training_step, sparse_training_step
from saescope.train.optim import Adam
from saescope.train.schedules import learning_rate, sparsity_coefficient
from saescope.train.step import SAEParams, StepResult
from saescope.version import __version__


class TrainingInterrupted(SaescopeError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; run the same command to resume."""


def max_sparse_density(config: TrainConfig) -> float:
    """The L0 / width up to which the trainer takes the sparse step (``TrainConfig.fast_path_max_density``,
    or, when that is None, 0.1 on the compiled CPU kernels and 0.05 on torch ops)."""
    if config.fast_path_max_density is not None:
        return config.fast_path_max_density
    on_kernels = (config.cpu_kernels and torch.device(config.device).type == "cpu"
                  and config.dtype in ("float32", "float64") and sparse_kernels.load() is not None)
    return 0.1 if on_kernels else 0.05


def spec_seed(seed: int, spec: SAESpec) -> int:
    """The initialisation seed of one SAE: depends on the run seed and the SAE, not its position in the list."""
    return int(hashlib.sha256(f"{seed}:{spec.name}".encode()).hexdigest()[:12], 16)


class _Unit:
    """One SAE being trained: its module, optimizer and running statistics."""

    def __init__(self, spec: SAESpec, config: TrainConfig, norm_scale: float, d_in: int, d_out: int,
                 parallel: distributed.Parallel | None = None, target_norm_scale: float | None = None):
        self.spec = spec
        self.parallel = parallel
        self.batch_tokens = 0             # rows of the last step's global batch
        site = Site.parse(spec.site)
        common = {"dtype": config.dtype, "device": config.device, "bandwidth": config.bandwidth,
                      "seed": spec_seed(config.seed, spec), "model": config.model, "site": site.kind, "layer": site.layer}
        if spec.kind == "transcoder":
            if spec.skip:
                common["skip"] = True
            self.module: JumpReLUSAE = JumpReLUTranscoder(d_in, spec.width, norm_scale, d_out=d_out,
                                                          target_norm_scale=target_norm_scale, **common)
        elif spec.architecture == "topk":
            self.module = TopKSAE(d_in, spec.width, norm_scale, k=spec.k, **common)
        else:       # JumpReLU, or BatchTopK (a JumpReLU SAE at inference, θ from the batch selection)
            self.module = JumpReLUSAE(d_in, spec.width, norm_scale, **common)
        m = self.module
        self.baseline = spec.architecture != "jumprelu"      # TopK / BatchTopK: no θ to train, no λ
        if self.baseline and parallel is not None and (
                parallel.latent_shards > 1 or (spec.architecture == "batchtopk" and parallel.data_shards > 1)):
            raise SaescopeError(f"{spec.name}: {spec.architecture} SAEs train in one process or, for topk, data "
                                "parallel without latent sharding (BatchTopK selects over the whole batch)")
        with torch.no_grad():
            if spec.architecture != "topk":
                m.threshold.fill_(config.initial_threshold)
        # latent sharding: keep only this rank's latents (every rank drew the same full initialisation)
        self.latents = (parallel.latent_slice(spec.width) if parallel is not None and parallel.latent_shards > 1
                        else None)
        # λ: the spec's, or (target_l0 without λ) DEFAULT_TARGET_L0_LAMBDA × E‖t‖², set from the first batch
        self.lambda_base: float | None = 0.0 if self.baseline else spec.sparsity_coefficient
        if self.latents is not None:
            self._set_latent_parameters({name: t[:, self.latents] if name == "W_enc" else
                                         t if name == "b_dec" else t[self.latents]
                                         for name, t in m.state_tensors().items()})
        for p in m.parameters():
            p.requires_grad_(False)      # the dense step turns autograd on for its own pass
        self.density = 1.0               # L0 / width of the previous step: picks the sparse or the dense step
        self.max_sparse_density = max_sparse_density(config)
        # W_enc is kept as the transpose of a contiguous [d_sae, d_in] buffer: the sparse encoder gradient is
        # produced latent-major, so Adam then runs on contiguous memory.
        self.W_enc_t = m.W_enc.detach().t().contiguous()
        m.W_enc.data = self.W_enc_t.t()
        self.log_threshold = (torch.log(m.threshold.detach().clone())
                              if config.threshold_parameterization == "log" and not self.baseline else None)
        params = {"W_enc": self.W_enc_t, "b_enc": m.b_enc.data, "W_dec": m.W_dec.data, "b_dec": m.b_dec.data}
        if not self.baseline:
            params["threshold"] = self.log_threshold if self.log_threshold is not None else m.threshold.data
        if self.W_skip is not None:       # skip transcoder: W_skip [d_in, d_out] trained with the rest
            params["W_skip"] = self.W_skip.data
        self.adam = Adam(params, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps,
                         lr_scale={"threshold": config.threshold_lr_scale if spec.threshold_lr_scale is None
                                   else spec.threshold_lr_scale})
        self.tokens_since_fired = torch.zeros(m.W_dec.shape[0], dtype=torch.int64)
        self.window: dict[str, float] = {"steps": 0, "loss": 0.0, "reconstruction": 0.0, "l0": 0.0,
                                         "variance": 0.0, "tokens": 0}
        self.last: dict[str, float] = {}
        self.last_logged: dict[str, float] = {}

    @property
    def W_skip(self) -> torch.Tensor | None:
        """The skip transcoder's ``W_skip`` parameter (None for an SAE or a plain transcoder)."""
        return getattr(self.module, "W_skip", None)

    # ------------------------------------------------------------------ one step
    def step(self, batch: dict[str, torch.Tensor], step: int, config: TrainConfig, lr: float) -> None:
        spec, m = self.spec, self.module
        if self.lambda_base is None:
            raise SaescopeError(f"{spec.name}: λ was not set from the first batch (internal error)")
        lam = sparsity_coefficient(step, self.lambda_base, config.sparsity_warmup_steps)
        loss = spec.loss_options(lam)
        x_raw = batch[spec.site].to(config.device)
        target_raw = batch[spec.target_site].to(config.device) if spec.target_site else None
        par = self.parallel
        # data parallel: the frequency penalty reads the global batch's firing counts
        reduce_counts = (distributed.count_reducer(par.data_group)
                         if loss.frequency and par is not None and par.data_shards > 1 else None)
        if self.baseline:                 # TopK / BatchTopK: the dense step on the reconstruction alone
            result, kept_min = baseline_training_step(m, x_raw, spec.architecture, spec.k)
            if spec.architecture == "batchtopk":
                update_batch_topk_threshold(m, kept_min, first=step == 0)
        elif self.latents is not None:    # latent sharding: the dense step with summed partial reconstructions
            result = distributed.sharded_training_step(m, x_raw, loss, target_raw, par.latent_group,
                                                       latent_offset=self.latents.start, d_sae=spec.width,
                                                       reduce_counts=reduce_counts)
        elif config.fast_path and self.density <= self.max_sparse_density:
            x = m.normalize(x_raw)
            target = m.normalize_target(target_raw) if target_raw is not None else None
            result = sparse_training_step(SAEParams.of(m), x, target, loss, kernels=config.cpu_kernels,
                                          project_decoder_gradient=True, reuse_gradient_buffers=True,
                                          reduce_counts=reduce_counts)   # Adam consumes the buffers below
        else:
            for p in m.parameters():
                p.requires_grad_(True)
            try:
                result = dense_training_step(m, x_raw, loss, target_raw, reduce_counts=reduce_counts)
            finally:
                for p in m.parameters():
                    p.requires_grad_(False)
        batch_tokens = x_raw.shape[0]
        if par is not None and par.data_shards > 1:   # data parallel: the global batch's mean gradient
            result.grads, batch_tokens = distributed.average_gradients(result.grads, par.data_group, batch_tokens)
            with torch.no_grad():
                target_rows = m.normalize_target(target_raw) if target_raw is not None else m.normalize(x_raw)
            distributed.reduce_step_statistics(result, par.data_group, x_raw.shape[0], target_rows)
        self.batch_tokens = batch_tokens      # rows of the global batch (every data rank's)
        self.density = result.l0 / spec.width
        grads = dict(result.grads)
        with torch.no_grad():
            if not result.decoder_gradient_projected:
                project_out_parallel_gradient(m.W_dec, grads["W_dec"])
            grads["W_enc"] = grads["W_enc"].t()
            if self.log_threshold is not None:
                grads["threshold"] = grads["threshold"] * m.threshold     # ∂L/∂log θ = θ·∂L/∂θ
            self.adam.step(grads, lr)
            if self.log_threshold is not None:
                m.threshold.copy_(torch.exp(self.log_threshold))
            elif not self.baseline:
                m.threshold.clamp_(min=0.0)
            normalize_rows(m.W_dec)
        self.tokens_since_fired += batch_tokens
        self.tokens_since_fired[result.fired.cpu()] = 0
        w = self.window
        w["steps"] += 1
        w["tokens"] += batch_tokens
        w["loss"] += result.loss
        # FVU and MSE from the whole dictionary's error (with Matryoshka, `reconstruction` is the prefix sum)
        full = result.full_reconstruction
        w["reconstruction"] += (result.reconstruction if full is None else full) * batch_tokens
        w["l0"] += result.l0 * batch_tokens
        w["variance"] += result.total_variance
        self.last = {"lambda": lam, "lr": lr}
        if not math.isfinite(result.loss):
            raise SaescopeError(f"{spec.name}: the loss became {result.loss} at step {step}; lower lr or check "
                                "the activations for inf/nan")

    def dead_fraction(self, tokens_seen: int, window_tokens: int) -> float:
        limit = min(window_tokens, tokens_seen)
        if limit <= 0:
            return 0.0
        if self.latents is not None:      # count over every shard's latents
            dead = torch.tensor([float((self.tokens_since_fired >= limit).sum())], dtype=torch.float64,
                                device=self.module.device)
            torch.distributed.all_reduce(dead, group=self.parallel.latent_group)
            return float(dead[0]) / self.spec.width
        return float((self.tokens_since_fired >= limit).float().mean())

    def summary(self, tokens_seen: int, window_tokens: int) -> dict[str, float]:
        """Means over the steps since the last log line (loss, MSE, L0, FVU) and the dead fraction.

        Right after a log line (no steps since) it repeats the logged means, with a fresh dead fraction."""
        w = self.window
        if w["steps"] == 0 and self.last_logged:
            return {**self.last_logged, "dead_fraction": self.dead_fraction(tokens_seen, window_tokens)}
        n = max(w["tokens"], 1)
        return {"loss": w["loss"] / max(w["steps"], 1), "mse": w["reconstruction"] / n, "l0": w["l0"] / n,
                "fvu": w["reconstruction"] / w["variance"] if w["variance"] > 0 else float("nan"),
                "dead_fraction": self.dead_fraction(tokens_seen, window_tokens), **self.last}

    def reset_window(self, logged: dict[str, float]) -> None:
        self.last_logged = dict(logged)
        self.window = {k: 0 if k in ("steps", "tokens") else 0.0 for k in self.window}

    # ------------------------------------------------------------------ latent shards
    @torch.no_grad()
    def _set_latent_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Replace the module's parameters by ``params`` (a slice of the latents, or all of them)."""
        m = self.module
        for name, t in params.items():
            if name != "W_skip":          # W_skip has no latent axis: every shard keeps all of it
                getattr(m, name).data = t.clone()
        m.config = m.config.model_copy(update={"d_sae": int(params["W_dec"].shape[0])})

    @torch.no_grad()
    def unshard(self, prefix: str) -> None:
        """Gather the full SAE from every latent rank (all must call) into this unit; training is over."""
        if self.latents is None:
            return
        par = self.parallel
        local = {f"{prefix}/param/{k}": v for k, v in self.module.state_tensors().items()}
        local[f"{prefix}/tokens_since_fired"] = self.tokens_since_fired
        full = distributed.gather_latents(local, prefix, par.latent_group, par.latent_shards)
        self._set_latent_parameters({k[len(prefix) + 7:]: v for k, v in full.items() if "/param/" in k})
        self.tokens_since_fired = full[f"{prefix}/tokens_since_fired"].clone()
        self.latents = None

    # ------------------------------------------------------------------ checkpoint state
    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/param/{k}": v for k, v in self.module.state_tensors().items()}
        out.update({f"{prefix}/adam/{k}": v for k, v in self.adam.state_tensors().items()})
        if self.log_threshold is not None:
            out[f"{prefix}/log_threshold"] = self.log_threshold
        out[f"{prefix}/tokens_since_fired"] = self.tokens_since_fired
        return out

    @torch.no_grad()
    def load_state_tensors(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, target in self.module.state_tensors().items():
            source = tensors.get(f"{prefix}/param/{name}")
            if source is None or source.shape != target.shape or source.dtype != target.dtype:
                found = None if source is None else (tuple(source.shape), str(source.dtype))
                raise ckpt.CheckpointError(
                    f"the checkpoint's {prefix} {name} is {found} but the config asks for "
                    f"{(tuple(target.shape), str(target.dtype))}: the checkpoint was made by a different run")
            getattr(self.module, name).copy_(source)
        self.adam.load_state_tensors({k[len(prefix) + 6:]: v for k, v in tensors.items()
                                      if k.startswith(f"{prefix}/adam/")})
        if self.log_threshold is not None:
            self.log_threshold.copy_(tensors[f"{prefix}/log_threshold"])
        self.tokens_since_fired.copy_(tensors[f"{prefix}/tokens_since_fired"])


def baseline_training_step(module: JumpReLUSAE, x_raw: torch.Tensor, architecture: str, k: int
                           ) -> tuple[StepResult, float | None]:
    """One TopK / BatchTopK step (:mod:`saescope.sae.topk`): ``mean_b ‖x − x̂‖²`` and autograd; for BatchTopK
    also the smallest value the batch kept (its inference threshold's sample)."""
    for p in module.parameters():
        p.grad = None
        p.requires_grad_(True)
    try:
        if architecture == "topk":
            out, kept_min = module.training_forward(x_raw), None
        else:
            out, kept_min = batch_topk_training_forward(module, x_raw, k)
        out.loss.backward()
        grads = {name: getattr(module, name).grad for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    finally:
        for p in module.parameters():
            p.grad = None
            p.requires_grad_(False)
    with torch.no_grad():
        centred = out.x - out.x.mean(dim=0)
        reconstruction = float(out.reconstruction.detach().mean())
    return StepResult(loss=float(out.loss.detach()), reconstruction=reconstruction,
                      l0=float(out.l0.to(torch.float64).mean()), total_variance=float(centred.pow(2).sum()),
                      fired=(out.latents.detach() != 0).any(dim=0), grads=grads,
                      full_reconstruction=reconstruction), kept_min


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
        self.progress = progress and (self.parallel is None or self.parallel.is_main)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.units: list[_Unit] = []
        self.step = 0
        self.tokens_seen = 0
        self._stop_signal: str | None = None
        self._iterator = None
        self._pending_batch: dict[str, torch.Tensor] | None = None
        self._pending_state: Any = None
        self._loggers: list[Any] = []

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        if self.units:
            return
        if self.dims is None:
            batch = self._pull_pending()
            self.dims = {k: int(v.shape[-1]) for k, v in batch.items()}
        for site in self.config.sites:
            if site not in self.dims:
                raise SaescopeError(f"the activations hold no site {site} (have: {sorted(self.dims)}); "
                                    "cache it first or remove the SAE that reads it")
        self.units = [
            _Unit(spec, self.config, self.norm_scales[spec.site], self.dims[spec.site],
                  self.dims[spec.target_site] if spec.target_site else self.dims[spec.site], self.parallel,
                  self.norm_scales[spec.target_site] if self._own_target_scale(spec) else None)
            for spec in self.config.saes
        ]

    def _own_target_scale(self, spec: SAESpec) -> bool:
        """Whether this transcoder's target is divided by its own norm scale (``transcoder_target_scale``)."""
        return spec.kind == "transcoder" and self.config.transcoder_target_scale == "target"

    def _unit_prefix(self, index: int) -> str:
        return f"sae{index}"

    def _meta(self) -> dict[str, Any]:
        return {
            "saescope_version": __version__, "fingerprint": self.config.fingerprint(),
            "config": self.config.model_dump(mode="json"), "tokens_seen": self.tokens_seen,
            "norm_scales": self.norm_scales, "saes": [u.spec.name for u in self.units],
            "windows": [u.window for u in self.units], "last": [u.last for u in self.units],
            "last_logged": [u.last_logged for u in self.units], "density": [u.density for u in self.units],
            "lambda_base": [u.lambda_base for u in self.units],
        }

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the full SAEs. Under torch.distributed every rank must call: latent slices are
        gathered, every data rank's loader position is recorded, and rank 0 alone writes."""
        par = self.parallel
        tensors: dict[str, torch.Tensor] = {}
        for i, unit in enumerate(self.units):
            prefix = self._unit_prefix(i)
            state = unit.state_tensors(prefix)
            if unit.latents is not None:
                state = distributed.gather_latents(state, prefix, par.latent_group, par.latent_shards)
            tensors.update(state)
        meta = self._meta()
        meta["rng"] = ckpt.capture_rng(tensors)
        if hasattr(self.source, "state_dict"):
            # the global data position: the same on every rank (the sources walk the same global batches)
            state = self._pending_state if self._pending_batch is not None else self.source.state_dict()
            if par is not None and par.data_shards > 1 and not all(
                    _same_state(other, state) for other in distributed.all_gather_object(state)):
                raise SaescopeError(
                    "under data parallel every rank's batch source must report the same (global) position: give "
                    "each rank its share of one global source (saescope.distributed.DataShard, or an "
                    "ActivationLoader with rank/world_size), not a stream of its own")
            meta["loader"] = ckpt.split_state(state, "loader", tensors)
        else:
            meta["loader"] = None
        if par is None:
            return ckpt.save_checkpoint(self.checkpoint_dir, self.step, tensors, meta)
        meta["world_size"], meta["latent_shards"] = par.world_size, par.latent_shards
        path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, tensors, meta) if par.is_main else None
        distributed.barrier()
        return path if path is not None else self.checkpoint_dir / f"step_{self.step:08d}"

    def _resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        tensors, meta = ckpt.load_checkpoint(path)
        if meta.get("fingerprint") != self.config.fingerprint():
            saved = meta.get("config", {})
            current = self.config.model_dump(mode="json")
            diffs = sorted(k for k in set(saved) | set(current)
                           if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
            if "saes" in diffs:           # say which SAE setting changed (e.g. target_l0, skip, λ)
                diffs.remove("saes")
                old_saes, new_saes = saved.get("saes") or [], current.get("saes") or []
                for i, (a, b) in enumerate(zip(old_saes, new_saes)):
                    diffs += [f"saes[{i}].{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
                              if a.get(k, NEW_SPEC_DEFAULTS.get(k)) != b.get(k, NEW_SPEC_DEFAULTS.get(k))]
                if len(old_saes) != len(new_saes):
                    diffs.append(f"the number of SAEs: {len(old_saes)} → {len(new_saes)}")
            # no setting differs: the same config under an older fingerprint rule (one that hashed `model`)
            if diffs:
                raise ckpt.CheckpointError(
                    f"the checkpoint in {path} was made with a different config (differs in: {', '.join(diffs)}); "
                    f"use a new out_dir, or delete {self.checkpoint_dir} to start over")
        if meta.get("saes") != [u.spec.name for u in self.units]:
            raise ckpt.CheckpointError(f"the checkpoint in {path} trains {meta.get('saes')}, not "
                                       f"{[u.spec.name for u in self.units]}")
        saved_scales = meta.get("norm_scales", {})
        for site in {u.spec.site for u in self.units}:
            if saved_scales.get(site) != self.norm_scales[site]:
                raise ckpt.CheckpointError(
                    f"the checkpoint in {path} used norm scale {saved_scales.get(site)} for {site} but this run "
                    f"has {self.norm_scales[site]}: the activations changed; use a new out_dir")
        for i, unit in enumerate(self.units):
            prefix = self._unit_prefix(i)
            unit.load_state_tensors(prefix, tensors if unit.latents is None else
                                    distributed.slice_latents(tensors, prefix, unit.latents))
            unit.window = dict(meta["windows"][i])
            unit.last = dict(meta["last"][i])
            unit.last_logged = dict(meta["last_logged"][i])
            unit.density = float(meta["density"][i])
            saved_lambda = (meta.get("lambda_base") or [None] * len(self.units))[i]
            if saved_lambda is not None:
                unit.lambda_base = float(saved_lambda)
            elif unit.lambda_base is None:
                raise ckpt.CheckpointError(f"the checkpoint in {path} does not record λ of {unit.spec.name}; "
                                           "use a new out_dir")
        self.step = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        ckpt.restore_rng(meta["rng"], tensors)
        loader_state = meta.get("loader")
        saved_ranks = [ckpt.join_state(state, tensors) for state in meta.get("loader_ranks") or []]
        if any(state != saved_ranks[0] for state in saved_ranks):
            raise ckpt.CheckpointError(
                f"the checkpoint in {path} records one data position per rank (an older saescope, where each data "
                "rank read its own stream); it cannot continue the same rows here; use a new out_dir")
        shards = self.parallel.data_shards if self.parallel is not None else 1
        saved_shards = int(meta.get("world_size", 1)) // int(meta.get("latent_shards", 1))
        if saved_shards != shards:
            self._log_line(f"resuming on {shards} data rank(s) from a checkpoint of {saved_shards}: the same "
                           "global batches continue")
        self._iterator = None
        self._pending_batch = None
        if loader_state is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(ckpt.join_state(loader_state, tensors))
            self._iterator = iter(self.source)
        else:
            # A source without a position: replay it to the same point (exact, but reads the skipped data).
            self._iterator = iter(self.source)
            for _ in range(self.step):
                next(self._iterator)
        self._log_line(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens)")
        return True

    # ------------------------------------------------------------------ logging
    def _log_line(self, text: str) -> None:
        if self.progress:
            tqdm.write(text)

    def _open_loggers(self) -> None:
        if self.parallel is not None and not self.parallel.is_main:
            return
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SaescopeError("tensorboard logging needs the tensorboard package: pip install tensorboard"
                                    ) from exc
            self._loggers.append(("tensorboard", SummaryWriter(str(self.out_dir / "tensorboard"))))
        if self.config.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise SaescopeError("Weights & Biases logging needs wandb: pip install wandb") from exc
            run = wandb.init(mode="offline", dir=str(self.out_dir), project="saescope",
                             config=self.config.model_dump(mode="json"), resume="allow",
                             id=f"saescope-{self.config.fingerprint()}")
            self._loggers.append(("wandb", run))

    def _close_loggers(self) -> None:
        for kind, logger in self._loggers:
            if kind == "tensorboard":
                logger.close()
            else:
                logger.finish()
        self._loggers = []

    def _log_metrics(self, elapsed: float, tokens_this_session: int) -> list[dict[str, Any]]:
        rows = []
        rate = tokens_this_session / elapsed if elapsed > 0 else float("nan")
        if self.parallel is not None and not self.parallel.is_main:
            # the other ranks only take part in the reductions the summaries need
            return [{"step": self.step, "sae": unit.spec.name,
                     **unit.summary(self.tokens_seen, self.config.dead_window_tokens)} for unit in self.units]
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            for unit in self.units:
                row = {"step": self.step, "tokens": self.tokens_seen, "sae": unit.spec.name,
                       "tokens_per_s": rate,
                       **unit.summary(self.tokens_seen, self.config.dead_window_tokens)}
                fh.write(json.dumps(row) + "\n")
                rows.append(row)
                self._log_line(f"step {self.step:>7} {unit.spec.name}: loss {row['loss']:.4g} mse {row['mse']:.4g} "
                               f"L0 {row['l0']:.1f} fvu {row['fvu']:.3f} dead {row['dead_fraction']:.1%} "
                               f"λ {row.get('lambda', 0):.3g} lr {row.get('lr', 0):.3g}")
                for kind, logger in self._loggers:
                    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
                    if kind == "tensorboard":
                        for k, v in scalars.items():
                            logger.add_scalar(f"{unit.spec.name}/{k}", v, self.step)
                    else:
                        logger.log({f"{unit.spec.name}/{k}": v for k, v in scalars.items()}, step=self.step)
        return rows

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    # ------------------------------------------------------------------ main loop
    def _pull_pending(self) -> dict[str, torch.Tensor]:
        """Read one batch ahead (to learn widths or initialise θ) and keep it for the first step; the source's
        position from before it is what a checkpoint taken before that step records."""
        self._pending_state = copy.deepcopy(self.source.state_dict()) if hasattr(self.source, "state_dict") else None
        if self._iterator is None:
            self._iterator = iter(self.source)
        try:
            self._pending_batch = next(self._iterator)
        except StopIteration as exc:
            raise SaescopeError("the batch source yielded no batches") from exc
        return self._pending_batch

    def _next_batch(self) -> dict[str, torch.Tensor] | None:
        if self._pending_batch is not None:
            batch, self._pending_batch = self._pending_batch, None
            return batch
        if self._iterator is None:
            self._iterator = iter(self.source)
        try:
            return next(self._iterator)
        except StopIteration:
            return None

    def run(self, max_steps: int | None = None) -> dict[str, Path]:
        """Train (resuming from the newest checkpoint if there is one) and write the suite.

        ``max_steps`` stops after that many steps *of this call* (a checkpoint is written; used by tests to
        simulate an interruption). Returns ``{sae name: suite folder}`` once training is complete (empty if
        stopped early by ``max_steps``).
        """
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._build()
        resumed = self._resume()
        if not resumed:
            if self.parallel is None or self.parallel.is_main:
                (self.out_dir / "config.toml").write_text(config.to_toml())
            if (config.initial_threshold_quantile is not None or config.initial_b_dec != "zeros"
                    or config.initial_exclude_top_pcs or any(unit.lambda_base is None for unit in self.units)
                    or (config.initial_W_skip != "zeros" and any(u.W_skip is not None for u in self.units))
                    or (config.initial_transcoder_W_dec != "random"
                        and any(u.spec.kind == "transcoder" for u in self.units))):
                self._init_from_first_batch()
        total = config.total_steps
        self._open_loggers()
        previous = self._install_signals()
        start_step, start_time = self.step, time.perf_counter()
        bar = tqdm(total=total * config.batch_size, initial=self.step * config.batch_size, unit="tok",
                   unit_scale=True, desc="train", disable=not self.progress, dynamic_ncols=True)
        finished = True
        try:
            while self.step < total:
                if max_steps is not None and self.step - start_step >= max_steps:
                    finished = False
                    break
                batch = self._next_batch()
                if batch is None:
                    self._log_line(f"the data ran out after {self.step} steps; finishing there")
                    break
                lr = learning_rate(self.step, config.lr, config.lr_warmup_steps, config.lr_warmup_start)
                for unit in self.units:
                    unit.step(batch, self.step, config, lr)
                batch_tokens = self.units[0].batch_tokens     # the global batch's rows
                self.step += 1
                self.tokens_seen += batch_tokens
                bar.update(batch_tokens)
                if self.step % config.log_every == 0:
                    rows = self._log_metrics(time.perf_counter() - start_time,
                                             (self.step - start_step) * config.batch_size)
                    for unit, row in zip(self.units, rows):
                        unit.reset_window({k: v for k, v in row.items() if k in
                                           ("loss", "mse", "l0", "fvu", "lambda", "lr")})
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                stop = self._stop_signal is not None
                if self.parallel is not None:     # a signal may reach the ranks at different steps
                    stop = distributed.any_rank(stop, config.device)
                    self._stop_signal = self._stop_signal or ("SIGTERM" if stop else None)
                if stop:
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(f"stopped by {self._stop_signal} at step {self.step}; checkpoint "
                                              f"written to {path}; run the same command again to resume")
        finally:
            bar.close()
            self._restore_signals(previous)
            self._close_loggers()
        self.save_checkpoint()
        if not finished:
            return {}
        return self.write_suite()

    @torch.no_grad()
    def _init_from_first_batch(self) -> None:
        """Short-budget initialisation from the first batch (which is then trained on): the top
        ``initial_exclude_top_pcs`` principal directions of the centered normalized input projected out of each
        latent's encoder direction (re-normalized; an SAE's decoder stays tied, ``W_dec = W_encᵀ``), ``b_dec`` ←
        mean of the normalized target (``initial_b_dec="mean"``), then θ_i ← max(initial_threshold, q-quantile
        of z_i) (``initial_threshold_quantile=q``); a skip transcoder's ``W_skip`` ← the least-squares map from the
        normalized input to the normalized target (``initial_W_skip="least_squares"``; ``b_dec`` then ← mean of
        ``t − x W_skip``); a transcoder's decoder rows ← the mean centered target of the tokens each latent fires
        on (``initial_transcoder_W_dec="fired_target_mean"``). A ``target_l0`` SAE without λ gets
        ``λ = DEFAULT_TARGET_L0_LAMBDA · mean_b ‖t_b‖²`` (t the normalized target: ≈ 1 for an SAE and for a
        transcoder at its own target scale, ≈ 2,500 for a Gemma 3 transcoder at the input's), so the penalty keeps
        the same weight against the reconstruction error."""
        batch = self._pending_batch if self._pending_batch is not None else self._pull_pending()
        par = self.parallel
        if par is not None and par.data_shards > 1:   # the global first batch, as one process would see it
            batch = distributed.gather_batch(batch, par.data_group, par.data_shards)
        q = self.config.initial_threshold_quantile
        for unit in self.units:
            m = unit.module
            x_raw = batch[unit.spec.site].to(self.config.device)
            x = m.normalize(x_raw)
            target = (m.normalize_target(batch[unit.spec.target_site].to(self.config.device))
                      if unit.spec.target_site else x).to(torch.float64)
            if self.config.initial_exclude_top_pcs:
                _exclude_top_pcs(unit, x, self.config.initial_exclude_top_pcs)
            if unit.lambda_base is None:
                unit.lambda_base = DEFAULT_TARGET_L0_LAMBDA * float(target.pow(2).sum(dim=1).mean())
            fit_skip = unit.W_skip is not None and self.config.initial_W_skip == "least_squares"
            if self.config.initial_b_dec == "mean" or fit_skip:
                if fit_skip:
                    x = x.to(torch.float64)
                    w_skip = least_squares_map(x, target)
                    unit.W_skip.copy_(w_skip.to(unit.W_skip.dtype))
                    target = target - x @ w_skip
                if self.config.initial_b_dec == "mean":
                    m.b_dec.copy_(target.mean(dim=0).to(m.b_dec.dtype))
            fired_rows = (unit.spec.kind == "transcoder"
                          and self.config.initial_transcoder_W_dec == "fired_target_mean")
            if q is None and not fired_rows:
                continue
            z = m.pre_activations(x_raw).to(torch.float64)
            if q is not None and not unit.baseline:
                theta = torch.quantile(z, q, dim=0).clamp_min(self.config.initial_threshold)
                m.threshold.copy_(theta.to(m.threshold.dtype))
                if unit.log_threshold is not None:
                    unit.log_threshold.copy_(torch.log(m.threshold))
            if fired_rows:
                _decoder_from_fired_targets(m, z, target)

    # ------------------------------------------------------------------ output
    def write_suite(self) -> dict[str, Path]:
        """Standardize each SAE (App. A) and write it to ``suite/<site>/width_<W>/average_l0_<k>/``.

        Under torch.distributed every rank must call: latent slices are gathered, rank 0 writes, every rank
        returns the folders."""
        if self.parallel is not None:
            for i, unit in enumerate(self.units):
                unit.unshard(self._unit_prefix(i))
            par, self.parallel = self.parallel, None
            try:
                out = self.write_suite() if par.is_main else None
            finally:
                self.parallel = par
            return distributed.broadcast_object(out)
        out: dict[str, Path] = {}
        used: set[Path] = set()
        summary_rows = []
        for unit in self.units:
            spec = unit.spec
            stats = unit.summary(self.tokens_seen, self.config.dead_window_tokens)
            training = {
                "tokens_seen": self.tokens_seen, "steps": self.step, "final_l0": stats["l0"],
                "fvu": stats["fvu"], "mse": stats["mse"], "dead_fraction": stats["dead_fraction"],
                "sparsity_coefficient": unit.lambda_base, "lr": self.config.lr,
                "batch_size": self.config.batch_size, "norm_scale": unit.module.norm_scale,
                "threshold_parameterization": self.config.threshold_parameterization,
                "kind": spec.kind, "input_site": spec.site, "saescope_version": __version__,
                "stats_over_last_steps": unit.window["steps"],
            }
            if spec.target_site:
                training["target_site"] = spec.target_site
            if spec.target_l0 is not None:
                training["target_l0"] = spec.target_l0
            if spec.frequency_penalty:
                training["frequency_penalty"] = spec.frequency_penalty
                training["frequency_cap"] = spec.frequency_cap
            if unit.baseline:
                training["architecture"] = spec.architecture
                training["k"] = spec.k
            if spec.matryoshka_prefixes is not None:
                training["matryoshka_prefixes"] = list(spec.matryoshka_prefixes)
                training["matryoshka_weights"] = list(spec.matryoshka_weights or [1.0] * len(spec.matryoshka_prefixes))
            if spec.kind == "transcoder":
                training["skip"] = spec.skip
            unit.module.config = unit.module.config.model_copy(update={"training": training})
            standardized = unit.module.standardize()
            if spec.kind == "transcoder":
                site_folder = Path("transcoder") / f"layer_{Site.parse(spec.site).layer}"
            else:
                site_folder = Path(spec.site)
            k = round(stats["l0"]) if math.isfinite(stats["l0"]) else 0
            folder = self.out_dir / "suite" / site_folder / f"width_{width_label(spec.width)}" / f"average_l0_{k}"
            n = 2
            base = folder
            while folder in used:
                folder = base.with_name(f"{base.name}_{n}")
                n += 1
            used.add(folder)
            standardized.save(folder)
            out[spec.name] = folder
            summary_rows.append({"sae": spec.name, "folder": str(folder.relative_to(self.out_dir)), **training})
        (self.out_dir / "suite").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "suite" / "training_summary.json").write_text(json.dumps(summary_rows, indent=2) + "\n")
        return out


@torch.no_grad()
def _exclude_top_pcs(unit: _Unit, x: torch.Tensor, k: int) -> None:
    """Project the top ``k`` principal directions of ``x`` (centered, float64) out of the unit's encoder
    directions (columns of ``W_enc``), re-normalize them, and re-tie an SAE's decoder (``W_dec = W_encᵀ``)."""
    m = unit.module
    d_in = x.shape[1]
    if k >= min(d_in, x.shape[0]):
        raise SaescopeError(f"initial_exclude_top_pcs={k} must be below the input width {d_in} and the batch size "
                            f"{x.shape[0]}; use a small number such as 1")
    x64 = x.to(torch.float64)
    top = torch.linalg.svd(x64 - x64.mean(dim=0), full_matrices=False).Vh[:k]      # [k, d_in]
    w = m.W_enc.detach().to(torch.float64)
    w = w - top.T @ (top @ w)
    w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    m.W_enc.copy_(w.to(m.W_enc.dtype))            # writes through to the contiguous W_enc_t buffer
    if unit.spec.kind == "sae":
        m.W_dec.copy_(w.t().to(m.W_dec.dtype))


def _decoder_from_fired_targets(m: JumpReLUSAE, z: torch.Tensor, target: torch.Tensor) -> None:
    """``W_dec[i] ← normalize(Σ_{b: z_bi > θ_i} (t_b − t̄))`` (``initial_transcoder_W_dec="fired_target_mean"``):
    each latent's decoder row points along the mean centered target of the first-batch tokens it fires on; a
    latent firing on none keeps its row."""
    fires = (z > m.threshold.detach().to(torch.float64)).to(torch.float64)          # [B, d_sae]
    w = fires.T @ (target - target.mean(dim=0))                                      # [d_sae, d_out]
    norms = w.norm(dim=1)
    ok = norms > 0
    rows = m.W_dec.detach().to(torch.float64).clone()
    rows[ok] = w[ok] / norms[ok].unsqueeze(1)
    m.W_dec.copy_(rows.to(m.W_dec.dtype))


def least_squares_map(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``W = argmin_W ‖(y − ȳ) − (x − x̄) W‖² + ridge·mean(diag XᵀX)·‖W‖²`` in float64: the linear part of the map
    from ``x [B, d_in]`` to ``y [B, d_out]`` (a tiny ridge so a batch smaller than ``d_in`` still has one answer)."""
    xc = (x - x.mean(dim=0)).to(torch.float64)
    yc = (y - y.mean(dim=0)).to(torch.float64)
    gram = xc.T @ xc
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-300)
    return torch.linalg.solve(gram, xc.T @ yc)


def _same_state(a: Any, b: Any) -> bool:
    """Whether two batch-source positions are equal (positions holding tensors are taken as equal)."""
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return True


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
