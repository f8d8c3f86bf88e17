"""Training across processes with ``torch.distributed``: data parallelism and latent sharding.

Gemma Scope trained its SAEs on many accelerators by sharding data and latents (§4.3 of the paper). saescope
uses the standard engine for that: ``torchrun`` starts the processes and ``torch.distributed`` moves the
tensors (gloo on CPU, NCCL on GPU, the same code). The ``world_size`` ranks form a grid
``data_shards × latent_shards`` (``TrainConfig.latent_shards``; ``rank = data_rank · latent_shards +
latent_rank``):

- **data parallel** — every data rank walks the same sequence of global batches of ``batch_size`` rows and
  takes its own share of each (about ``batch_size / data_shards`` rows; see
  :class:`saescope.store.loader.ActivationLoader` and :class:`DataShard`), so step ``t`` trains on the same
  rows whatever the number of ranks, and the data position in a checkpoint is global (a run resumes on another
  number of ranks with the next global batch). Each rank's loss is a mean over its ``n_r`` rows, so the
  global-batch gradient is ``Σ_r n_r g_r / Σ_r n_r``: one ``all_reduce`` of the row-weighted gradients (and
  of ``n_r``) before the decoder-norm projection and the Adam step. Every rank then applies the same update
  and the replicas stay equal.
- **latent sharding** — each latent rank holds a contiguous slice of the latents: columns of ``W_enc``, rows of
  ``W_dec``, entries of ``b_enc`` / ``θ``, plus a replica of ``b_dec``. The partial reconstructions
  ``f_r W_dec,r`` and the partial L0 counts are summed with one ``all_reduce`` (:func:`reduce_from_shards`,
  whose backward passes the gradient through because every rank then computes the same loss), ``b_dec`` is
  added once. ``b_dec`` also enters each shard's encoder (``x − b_dec``); that use goes through
  :func:`copy_to_shards` (identity forward, ``all_reduce`` of the gradient backward), so the replicas of
  ``b_dec`` get the full gradient. This is the tensor-parallel "f/g" operator pair of Megatron-LM.

Checkpoints hold the full parameters (gathered to rank 0, which alone writes), so a run resumes on any world
size. Outside ``torch.distributed`` (the default) none of this code runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from saescope.errors import SaescopeError
from saescope.sae.losses import CountReducer, LossOptions, as_loss_options, check_prefixes, frequency_loss
from saescope.sae.ste import heaviside, jumprelu
from saescope.train.step import StepResult

# ---------------------------------------------------------------------- process group


def init_from_env(device: str = "cpu") -> str:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), once.

    The backend follows the device: NCCL for CUDA, gloo otherwise. Returns the device this rank should use
    (``cuda`` becomes ``cuda:<LOCAL_RANK>``); outside torchrun it returns ``device`` unchanged.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return device
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


@contextmanager
def process_group(device: str = "cpu") -> Iterator[str]:
    """:func:`init_from_env` for the length of a ``with`` block; a group it created is shut down at the end
    (after a barrier when the block succeeded), so no rank exits while another's gloo/NCCL threads still talk
    to it."""
    created = not (dist.is_available() and dist.is_initialized())
    device = init_from_env(device)
    created = created and dist.is_available() and dist.is_initialized()
    try:
        yield device
    except BaseException:
        if created:            # no barrier: another rank may never reach it
            dist.destroy_process_group()
        raise
    if created:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


@dataclass
class Parallel:
    """This rank's place in the ``data_shards × latent_shards`` grid and the process groups of its row/column."""

    rank: int
    world_size: int
    data_rank: int
    data_shards: int
    latent_rank: int
    latent_shards: int
    data_group: Any        # the ranks holding the same latents (gradients are averaged over them)
    latent_group: Any      # the ranks reading the same batch (partial reconstructions are summed over them)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def latent_slice(self, width: int) -> slice:
        """The latents this rank holds out of ``width`` (contiguous, equal slices)."""
        if width % self.latent_shards:
            raise SaescopeError(f"width {width} does not split into latent_shards={self.latent_shards} equal "
                                "slices; pick a width that is a multiple of latent_shards")
        n = width // self.latent_shards
        return slice(self.latent_rank * n, (self.latent_rank + 1) * n)


