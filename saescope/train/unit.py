"""One SAE in training: its module, Adam state, running statistics and the step it takes on each batch.

:class:`TrainingUnit` picks the step for the batch — the sparse fast path (:mod:`saescope.train.fast_path`,
compiled kernels or torch ops) while few latents fire, the dense autograd reference otherwise, the
latent-sharded step under latent parallelism, or the TopK / BatchTopK baselines' dense step — then projects the
decoder gradient, takes the Adam step and renormalizes ``W_dec`` (Gemma Scope §3; the loss of every path is
:class:`saescope.train.step.LossOptions`'s).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from saescope import distributed
from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.topk import TopKSAE, batch_topk_training_forward, update_batch_topk_threshold
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import sparse_kernels
from saescope.train.checkpoint import CheckpointError
from saescope.train.config import SAESpec, TrainConfig
from saescope.train.decoder_norm import normalize_rows, project_out_parallel_gradient
from saescope.train.fast_path import dense_training_step, sparse_training_step
from saescope.train.optim import Adam
from saescope.train.schedules import sparsity_coefficient
from saescope.train.step import SAEParams, StepResult
from saescope.version import __version__


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


class TrainingUnit:
    """One SAE being trained: its module, optimizer and running statistics, and its step (the recipe's steps
    2–5 of :mod:`saescope.train.trainer`'s docstring)."""

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
        if spec.target_l0_over == "batch" and parallel is not None and parallel.data_shards > 1:
            raise SaescopeError(f"{spec.name}: target_l0_over = 'batch' takes the batch's mean L0 in one process; "
                                "under data parallelism each rank would see only its rows: train it without "
                                "data shards, or with target_l0_over = 'token'")
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
                         update_clip=config.adam_update_clip,
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

    def training_record(self, tokens_seen: int, steps: int, config: TrainConfig) -> dict[str, Any]:
        """What the SAE's ``config.json`` records of its training (``training``) and ``training_summary.json``
        lists: tokens, steps, the last log window's L0/FVU/MSE, dead fraction, λ, lr and the spec's options."""
        spec = self.spec
        stats = self.summary(tokens_seen, config.dead_window_tokens)
        training: dict[str, Any] = {
            "tokens_seen": tokens_seen, "steps": steps, "final_l0": stats["l0"],
            "fvu": stats["fvu"], "mse": stats["mse"], "dead_fraction": stats["dead_fraction"],
            "sparsity_coefficient": self.lambda_base, "lr": config.lr,
            "batch_size": config.batch_size, "norm_scale": self.module.norm_scale,
            "threshold_parameterization": config.threshold_parameterization,
            "kind": spec.kind, "input_site": spec.site, "saescope_version": __version__,
            "stats_over_last_steps": self.window["steps"],
        }
        if spec.target_site:
            training["target_site"] = spec.target_site
        if spec.target_l0 is not None:
            training["target_l0"] = spec.target_l0
            if spec.target_l0_over != "token":
                training["target_l0_over"] = spec.target_l0_over
        if spec.frequency_penalty:
            training["frequency_penalty"] = spec.frequency_penalty
            training["frequency_cap"] = spec.frequency_cap
        if self.baseline:
            training["architecture"] = spec.architecture
            training["k"] = spec.k
        if spec.matryoshka_prefixes is not None:
            training["matryoshka_prefixes"] = list(spec.matryoshka_prefixes)
            training["matryoshka_weights"] = list(spec.matryoshka_weights or [1.0] * len(spec.matryoshka_prefixes))
        if spec.kind == "transcoder":
            training["skip"] = spec.skip
        return training

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
                raise CheckpointError(
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
