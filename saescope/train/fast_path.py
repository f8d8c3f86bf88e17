"""The sparse training step: the same loss and gradients as the dense JumpReLU step, with one dense product.

With the straight-through estimators of the JumpReLU paper (eqs. 11-12, recipe §1) the loss
``L = mean_b(‖t_b − x̂_b‖² + λ Σ_i H(z_bi − θ_i))``, ``z = (x − b_dec) W_enc + b_enc``,
``f = z·H(z − θ)``, ``x̂ = f W_dec + b_dec`` (``t = x`` for an SAE, the target for a transcoder) has

- ``∂L/∂z_bi = g_f,bi · H(z_bi − θ_i)`` with ``g_f = (2/B)(x̂ − t) W_decᵀ``: non-zero only for active latents;
- ``∂L/∂θ_i = Σ_b [g_f,bi·(−θ_i/ε) − (λ/B)/ε]·K((z_bi − θ_i)/ε)``: non-zero only inside the bandwidth window;
- ``∂L/∂W_dec = fᵀ (2/B)(x̂ − t)`` and ``∂L/∂W_enc = (x − b_dec)ᵀ ∂L/∂z``: rows / columns of active latents only;
- ``∂L/∂b_enc = Σ_b ∂L/∂z``, ``∂L/∂b_dec = Σ_b (2/B)(x̂ − t) − W_enc ∂L/∂b_enc`` (second term only with
  the pre-encoder ``b_dec``).

So the only full-size work per token is the encoder product ``(x − b_dec) W_enc``. Everything else runs on
the list of (token, latent) pairs that are active or inside the window, found once from ``z``:
the decoder is a bag-sum of active decoder rows (``embedding_bag``), ``g_f`` is a sampled dense-dense product
at those pairs only (``torch.sparse.sampled_addmm``), and the weight gradients are bag-sums grouped by latent.

Gemma Scope 2's options (recipe §6) keep that shape: the quadratic target-L0 penalty only rescales the
sparsity term's θ-gradient per token; Matryoshka prefixes bag the pairs by (token, block of latents)
instead of by token; a skip transcoder's ``x W_skip`` adds one small ``[B, d_in] × [d_in, d_out]`` product.
See :func:`sparse_training_step`.

On the CPU the step runs on compiled kernels (:mod:`saescope.train.sparse_kernels`, ``sparse_kernels.cpp``)
where a C++ compiler is at hand: the encoder product is made in blocks of ~32 MB of latents, each scanned for
its candidate pairs while still in cache; one pass per token builds z, the flags, L0 and ∂L/∂x̂; a counting
sort gives the latent-major order; and one pass per latent computes g_f, both weight gradients, ∂L/∂b_enc,
∂L/∂θ and the decoder-gradient projection, with each row of the decoder in L1. Work is split over threads by
tokens or latents, so the result does not depend on the thread count (:func:`_compiled_step`). On the
benchmark shapes the step is then ~1.4× the encoder product alone (``benchmarks/train_step_speed.py``).

Without the kernels (no compiler, ``SAESCOPE_CPU_KERNELS=0``, ``TrainConfig.cpu_kernels = False``), the step
is a chain of torch ops (:func:`_sparse_step`), and on the CPU (the ``[4096, 16384]`` product is 268 MB,
far larger than the caches) three more things keep it near the product alone, without changing its result
by a bit: the candidate pairs are found
with one elementwise-maximum pass over groups of tokens instead of a compare pass and a ``nonzero`` pass
(:func:`_candidates`); the latent-major order comes from NumPy's sort of a unique key instead of
``torch.argsort`` (:func:`_latent_major_order`); and the small bookkeeping ops run on one thread
(:class:`_Threads`). On CUDA the step is the plain compare, ``nonzero`` and ``argsort``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from saescope.sae.losses import CountReducer, LossOptions, as_loss_options, check_prefixes, frequency_term
from saescope.train import sparse_kernels
from saescope.train.decoder_norm import project_out_parallel_gradient
from saescope.train.step import SAEParams, StepResult

_WORKSPACE: dict[tuple, torch.Tensor] = {}
TOKEN_GROUP = 8    # tokens per group in the CPU candidate search (_candidates)
GROUPED_UP_TO = 1 / 8   # ... used while the cells it must check hold at most this fraction of the entries
# CPU threading (_Threads): the kinds of op run on all of torch's threads; the rest run on one.
# "product": the encoder product and the other dense matrix products; "scan": the candidate search over the
# product; "sparse": the bag-sums and the sampled product. Chosen by benchmarks/train_step_speed.py.
PARALLEL_OPS: frozenset[str] = frozenset({"product"})


def _workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, tag: str = "") -> torch.Tensor:
    """A reused buffer for the pre-activations and their mask (a fresh 268 MB tensor per step costs page
    faults), and other large per-step arrays (``tag`` tells apart buffers of one shape)."""
    key = (shape, dtype, device, tag)
    buf = _WORKSPACE.get(key)
    if buf is None:
        if len(_WORKSPACE) >= 64:     # a few per SAE shape (SAEs of one shape share them)
            _WORKSPACE.clear()
        buf = _WORKSPACE[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def clear_workspace() -> None:
    """Free the reused buffers (pre-activations, pairs, gradients)."""
    _WORKSPACE.clear()
    _PAIRS.clear()
    _LAST_PAIRS.clear()


class _Threads:
    """On the CPU the step's many small bookkeeping ops (a few hundred thousand pairs each) run on one thread,
    and only the kinds of op listed in ``PARALLEL_OPS`` (``with threads.all(kind):``) on all of torch's
    threads. A parallel op waits at a barrier for every thread; on a loaded machine that wait (a scheduler
    time slice) costs more than the small op itself (measured with benchmarks/train_step_speed.py)."""

    def __init__(self, device: torch.device):
        self.count = torch.get_num_threads()
        self.switch = device.type == "cpu" and self.count > 1

    def __enter__(self) -> _Threads:
        if self.switch:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.switch:
            torch.set_num_threads(self.count)

    @contextmanager
    def all(self, kind: str):
        if not self.switch or kind not in PARALLEL_OPS:
            yield
            return
        torch.set_num_threads(self.count)
        try:
            yield
        finally:
            torch.set_num_threads(1)


_NO_SWITCH = SimpleNamespace(all=nullcontext)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a flat bool tensor, ascending. On the CPU a sparse mask is scanned
    8 bytes at a time (as int64 words), then only the words holding a true entry are expanded: about half
    the time of a plain ``nonzero``. Elsewhere (CUDA) it is a plain ``torch.nonzero``."""
    if mask.device.type != "cpu" or mask.numel() % 8 or mask.storage_offset() % 8:
        return torch.nonzero(mask).squeeze(1)
    words = torch.nonzero(mask.view(torch.int64)).squeeze(1)
    index = (words.unsqueeze(1) * 8 + torch.arange(8)).view(-1)
    return index[mask[index]]