def current(latent_shards: int = 1) -> Parallel | None:
    """The grid for this process, or ``None`` when ``torch.distributed`` is not initialised or has one rank
    (then training runs exactly as in one process). Every rank must call this, in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if latent_shards < 1 or world % latent_shards:
        raise SaescopeError(f"latent_shards={latent_shards} must divide the world size {world} (the ranks form a "
                            "grid data_shards × latent_shards); set latent_shards to a divisor of it")
    data_shards = world // latent_shards
    data_rank, latent_rank = divmod(rank, latent_shards)
    data_group = latent_group = None           # None: the default (whole-world) group
    if 1 < latent_shards < world:
        # new_group must be called by every rank for every group, in the same order
        for d in range(data_shards):
            g = dist.new_group([d * latent_shards + i for i in range(latent_shards)])
            if d == data_rank:
                latent_group = g
        for i in range(latent_shards):
            g = dist.new_group([d * latent_shards + i for d in range(data_shards)])
            if i == latent_rank:
                data_group = g
    return Parallel(rank, world, data_rank, data_shards, latent_rank, latent_shards, data_group, latent_group)


def _comm_device(group: Any = None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def count_reducer(group: Any) -> CountReducer:
    """Sums the frequency penalty's ``[firing counts…, rows]`` vector over ``group`` (the data ranks), so each
    rank's step uses the global batch's firing frequencies (:func:`saescope.sae.losses.frequency_term`)."""
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        on = counts.to(_comm_device(group))
        dist.all_reduce(on, group=group)
        return on.to(counts.device)
    return reduce


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------- the autograd pair of latent sharding
class _ReduceFromShards(torch.autograd.Function):
    """Forward: sum over the latent group. Backward: the gradient unchanged (every rank computes the same loss
    from the sum, so each rank's gradient w.r.t. the sum is already the gradient w.r.t. its own term)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: Any) -> torch.Tensor:
        out = partial.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: the replicated tensor unchanged. Backward: sum of the gradients every shard sends it."""

    @staticmethod
    def forward(ctx, replica: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return replica.view_as(replica)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_from_shards(partial: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``Σ_ranks partial`` (one all_reduce) with a pass-through backward."""
    return _ReduceFromShards.apply(partial, group)


def copy_to_shards(replica: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``replica`` with its gradient summed over the group in the backward pass."""
    return _CopyToShards.apply(replica, group)


def sharded_training_step(module, x_raw: torch.Tensor, loss: LossOptions | float,
                          target_raw: torch.Tensor | None, group: Any, *, latent_offset: int = 0,
                          d_sae: int | None = None, reduce_counts: CountReducer | None = None) -> StepResult:
    """The dense JumpReLU step (recipe §1) of one latent shard: same loss and, for this shard's parameters,
    the same gradients as ``module.training_forward(...).loss.backward()`` on the whole SAE.

    ``x̂ = Σ_r f_r W_dec,r + b_dec`` and ``L0 = Σ_r Σ_{i∈r} H(z_i − θ_i)`` travel in one all_reduce (the L0
    counts as one extra column, in the wider of the weight and threshold dtypes).

    Gemma Scope 2's options (recipe §6): ``target_l0`` puts the quadratic penalty on the summed L0 (its
    gradient reaches each shard through the pass-through backward); Matryoshka prefixes (over the whole SAE's
    ``d_sae`` latents; this shard holds ``latent_offset …``) send one partial decoder sum per block of
    latents, ``[B, K, d]``, and the prefix reconstructions are their cumulative sums; a skip transcoder's
    ``x W_skip`` is added on every rank (``W_skip`` is replicated, so its gradient is the same everywhere).
    The frequency penalty is a sum over latents: each shard computes its own latents' part (the firing counts
    summed over data ranks by ``reduce_counts``) and it travels as one more column of that all_reduce.
    """
    options = as_loss_options(loss)
    m = module
    local = m.W_dec.shape[0]
    d_sae = local if d_sae is None else d_sae
    if options.matryoshka_prefixes is None:
        bounds, weights = [(0, local)], [1.0]
    else:                           # block j's latents that this shard holds, in local indices
        sizes, weights = check_prefixes(options.matryoshka_prefixes, options.matryoshka_weights, d_sae)
        starts = [0, *sizes[:-1]]
        bounds = [(min(max(lo - latent_offset, 0), local), min(max(hi - latent_offset, 0), local))
                  for lo, hi in zip(starts, sizes)]
    W_skip = getattr(m, "W_skip", None)
    for p in m.parameters():
        p.grad = None
        p.requires_grad_(True)
    try:
        x = m.normalize(x_raw)
        target = x if target_raw is None else m.normalize_target(target_raw)
        xc = x - copy_to_shards(m.b_dec, group) if m.config.apply_b_dec_to_input else x
        z = xc @ m.W_enc + m.b_enc
        f = jumprelu(z, m.threshold, m.config.bandwidth)
        active = heaviside(z, m.threshold, m.config.bandwidth)
        l0_partial = active.sum(dim=-1)
        f = f.to(m.dtype)
        blocks = [f[:, lo:hi] @ m.W_dec[lo:hi] for lo, hi in bounds]     # [B, d] each (zeros if none held)
        partial = torch.cat(blocks, dim=1)
        wide = torch.promote_types(partial.dtype, l0_partial.dtype)
        columns = [partial.to(wide), l0_partial.to(wide).unsqueeze(1)]
        if options.frequency:           # this shard's latents' part of F, the same on every row
            columns.append(frequency_loss(active, options, reduce_counts).to(wide).expand(x.shape[0], 1))
        summed = reduce_from_shards(torch.cat(columns, dim=1), group)
        frequency = summed[:, -1].mean() if options.frequency else None
        if options.frequency:
            summed = summed[:, :-1]
        d_out = m.W_dec.shape[1]
        base = m.b_dec if W_skip is None else m.b_dec + x @ W_skip
        prefixes = summed[:, :-1].to(m.dtype).view(x.shape[0], len(bounds), d_out).cumsum(dim=1)
        l0 = summed[:, -1]
        squared = (target.unsqueeze(1) - (prefixes + base.unsqueeze(-2))).pow(2).sum(dim=-1)    # [B, K]
        reconstruction = squared @ torch.tensor(weights, dtype=squared.dtype, device=squared.device)
        lam = options.sparsity_coefficient
        loss_value = (reconstruction + lam * options.token_penalty(l0)).mean()
        if frequency is not None:
            loss_value = loss_value + lam * frequency
        loss_value.backward()
        with torch.no_grad():
            centred = target - target.mean(dim=0)
            fired = (f != 0).any(dim=0)
        names = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"] + (["W_skip"] if W_skip is not None else [])
        grads = {name: getattr(m, name).grad for name in names}
    finally:
        for p in m.parameters():
            p.grad = None
            p.requires_grad_(False)
    return StepResult(loss=float(loss_value.detach()), reconstruction=float(reconstruction.detach().mean()),
                      l0=float(l0.detach().to(torch.float64).mean()), total_variance=float(centred.pow(2).sum()),
                      fired=fired, grads=grads, full_reconstruction=float(squared[:, -1].detach().mean()))


# ---------------------------------------------------------------------- data parallel
@torch.no_grad()
def average_gradients(grads: dict[str, torch.Tensor], group: Any, rows: int
                      ) -> tuple[dict[str, torch.Tensor], int]:
    """The global batch's mean gradient from each rank's mean over its ``rows`` rows: ``Σ_r n_r g_r / Σ_r n_r``
    (ranks with more rows weigh more). One flat all_reduce per dtype; ``n_r`` travels in the first. Returns the
    averaged gradients and the global row count ``Σ_r n_r``."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, g in grads.items():
        by_dtype.setdefault(g.dtype, []).append(name)
    out = dict(grads)
    # the row count rides along in a float32/float64 vector (exact to 2^24 rows); else in its own
    host = next((d for d in (torch.float64, torch.float32) if d in by_dtype), None)
    count = torch.tensor([float(rows)], dtype=torch.float64, device=next(iter(grads.values())).device)
    flats: dict[torch.dtype, torch.Tensor] = {}
    for dtype, names in by_dtype.items():
        parts = [grads[n].reshape(-1) * rows for n in names]
        if dtype == host:
            parts.append(count.to(dtype))
        flats[dtype] = torch.cat(parts)
        dist.all_reduce(flats[dtype], group=group)
    if host is None:
        dist.all_reduce(count, group=group)
    else:
        count = flats[host][-1:]
    total = int(round(float(count[0])))
    for dtype, names in by_dtype.items():
        flat = flats[dtype][:-1] if dtype == host else flats[dtype]
        flat.div_(total)
        offset = 0
        for n in names:
            size = grads[n].numel()
            out[n] = flat[offset:offset + size].view(grads[n].shape)
            offset += size
    return out, total


