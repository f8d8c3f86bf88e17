"""Latent dashboards in ONE streaming pass over an activation store, with bounded memory.

For every latent ``i`` of an SAE (``f = JumpReLU_θ(W_enc(x/C − b_dec) + b_enc)``, Gemma Scope eq. 5) the pass
keeps, from the store's rows in order:

* the exact top-``k`` activations (ties broken by store order) with the latent's activation over a window
  of ``context_before + 1 + context_after`` rows around each, so the dashboard can shade the context.
  Tie rule: rows are ranked by their float32 activation as this pass computes it, descending; rows with
  EXACTLY equal values rank by earlier store row. The float value itself depends on the summation order of
  the encoder matmul (the ``block_rows`` blocking and the CPU's kernel: AVX2, AVX-512, ARM), so two rows
  whose activations agree to rounding (~1e-6 relative) may swap ranks between block sizes or machines;
  the selected values agree to rounding whatever the order;
* a uniform random sample of ``n_samples`` firing rows (the rows with the smallest of a random key drawn
  per firing — a reservoir), from which contexts at each activation quantile are shown;
* the firing count, the sum of activations, and a histogram of activations over fixed log-spaced bins.

Memory is ``O(d_sae · (k + n_samples) · window + d_sae · bins)`` plus one block of ``block_rows`` rows,
whatever the store size. Each block is encoded once; a block's candidates are merged with the running
selection per latent (only latents that fired in the block are touched).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from saescope.dashboards.store_reader import iter_site_rows, open_store
from saescope.errors import SaescopeError


class DashboardSettings(BaseModel):
    """What a dashboard shows; shared by the library and ``saescope dashboards``."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1, le=1000, description="top activating contexts kept per latent")
    n_samples: int = Field(40, ge=0, le=1000, description="random firing contexts kept per latent (quantiles)")
    n_quantiles: int = Field(4, ge=1, le=20, description="activation quantile groups the samples are split in")
    per_quantile: int = Field(4, ge=1, le=100, description="contexts shown per quantile group")
    context_before: int = Field(12, ge=0, le=256, description="tokens shown before the firing token")
    context_after: int = Field(4, ge=0, le=256, description="tokens shown after the firing token")
    hist_min: float = Field(1e-3, gt=0, description="lowest histogram edge (activations below go in bin 0)")
    hist_max: float = Field(1e4, gt=0, description="highest histogram edge (activations above go in the last bin)")
    hist_bins_per_decade: int = Field(10, ge=1, le=100)
    logit_k: int = Field(10, ge=1, le=100, description="top and bottom tokens of the logit effect")
    block_rows: int = Field(1024, ge=1, description="store rows encoded at a time")
    max_rows: int | None = Field(None, ge=1, description="read at most this many store rows")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DashboardSettings:
        if self.hist_max <= self.hist_min:
            raise ValueError(f"hist_max ({self.hist_max}) must exceed hist_min ({self.hist_min})")
        if self.block_rows < self.context_after:
            raise ValueError(f"block_rows ({self.block_rows}) must be at least context_after "
                             f"({self.context_after})")
        return self

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after

    def histogram_edges(self) -> np.ndarray:
        lo, hi = math.log10(self.hist_min), math.log10(self.hist_max)
        bins = max(1, round((hi - lo) * self.hist_bins_per_decade))
        return np.logspace(lo, hi, bins + 1)