def _candidates(xw: torch.Tensor, lower: torch.Tensor, group: int, threads=_NO_SWITCH) -> torch.Tensor:
    """Flat row-major indices ``b·d_sae + i`` (ascending) of the entries with ``xw_bi > lower_i``.

    A plain compare writes a ``[B, d_sae]`` mask and ``nonzero`` reads it back: two more passes over the
    product, and torch's float→bool compare is slow. On the CPU the product is instead read once by an
    elementwise maximum over groups of ``group`` consecutive tokens; only the (group, latent) cells whose
    maximum passes ``lower_i`` are then compared token by token (a few per cent of the entries at training
    sparsity). The result is exactly that of the plain compare. Dense cases (and CUDA) take the plain path.
    """
    B, d_sae = xw.shape
    n_groups = B // group if xw.device.type == "cpu" and group > 1 else 0
    if n_groups == 0:
        with threads.all("scan"):
            mask = torch.gt(xw, lower, out=_workspace((B, d_sae), torch.bool, xw.device))
            return _flat_nonzero(mask.view(-1))
    grouped = xw[:n_groups * group].view(n_groups, group, d_sae)
    with threads.all("scan"):
        peak = torch.amax(grouped, dim=1, out=_workspace((n_groups, d_sae), xw.dtype, xw.device))
        hit = torch.nonzero(torch.gt(peak, lower, out=_workspace((n_groups, d_sae), torch.bool, xw.device))
                            .view(-1)).squeeze(1)       # a few per cent true: the plain nonzero is faster
    if len(hit) * group > GROUPED_UP_TO * B * d_sae:  # not sparse: the plain compare is cheaper
        return _candidates(xw, lower, 1, threads)
    cell_group = torch.div(hit, d_sae, rounding_mode="floor")
    cell_latent = hit - cell_group * d_sae
    values = grouped[cell_group, :, cell_latent]      # [cells, group]: the group's tokens at that latent
    which, token = torch.nonzero(values > lower[cell_latent].unsqueeze(1), as_tuple=True)
    flat = (cell_group[which] * group + token) * d_sae + cell_latent[which]
    flat = torch.from_numpy(np.sort(flat.numpy()))    # row-major order (NumPy's sort: see _latent_major_order)
    if n_groups * group < B:                          # the rows left over after the last full group
        rest = _candidates(xw[n_groups * group:], lower, 1, threads) + n_groups * group * d_sae
        flat = torch.cat([flat, rest])
    return flat