@torch.no_grad()
def reduce_step_statistics(result, group: Any, rows: int, target: torch.Tensor | None = None):
    """Batch statistics of the global batch from each rank's ``rows`` rows: row-weighted means of loss /
    reconstruction / full reconstruction / L0, union of the latents that fired, and the global batch's
    centred variance.

    Each rank's ``total_variance`` is centred on its own mean; with ``target`` (this rank's normalized target
    rows) the global one is ``Σ_r V_r + Σ_r n_r‖μ_r‖² − N‖μ‖²`` (the per-rank sums of t travel too), so FVU is
    the one-process FVU. Without it, the per-rank variances are summed (slightly larger)."""
    device = result.fired.device
    full = result.full_reconstruction
    if target is not None:
        sums = target.sum(dim=0, dtype=torch.float64).to(device)
        between = float(sums.pow(2).sum()) / max(target.shape[0], 1)         # n_r ‖μ_r‖²
    else:
        sums, between = torch.zeros(0, dtype=torch.float64, device=device), 0.0
    n = float(rows)
    stats = torch.tensor([result.loss * n, result.reconstruction * n, result.l0 * n, result.total_variance,
                          (result.reconstruction if full is None else full) * n, between, n],
                         dtype=torch.float64, device=device)
    packed = torch.cat([stats, sums, result.fired.to(torch.float64)])
    dist.all_reduce(packed, group=group)
    n_total = float(packed[6])
    result.loss = float(packed[0]) / n_total
    result.reconstruction = float(packed[1]) / n_total
    result.l0 = float(packed[2]) / n_total
    result.total_variance = float(packed[3])
    result.full_reconstruction = float(packed[4]) / n_total
    if target is not None:
        total_sums = packed[7:7 + len(sums)]
        result.total_variance += float(packed[5]) - float(total_sums.pow(2).sum()) / n_total
    result.fired = packed[7 + len(sums):] > 0
    return result


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on one (e.g. a SIGTERM that reached one rank first)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_batch(batch: dict[str, torch.Tensor], group: Any, shards: int) -> dict[str, torch.Tensor]:
    """The global batch: every data rank's rows (their counts may differ), concatenated in rank order."""
    device = _comm_device(group)
    n = next(iter(batch.values())).shape[0]
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(shards)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    counts_list = [int(c) for c in counts]
    most = max(counts_list)
    out = {}
    for site, t in batch.items():
        local = t.to(device)
        if n < most:                       # all_gather needs equal shapes: pad, then cut each part back
            local = torch.cat([local, local.new_zeros((most - n, *local.shape[1:]))])
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(shards)]
        dist.all_gather(parts, local, group=group)
        out[site] = torch.cat([p[:c] for p, c in zip(parts, counts_list)]).to(t.device)
    return out