class Selection:
    """Per latent, the ``size`` entries with the smallest keys seen so far (keys ``+inf`` = empty slot).

    Each entry carries the store row, the activation and a window of the latent's activations around it.
    """

    def __init__(self, d_sae: int, size: int, window: int):
        self.size = size
        self.keys = torch.full((d_sae, size), math.inf, dtype=torch.float64)
        self.rows = torch.full((d_sae, size), -1, dtype=torch.int64)
        self.values = torch.zeros((d_sae, size), dtype=torch.float32)
        self.windows = torch.zeros((d_sae, size, window), dtype=torch.float32)

    def worst(self) -> torch.Tensor:
        """The largest kept key per latent (``inf`` while a latent has a free slot)."""
        return self.keys.max(dim=1).values

    def merge(self, latents: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
              gather_windows) -> None:
        """Offer candidates (one per firing); keep the ``size`` smallest keys per latent.

        ``gather_windows(rows, latents) -> [n, window]`` is called only for the candidates that entered.
        Among equal keys the earlier store row wins (candidates come after the kept entries).
        """
        if self.size == 0 or latents.numel() == 0:
            return
        ok = keys < self.worst()[latents]
        latents, keys, rows, values = latents[ok], keys[ok], rows[ok], values[ok]
        if latents.numel() == 0:
            return
        # at most `size` candidates per latent: sort by (latent, key, row) and rank within the latent
        order = np.lexsort((rows.numpy(), keys.numpy(), latents.numpy()))
        order = torch.from_numpy(order)
        latents, keys, rows, values = latents[order], keys[order], rows[order], values[order]
        touched, counts = torch.unique_consecutive(latents, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(latents.numel()) - torch.repeat_interleave(starts, counts)
        keep = rank < self.size
        latents, keys, rows, values, rank = latents[keep], keys[keep], rows[keep], values[keep], rank[keep]
        slot_of = torch.zeros(int(latents.max()) + 1, dtype=torch.int64)
        slot_of[touched] = torch.arange(touched.numel())
        t = touched.numel()
        c_keys = torch.full((t, self.size), math.inf, dtype=torch.float64)
        c_rows = torch.full((t, self.size), -1, dtype=torch.int64)
        c_vals = torch.zeros((t, self.size), dtype=torch.float32)
        slot = slot_of[latents]
        c_keys[slot, rank] = keys
        c_rows[slot, rank] = rows
        c_vals[slot, rank] = values
        all_keys = torch.cat([self.keys[touched], c_keys], dim=1)
        # stable sort on the key: kept entries (earlier rows) precede new ones with the same key
        pick = torch.sort(all_keys, dim=1, stable=True).indices[:, :self.size]
        new_rows = torch.cat([self.rows[touched], c_rows], dim=1).gather(1, pick)
        self.keys[touched] = all_keys.gather(1, pick)
        self.rows[touched] = new_rows
        self.values[touched] = torch.cat([self.values[touched], c_vals], dim=1).gather(1, pick)
        # windows: kept entries keep theirs; only entries that just entered are gathered from the block
        width = self.windows.shape[-1]
        windows = self.windows[touched].gather(1, pick.clamp(max=self.size - 1)[..., None].expand(-1, -1, width))
        entered = (pick >= self.size) & (new_rows >= 0)
        t_idx, s_idx = entered.nonzero(as_tuple=True)
        if t_idx.numel():
            windows[t_idx, s_idx] = gather_windows(new_rows[t_idx, s_idx], touched[t_idx])
        self.windows[touched] = windows


@dataclass
class LatentStats:
    """Everything the streaming pass computed for one SAE (row numbers are global store rows)."""

    rows_seen: int
    count: torch.Tensor  # int64 [d_sae] firings
    sum: torch.Tensor  # float64 [d_sae] Σ activation
    top_values: torch.Tensor  # [d_sae, k], descending; 0 where fewer than k firings
    top_rows: torch.Tensor  # [d_sae, k], -1 where empty
    top_windows: torch.Tensor  # [d_sae, k, window]
    sample_values: torch.Tensor  # [d_sae, n_samples]
    sample_rows: torch.Tensor  # [d_sae, n_samples], -1 where empty
    sample_windows: torch.Tensor  # [d_sae, n_samples, window]
    histogram: torch.Tensor  # int64 [d_sae, bins]
    edges: np.ndarray  # [bins + 1]

    @property
    def frequency(self) -> torch.Tensor:
        return self.count.double() / max(1, self.rows_seen)

    @property
    def max_activation(self) -> torch.Tensor:
        return self.top_values[:, 0]


def sae_site_id(sae) -> str | None:
    """The store site id (``"resid_post/layer_6"``) an SAE reads, from its config's ``site`` and ``layer``."""
    from saescope.config import Site

    site, layer = sae.config.site, sae.config.layer
    if not site:
        return None
    if "/" in site or ":" in site:
        return Site.parse(site).id
    if layer is None:
        return None
    return Site(kind=site, layer=layer).id


def decoder_site_id(sae) -> str | None:
    """Where the SAE's decoder writes: its own site, or a transcoder's target (``training["target_site"]``)."""
    from saescope.config import Site

    target = (sae.config.training or {}).get("target_site")
    return Site.parse(target).id if target else sae_site_id(sae)


def _encoded_blocks(sae, blocks: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    with torch.no_grad():
        for start, x in blocks:
            f = sae.encode(x.to(device=sae.device))
            yield start, f.detach().to("cpu", torch.float32)


def compute_latent_stats(sae, store: str | Path, site: str | None = None,
                         settings: DashboardSettings | None = None, *, progress: bool = True) -> LatentStats:
    """One in-order pass over ``store``'s rows of the SAE's site: top-k, samples, counts, histogram."""
    settings = settings or DashboardSettings()
    site = site or sae_site_id(sae)
    if not site:
        raise SaescopeError("the SAE's config names no site; pass the store site to read (e.g. "
                            "'resid_post/layer_6')")
    index = open_store(store, site)
    d = index.sites[site].d
    if d != sae.d_in:
        raise SaescopeError(f"the store's {site} rows have width {d} but the SAE reads d_in={sae.d_in}; "
                            "pick the store and site this SAE was trained on")
    total = index.rows if settings.max_rows is None else min(index.rows, settings.max_rows)
    d_sae, before, after = sae.d_sae, settings.context_before, settings.context_after
    window = settings.window
    top = Selection(d_sae, settings.top_k, window)
    samples = Selection(d_sae, settings.n_samples, window)
    edges = settings.histogram_edges()
    bins = len(edges) - 1
    log_lo = math.log10(settings.hist_min)
    step = (math.log10(settings.hist_max) - log_lo) / bins
    histogram = torch.zeros(d_sae * bins, dtype=torch.int64)
    count = torch.zeros(d_sae, dtype=torch.int64)
    total_sum = torch.zeros(d_sae, dtype=torch.float64)
    gen = torch.Generator().manual_seed(settings.seed)
    offsets = torch.arange(-before, after + 1)

    blocks = _encoded_blocks(sae, iter_site_rows(store, site, settings.block_rows, settings.max_rows))
    bar = tqdm(total=total, unit="tok", desc=f"dashboards {site}", disable=not progress)
    tail = torch.zeros((0, d_sae))
    current = next(blocks, None)
    while current is not None:
        start, f = current
        following = next(blocks, None)
        head = following[1][:after] if following is not None else torch.zeros((0, d_sae))
        buffer = torch.cat([tail, f, head])
        buffer_start = start - tail.shape[0]

        def gather(rows: torch.Tensor, latents: torch.Tensor, buffer=buffer, buffer_start=buffer_start):
            idx = rows[:, None] - buffer_start + offsets[None, :]
            valid = (idx >= 0) & (idx < buffer.shape[0])
            out = buffer[idx.clamp(0, buffer.shape[0] - 1), latents[:, None]]
            return torch.where(valid, out, torch.zeros(()))

        r_local, latents = (f > 0).nonzero(as_tuple=True)
        values = f[r_local, latents]
        rows = r_local + start
        count += torch.bincount(latents, minlength=d_sae)
        total_sum.index_add_(0, latents, values.double())
        b = ((torch.log10(values.double()) - log_lo) / step).floor().clamp(0, bins - 1).long()
        histogram += torch.bincount(latents * bins + b, minlength=d_sae * bins)
        top.merge(latents, -values.double(), rows, values, gather)
        if samples.size:
            keys = torch.rand(values.numel(), generator=gen, dtype=torch.float64)
            samples.merge(latents, keys, rows, values, gather)
        tail = torch.cat([tail, f])[-before:] if before else tail
        bar.update(f.shape[0])
        current = following
    bar.close()
    return LatentStats(rows_seen=total, count=count, sum=total_sum, top_values=top.values,
                       top_rows=top.rows, top_windows=top.windows, sample_values=samples.values,
                       sample_rows=samples.rows, sample_windows=samples.windows,
                       histogram=histogram.view(d_sae, bins), edges=edges)