def _latent_major_order(rows: torch.Tensor, cols: torch.Tensor, batch: int) -> torch.Tensor:
    """The permutation that groups the pairs by latent, tokens ascending within a latent (what a stable sort
    of ``cols`` gives). The key ``cols·B + rows`` is unique, so any sort gives that order; on the CPU NumPy's
    sort of it is tens of times faster than ``torch.argsort``."""
    key = cols * batch + rows
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy()))
    return torch.argsort(key)


def _l0_penalty(l0_counts: torch.Tensor, loss: LossOptions, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sparsity penalty per token (``L0_b``, or Gemma Scope 2's ``(2/L0_t)(L0_b − L0_t)²``) and, for the
    latter, its derivative ``(4/L0_t)(L0_b − L0_t)`` (float64) that scales each token's θ-gradient term; with
    ``target_l0_over = "batch"`` the batch's mean L0 stands for every ``L0_b`` in both."""
    target_l0 = loss.target_l0
    if target_l0 is None:
        return l0_counts.to(dtype), None
    excess = l0_counts.to(torch.float64) - target_l0
    if loss.batch_target:
        excess = excess.mean().expand_as(excess)
    return ((2.0 / target_l0) * excess.pow(2)).to(dtype), (4.0 / target_l0) * excess


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Start offset of each bag from the bag sizes."""
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], dim=0, out=offsets[1:])
    return offsets


@torch.no_grad()
def sparse_training_step(params: SAEParams, x: torch.Tensor, target: torch.Tensor | None,
                         loss: LossOptions | float, *, kernels: bool = True, project_decoder_gradient: bool = False,
                         reuse_gradient_buffers: bool = False, reduce_counts: CountReducer | None = None
                         ) -> StepResult:
    """One step's loss and gradients on a normalized batch ``x [B, d_in]`` (target ``None``: reconstruct x).

    Equal, to float rounding, to ``JumpReLUSAE.training_forward(...).loss.backward()`` (tests/test_fast_path.py),
    including its Gemma Scope 2 options (recipe §6), read from ``loss`` (:class:`~saescope.sae.losses.LossOptions`;
    a bare float is λ alone) with the SAE's tensors from ``params`` (:class:`~saescope.train.step.SAEParams`):

    - ``target_l0``: the penalty ``λ·(2/L0_t)(L0_b − L0_t)²`` per token instead of ``λ·L0_b``; the sparsity
      term's θ-gradient at each window pair is then scaled by the token's ``(4/L0_t)(L0_b − L0_t)``.
    - ``matryoshka_prefixes`` / ``matryoshka_weights``: the reconstruction ``Σ_k w_k‖t − x̂_k‖²`` over nested
      prefixes of the latents (:func:`saescope.sae.losses.matryoshka_reconstruction`). The pairs are bagged
      by (token, block of latents); the partial decoder sums are accumulated over blocks, and a latent of
      block ``j`` sees the summed residual ``Σ_{k≥j} 2w_k(x̂_k − t)/B``, so no ``[pairs, d_in]`` gather is made.
      ``reconstruction`` is that weighted sum (as in ``training_forward``); ``full_reconstruction`` — the
      error of the whole dictionary (the last prefix) — is what FVU is computed from.
    - ``W_skip [d_in, d_out]`` (skip transcoder, Gemma Scope 2): ``x̂ = f W_dec + b_dec + x W_skip`` with ``x``
      the normalized input (never minus ``b_dec``); the skip term is in every Matryoshka prefix, like
      ``b_dec``; ``grads["W_skip"] = xᵀ ∂L/∂x̂``.

    ``project_decoder_gradient``: return ``∂L/∂W_dec`` with each row's component along its decoder row removed
    (:func:`saescope.train.decoder_norm.project_out_parallel_gradient`, done by the trainer before Adam);
    the compiled kernels do it while the row is in cache. ``decoder_gradient_projected`` in the result says so.

    ``reuse_gradient_buffers``: the compiled kernels write ``∂L/∂W_enc`` and ``∂L/∂W_dec`` into buffers kept
    between calls (the next such call overwrites them), saving the page faults of two fresh large tensors.

    On the CPU, with ``kernels`` (the default) and a C++ compiler at hand, the step runs on the compiled
    kernels of :mod:`saescope.train.sparse_kernels` (every option above; float32 or float64 throughout);
    otherwise, or when it finds more candidate pairs than 1/8 of the entries, on torch ops.
    """
    loss = as_loss_options(loss)
    lib = sparse_kernels.load() if kernels and _kernels_apply(params, x, target) else None
    result = None
    if lib is not None:     # its few torch ops run on all threads; the kernels split their work themselves
        result = _compiled_step(lib, params, x, target, loss, project_decoder_gradient, reuse_gradient_buffers,
                                torch.get_num_threads(), reduce_counts)
        if result is not None:
            return result
    with _Threads(x.device) as threads:
        result = _sparse_step(params, x, target, loss, threads, reduce_counts)
    if project_decoder_gradient:
        project_out_parallel_gradient(params.W_dec, result.grads["W_dec"])
        result.decoder_gradient_projected = True
    return result


def _kernels_apply(params: SAEParams, x: torch.Tensor, target: torch.Tensor | None) -> bool:
    """Whether the compiled kernels take this step: CPU, one float dtype (32 or 64 bits) throughout."""
    tensors = [x, *params.tensors()] + ([] if target is None else [target])
    return (x.device.type == "cpu" and x.dtype in sparse_kernels.DTYPES
            and all(t.dtype == x.dtype and t.device.type == "cpu" for t in tensors))


PRODUCT_BLOCK_BYTES = 1 << 25    # the compiled step's encoder product is made in blocks of latents of this size
FIRST_PAIRS_PER_TOKEN = 256      # the compiled step's first room for pairs (then twice the last step's count)
_LAST_PAIRS: dict[tuple[int, int], int] = {}
_PAIRS: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


def _pair_buffers(capacity: int, dtype: torch.dtype, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reused (latent index, value) buffers of the compiled step's scan with room for ``capacity`` pairs;
    a larger one is made when needed, keeping its first ``keep`` pairs."""
    old = _PAIRS.get(dtype)
    if old is not None and len(old[0]) >= capacity:
        return old
    new = (torch.empty(capacity, dtype=torch.int32), torch.empty(capacity, dtype=dtype))
    if old is not None and keep:
        new[0][:keep].copy_(old[0][:keep])
        new[1][:keep].copy_(old[1][:keep])
    _PAIRS[dtype] = new
    return new


def _block_width(B: int, d_sae: int, element_size: int) -> int:
    """Latents per block of the compiled step's encoder product: ``PRODUCT_BLOCK_BYTES`` of output (a
    multiple of 64 latents), or all of them."""
    width = max(64, PRODUCT_BLOCK_BYTES // (B * element_size) // 64 * 64)
    return min(width, d_sae)


def _pair_capacity(B: int, d_sae: int) -> int:
    """Room for the candidate pairs of the compiled step: every entry for small steps, else ``GROUPED_UP_TO``
    of them (the trainer takes the dense step long before that density), below 2³¹ (int32 pair indices)."""
    return min(B * d_sae if B * d_sae <= 1 << 22 else int(GROUPED_UP_TO * B * d_sae), 2**31 - 1)


def _compiled_step(lib, params: SAEParams, x: torch.Tensor, target: torch.Tensor | None, loss: LossOptions,
                   project_decoder_gradient: bool, reuse_gradient_buffers: bool, n: int,
                   reduce_counts: CountReducer | None) -> StepResult | None:
    """:func:`_sparse_step` on the compiled kernels (``sparse_kernels.cpp``) with ``n`` threads; None where the
    candidate pairs exceed the buffer (more than ``GROUPED_UP_TO`` of the entries: the torch path is then as
    fast)."""
    W_enc, b_enc, W_dec, b_dec, threshold = params.W_enc, params.b_enc, params.W_dec, params.b_dec, params.threshold
    W_skip = params.W_skip
    if target is None:
        target = x
    B, d_in = x.shape
    d_sae, d_out = W_enc.shape[1], W_dec.shape[1]
    eps, lam = params.bandwidth, loss.sparsity_coefficient
    dt, ptr = sparse_kernels.DTYPES[x.dtype], sparse_kernels.ptr
    if loss.matryoshka_prefixes is None:
        K, block_of, weights = 1, None, None
    else:                   # latent i's block: the first prefix that holds it
        sizes, prefix_weights = check_prefixes(loss.matryoshka_prefixes, loss.matryoshka_weights, d_sae)
        K = len(sizes)
        block_of = torch.bucketize(torch.arange(d_sae), torch.tensor(sizes[:-1]), right=True).to(torch.int32)
        weights = torch.tensor(prefix_weights, dtype=x.dtype)
    xc = (x - b_dec if params.apply_b_dec_to_input else x).contiguous()
    W_dec, b_enc, threshold = W_dec.contiguous(), b_enc.contiguous(), threshold.contiguous()
    lower = (threshold - eps - b_enc).contiguous()       # pre-filter z − θ > −ε, as in _sparse_step
    # The product block by block of latents, each block scanned for its pairs while it is still in cache
    # (one reused block buffer: faster than writing and re-reading the whole [B, d_sae] product).
    width = _block_width(B, d_sae, x.element_size())
    starts = list(range(0, d_sae, width))
    block = _workspace((B, width), x.dtype, x.device)
    # room for the pairs: twice the last step's count (memory follows L0, not the width); doubled when a block
    # overflows it (that block is scanned again), up to _pair_capacity (beyond that: the torch path)
    limit = _pair_capacity(B, d_sae)
    capacity = min(limit, max(1 << 12, 2 * _LAST_PAIRS.get((B, d_sae), B * FIRST_PAIRS_PER_TOKEN // 2)))
    found_cols, found_values = _pair_buffers(capacity, x.dtype, keep=0)
    capacity = min(limit, len(found_cols))      # all the room the buffers already have (another SAE's, maybe)
    counts = torch.empty(len(starts), B, dtype=torch.int64)
    block_start = torch.zeros(len(starts), dtype=torch.int64)
    P = 0
    for k, c0 in enumerate(starts):
        c1 = min(c0 + width, d_sae)
        out = block if c1 - c0 == width else block.view(-1)[:B * (c1 - c0)].view(B, c1 - c0)
        torch.mm(xc, W_enc[:, c0:c1], out=out)
        block_start[k] = P
        while True:
            n_found = lib.saescope_scan_candidates(dt, ptr(out), ptr(lower) + c0 * lower.element_size(), B,
                                                   c1 - c0, c0, ptr(found_cols) + 4 * P,
                                                   ptr(found_values) + P * found_values.element_size(),
                                                   capacity - P, ptr(counts[k]), n)
            if n_found >= 0:
                break
            if capacity >= limit:
                return None
            found_cols, found_values = _pair_buffers(min(limit, 2 * capacity), x.dtype, keep=P)
            capacity = min(limit, len(found_cols))
        P += n_found
    _LAST_PAIRS[(B, d_sae)] = P
    cols = torch.empty(P, dtype=torch.int32)
    zv = torch.empty(P, dtype=x.dtype)                     # (x − b_dec)W_enc at the pairs; z after the forward
    row_offsets = torch.empty(B + 1, dtype=torch.int64)
    lib.saescope_merge_blocks(dt, len(starts), B, ptr(counts), ptr(block_start), ptr(found_cols),
                              ptr(found_values), ptr(cols), ptr(zv), ptr(row_offsets))

    # z, flags, L0 and ‖x̂ − t‖² per token, and ∂L/∂x̂ = (2/B)(x̂ − t) with x̂ = f W_dec + b_dec (+ x W_skip)
    skip = None
    if W_skip is not None:
        skip = x @ W_skip
    flags = torch.empty(P, dtype=torch.uint8)
    l0_counts = torch.empty(B, dtype=torch.int64)
    reconstruction = torch.empty(B, dtype=x.dtype)
    full_reconstruction = torch.empty(B, dtype=x.dtype) if K > 1 else reconstruction
    g_bags = torch.empty(B, K, d_out, dtype=x.dtype)         # ∂L/∂x̂ for K = 1
    target, b_dec = target.contiguous(), b_dec.contiguous()
    lib.saescope_forward(dt, B, d_out, ptr(row_offsets), ptr(cols), ptr(b_enc), ptr(threshold), eps, ptr(W_dec),
                         ptr(b_dec), ptr(target), ptr(skip), K, ptr(block_of), ptr(weights), 2.0 / B, ptr(zv),
                         ptr(flags), ptr(l0_counts), ptr(reconstruction),
                         ptr(full_reconstruction) if K > 1 else None, ptr(g_bags), n)
    g_xhat = g_bags[:, 0]                                   # Σ_k ∂L/∂x̂_k: reaches b_dec and W_skip

    latent_offsets = torch.empty(d_sae + 1, dtype=torch.int64)
    pair_of = torch.empty(P, dtype=torch.int32)
    token_of = torch.empty(P, dtype=torch.int32)
    lib.saescope_latent_order(B, d_sae, ptr(row_offsets), ptr(cols), ptr(latent_offsets), ptr(pair_of),
                              ptr(token_of))
    penalty, token_scale = _l0_penalty(l0_counts, loss, reconstruction.dtype)
    if token_scale is not None:
        token_scale = token_scale.to(x.dtype).contiguous()
    frequency = latent_scale = None
    if loss.frequency:      # firing counts per latent from the forward's flags (bit 1: active)
        active_pairs = (flags & 1).bool()
        counts = torch.bincount(cols[active_pairs].to(torch.int64), minlength=d_sae)
        frequency = frequency_term(counts, B, loss, reduce_counts)
        latent_scale = frequency.slope.to(x.dtype).contiguous()
    if reuse_gradient_buffers:   # fresh tensors this large are new memory each step: page faults (~15 ms)
        grad_W_dec = _workspace((d_sae, d_out), x.dtype, x.device, "grad_W_dec")
        grad_W_enc_t = _workspace((d_sae, d_in), x.dtype, x.device, "grad_W_enc")
    else:
        grad_W_dec = torch.empty(d_sae, d_out, dtype=x.dtype)
        grad_W_enc_t = torch.empty(d_sae, d_in, dtype=x.dtype)
    grad_b_enc = torch.empty(d_sae, dtype=x.dtype)
    grad_threshold = torch.empty(d_sae, dtype=x.dtype)
    fired = torch.empty(d_sae, dtype=torch.uint8)
    lib.saescope_backward(dt, d_sae, d_in, d_out, ptr(latent_offsets), ptr(pair_of), ptr(token_of), ptr(zv),
                          ptr(flags), ptr(threshold), eps, (lam / B) / eps, ptr(token_scale), ptr(latent_scale),
                          ptr(W_dec), K,
                          ptr(block_of), ptr(g_bags), ptr(xc), ptr(grad_W_dec), ptr(grad_W_enc_t), ptr(grad_b_enc),
                          ptr(grad_threshold), ptr(fired), int(project_decoder_gradient), n)
    grad_b_dec = g_xhat.sum(dim=0)
    if params.apply_b_dec_to_input:
        grad_b_dec -= W_enc @ grad_b_enc
    grads = {"W_enc": grad_W_enc_t.t(), "b_enc": grad_b_enc, "W_dec": grad_W_dec, "b_dec": grad_b_dec,
             "threshold": grad_threshold}
    if W_skip is not None:
        grads["W_skip"] = x.t() @ g_xhat
    loss_value = float((reconstruction + lam * penalty).mean())
    if frequency is not None:
        loss_value += lam * frequency.value
    return StepResult(
        loss=loss_value, reconstruction=float(reconstruction.mean()), l0=float(l0_counts.double().mean()),
        total_variance=float(torch.linalg.vector_norm(target - target.mean(dim=0))) ** 2, fired=fired.bool(),
        grads=grads,
        full_reconstruction=float(full_reconstruction.mean()), decoder_gradient_projected=project_decoder_gradient,
    )


def _sparse_step(params: SAEParams, x: torch.Tensor, target: torch.Tensor | None, loss: LossOptions, threads,
                 reduce_counts: CountReducer | None) -> StepResult:
    W_enc, b_enc, W_dec, b_dec, threshold = params.W_enc, params.b_enc, params.W_dec, params.b_dec, params.threshold
    W_skip = params.W_skip
    if target is None:
        target = x
    B, _d_in = x.shape
    d_sae = W_enc.shape[1]
    eps = params.bandwidth
    lam = loss.sparsity_coefficient
    xc = x - b_dec if params.apply_b_dec_to_input else x

    # The one dense product, then every (token, latent) pair that may be active or in the window.
    # (b_enc is added after the product, as in the dense ``x @ W_enc + b_enc``: z_bi = (xW)_bi + b_enc,i.)
    wide = torch.promote_types(W_enc.dtype, threshold.dtype)
    # generous pre-filter z − θ > −ε (a superset of the window and of the active pairs); the pairs it lets
    # through that are neither active nor in the window get weight 0 below
    lower = (threshold.to(wide) - eps - b_enc.to(wide)).to(W_enc.dtype)
    with threads.all("product"):
        xw = torch.mm(xc, W_enc, out=_workspace((B, d_sae), W_enc.dtype, W_enc.device))
    flat = _candidates(xw, lower, TOKEN_GROUP, threads)    # row-major: sorted by token, then latent
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    cols = flat - rows * d_sae
    zv = xw.view(-1)[flat] + b_enc[cols]
    theta_v = threshold[cols].to(wide)
    u = zv.to(wide) - theta_v                               # same arithmetic as saescope.sae.ste
    active = u > 0
    window = (u / eps).abs() < 0.5
    f = zv * active                                         # JumpReLU: z·H(z − θ)

    # Bags of pairs: one per token, or one per (token, Matryoshka block) — still sorted, since within a
    # token the latents are ascending.
    if loss.matryoshka_prefixes is None:
        n_blocks, bags, n_bags = 1, rows, B
    else:
        sizes, weights = check_prefixes(loss.matryoshka_prefixes, loss.matryoshka_weights, d_sae)
        n_blocks, n_bags = len(sizes), B * len(sizes)
        block = torch.bucketize(cols, torch.tensor(sizes[:-1], dtype=cols.dtype, device=cols.device), right=True)
        bags = rows * n_blocks + block
    bag_counts = torch.bincount(bags, minlength=n_bags)

    # Decoder: x̂_b = Σ_i f_bi W_dec[i] + b_dec (+ x_b W_skip), a weighted bag of decoder rows per bag.
    with threads.all("sparse"):
        partial = F.embedding_bag(cols, W_dec, _offsets(bag_counts), mode="sum", per_sample_weights=f)
    if n_blocks == 1:
        x_hat = partial
        x_hat += b_dec
        if W_skip is not None:
            with threads.all("product"):
                x_hat.addmm_(x, W_skip)
        residual = x_hat.sub_(target)                       # x̂ − t (x_hat is not needed any more)
        reconstruction = residual.pow(2).sum(dim=1)
        full_reconstruction = reconstruction
        g_bags = residual.mul_(2.0 / B)                     # ∂L/∂x̂ per token
        g_xhat = g_bags
    else:
        base = b_dec - target                               # what every prefix adds besides its latents
        if W_skip is not None:
            with threads.all("product"):
                base = base.addmm(x, W_skip)
        residual = partial.view(B, n_blocks, -1).cumsum(dim=1).add_(base.unsqueeze(1))   # x̂_k − t
        squared = residual.pow(2).sum(dim=2)                # [B, K]
        w = torch.tensor(weights, dtype=squared.dtype, device=x.device)
        reconstruction = squared @ w
        full_reconstruction = squared[:, -1]
        # block j's latents feed every prefix k ≥ j: a reversed cumulative sum of the weighted residuals
        g_bags = residual.mul_((2.0 / B) * w.view(1, -1, 1)).flip(1).cumsum(dim=1).flip(1)
        g_xhat = g_bags[:, 0]                               # Σ_k ∂L/∂x̂_k: reaches b_dec and W_skip
        g_bags = g_bags.reshape(n_bags, -1)

    # The pairs grouped by latent (tokens ascending within a latent), for g_f and the weight gradients.
    order = _latent_major_order(rows, cols, B)
    latent_counts = torch.bincount(cols, minlength=d_sae)
    tokens = rows[order]
    bag_of_pair = bags[order] if n_blocks > 1 else tokens

    # g_f = g_x̂ W_decᵀ at the candidate pairs only: a sampled product over a latent-major CSR pattern (each
    # decoder row is read once and meets its latent's tokens; faster than the token-major pattern), then
    # put back in pair order.
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(latent_counts, dim=0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, bag_of_pair,
                                          torch.zeros(len(cols), dtype=W_dec.dtype, device=x.device),
                                          (d_sae, n_bags), check_invariants=False)
    with threads.all("sparse"):
        g_f_by_latent = torch.sparse.sampled_addmm(pattern, W_dec, g_bags.t(), beta=0.0).values()
    g_f = torch.empty_like(g_f_by_latent)
    g_f[order] = g_f_by_latent

    # L0 per token (forward count), then θ: both STE terms, window pairs only.
    l0_counts = torch.zeros(B, dtype=torch.int64, device=x.device).index_add_(0, rows, active.to(torch.int64))
    penalty, per_token = _l0_penalty(l0_counts, loss, reconstruction.dtype)
    frequency = None
    if loss.frequency:
        counts = torch.zeros(d_sae, dtype=torch.int64, device=x.device).index_add_(0, cols, active.to(torch.int64))
        frequency = frequency_term(counts, B, loss, reduce_counts)
    if per_token is None and frequency is None:
        g_theta_pairs = (g_f.to(wide) * (-theta_v / eps) - (lam / B) / eps) * window
    else:
        scale = per_token.to(wide)[rows] if per_token is not None else torch.ones_like(theta_v)
        if frequency is not None:          # the latent's frequency factor beside the token's target-L0 factor
            scale = scale + frequency.slope.to(device=x.device, dtype=wide)[cols]
        g_theta_pairs = (g_f.to(wide) * (-theta_v / eps) - ((lam / B) / eps) * scale) * window
    grad_threshold = torch.zeros(d_sae, dtype=wide, device=x.device).index_add_(0, cols, g_theta_pairs)

    # Encoder / decoder weights: bag-sums grouped by latent (weights 0 where the latent did not fire).
    g_z = g_f * active
    grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=x.device).index_add_(0, cols, g_z)
    by_latent = crow[:-1]
    f_by_latent, g_z_by_latent = f[order], g_z[order]
    with threads.all("sparse"):
        grad_W_dec = F.embedding_bag(bag_of_pair, g_bags, by_latent, mode="sum", per_sample_weights=f_by_latent)
        grad_W_enc = F.embedding_bag(tokens, xc, by_latent, mode="sum", per_sample_weights=g_z_by_latent).t()
    grad_b_dec = g_xhat.sum(dim=0)
    if params.apply_b_dec_to_input:
        with threads.all("product"):
            grad_b_dec -= W_enc @ grad_b_enc
    grads = {"W_enc": grad_W_enc, "b_enc": grad_b_enc, "W_dec": grad_W_dec, "b_dec": grad_b_dec,
             "threshold": grad_threshold.to(threshold.dtype)}
    if W_skip is not None:
        with threads.all("product"):
            grads["W_skip"] = x.t() @ g_xhat

    loss_value = float((reconstruction + lam * penalty).mean())
    if frequency is not None:
        loss_value += lam * frequency.value
    centred = target - target.mean(dim=0)
    fired = torch.zeros(d_sae, dtype=torch.int64, device=x.device).index_add_(0, cols, active.to(torch.int64)) > 0
    return StepResult(
        loss=loss_value, reconstruction=float(reconstruction.mean()), l0=float(l0_counts.double().mean()),
        total_variance=float(centred.pow(2).sum()), fired=fired, grads=grads,
        full_reconstruction=float(full_reconstruction.mean()),
    )


def dense_training_step(module, x_raw: torch.Tensor, loss: LossOptions | float,
                        target_raw: torch.Tensor | None = None, *, reduce_counts: CountReducer | None = None
                        ) -> StepResult:
    """The plain dense step: ``module.training_forward`` and autograd (the reference the fast path matches).

    Gradients are returned for every parameter the module has (``W_skip`` too).
    """
    options = as_loss_options(loss)
    extra = {} if reduce_counts is None else {"reduce_counts": reduce_counts}
    for p in module.parameters():
        p.grad = None
    if target_raw is None:
        out = module.training_forward(x_raw, options, **extra)
        target = out.x
    else:
        out = module.training_forward(x_raw, target_raw, options, **extra)
        target = out.target
    out.loss.backward()
    with torch.no_grad():
        centred = target - target.mean(dim=0)
        fired = (out.latents != 0).any(dim=0)
        full = (target - out.x_hat).pow(2).sum(dim=-1).mean()
    names = ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"]
    if getattr(module, "W_skip", None) is not None:
        names.append("W_skip")
    grads = {name: getattr(module, name).grad for name in names}
    for p in module.parameters():
        p.grad = None
    return StepResult(loss=float(out.loss.detach()), reconstruction=float(out.reconstruction.detach().mean()),
                      l0=float(out.l0.detach().to(torch.float64).mean()), total_variance=float(centred.pow(2).sum()),
                      fired=fired, grads=grads, full_reconstruction=float(full))