class DataShard:
    """Rank ``rank`` of ``shards``: rows ``[rank·n // shards, (rank+1)·n // shards)`` of each ``n``-row batch of
    a global batch source (for in-memory sources; ``saescope train`` gives the rank count to the
    :class:`~saescope.store.loader.ActivationLoader`, which reads only its share). Its position is the global
    source's, so a checkpoint resumes exactly on any number of ranks."""

    def __init__(self, source, rank: int, shards: int):
        self.source, self.rank, self.shards = source, rank, shards

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.source:
            n = next(iter(batch.values())).shape[0]
            if n < self.shards:
                raise SaescopeError(f"a batch of {n} rows cannot give each of {self.shards} data ranks a row")
            lo, hi = self.rank * n // self.shards, (self.rank + 1) * n // self.shards
            yield {k: v[lo:hi] for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def norm_scale(self, site_id: str) -> float:
        return self.source.norm_scale(site_id)


# ---------------------------------------------------------------------- checkpoints: gather / slice latents
LATENT_DIMS = {"param/W_enc": 1, "param/b_enc": 0, "param/W_dec": 0, "param/threshold": 0, "log_threshold": 0,
               "tokens_since_fired": 0}
"""Unit state tensors that are split over latents, and the dimension they are split along (everything else,
``b_dec`` and Adam's step count, is replicated). Adam's moments follow their parameter (``W_enc``'s along 0:
the optimizer holds ``W_encᵀ``)."""


def latent_dim(key: str) -> int | None:
    """Which dimension of unit state ``key`` (without the unit prefix) is split over latents, or ``None``."""
    if key in LATENT_DIMS:
        return LATENT_DIMS[key]
    for moment in ("adam/exp_avg.", "adam/exp_avg_sq."):
        if key.startswith(moment):
            return None if key[len(moment):] in ("b_dec", "W_skip") else 0   # replicated: no latent axis
    return None


def gather_latents(tensors: dict[str, torch.Tensor], prefix: str, group: Any, shards: int
                   ) -> dict[str, torch.Tensor]:
    """The full tensors of one unit from every latent rank's slice (all ranks of the group must call)."""
    out = {}
    device = _comm_device(group)
    for key, t in tensors.items():
        dim = latent_dim(key[len(prefix) + 1:])
        if dim is None:
            out[key] = t
            continue
        local = t.to(device).contiguous()
        parts = [torch.empty_like(local) for _ in range(shards)]
        dist.all_gather(parts, local, group=group)
        out[key] = torch.cat(parts, dim=dim).to(t.device)
    return out


def slice_latents(tensors: dict[str, torch.Tensor], prefix: str, latents: slice) -> dict[str, torch.Tensor]:
    """This rank's slice of one unit's full checkpoint tensors."""
    out = {}
    for key, t in tensors.items():
        if not key.startswith(prefix + "/"):
            out[key] = t
            continue
        dim = latent_dim(key[len(prefix) + 1:])
        out[key] = t if dim is None else t.narrow(dim, latents.start, latents.stop - latents.start).contiguous()
    return out


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
