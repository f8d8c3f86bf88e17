"""Evaluate a suite of SAEs on held-out token windows (Gemma Scope §4, App. C).

The clean forward runs once per batch for the whole suite (:func:`~saescope.evaluate.layer_cache.clean_pass`);
each SAE reads its site from that pass, and its spliced pass starts at its site's layer from the cached
layer input. Zero-ablation (for loss recovered) and the attribution gradient for uniformity (App. C.3)
are computed once per batch per site and shared by every SAE at that site.

Token handling (Gemma Scope §4.1, "after masking out BOS, EOS and padding tokens"): ``mask [batch, seq]``
is False at BOS, EOS and padding. Reconstruction metrics use the True positions; the reconstruction is
spliced in only there (BOS stays clean, the SAE never saw it in training); loss term t (predicting token
t+1) counts when position t is True.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from saescope.config import Site
from saescope.errors import SaescopeError
from saescope.evaluate.layer_cache import CleanPass, clean_pass, mean_centered_logit_gradient, spliced_losses
from saescope.evaluate.metrics import (
    LossAccumulator,
    ReconstructionAccumulator,
    UniformityAccumulator,
    finite_or_none,
)
from saescope.sites import _unwrap


class EvalBatch(NamedTuple):
    """A batch of held-out windows from one text domain; ``mask`` is False at BOS, EOS and padding."""

    domain: str
    input_ids: torch.Tensor
    mask: torch.Tensor
    attention_mask: torch.Tensor | None = None


@dataclass
class EvalTarget:
    """One SAE (or transcoder) to evaluate: it reads ``read_site`` and reconstructs ``write_site``."""

    name: str
    sae: Any
    read_site: Site
    write_site: Site
    kind: str = "sae"
    path: str | None = None

    @classmethod
    def of(cls, name: str, sae: Any, path: str | Path | None = None) -> EvalTarget:
        """Sites from the SAE's config: ``site``/``layer``; a transcoder (``d_out``/``site_out`` or an
        ``mlp_in`` site) reads ``mlp_in`` and writes ``mlp_out`` of its layer (Gemma Scope App. B)."""
        config = getattr(sae, "config", None)
        site_text, layer = getattr(config, "site", None), getattr(config, "layer", None)
        if site_text is None:
            raise SaescopeError(f"SAE {name!r} does not say which site it was trained on (config.site is "
                                "empty); set sae.config.site and sae.config.layer, e.g. 'resid_post' and 6")
        try:
            site = Site.parse(site_text) if layer is None or "/" in str(site_text) or ":" in str(site_text) \
                else Site(kind=site_text, layer=layer)
        except ValueError as exc:
            raise SaescopeError(f"SAE {name!r}: {exc}") from None
        d_out = getattr(sae, "d_out", None) or getattr(config, "d_out", None)
        is_transcoder = site.kind == "mlp_in" or bool(getattr(config, "is_transcoder", False)) or (
            d_out is not None and d_out != getattr(sae, "d_in", d_out))
        if is_transcoder:
            return cls(name, sae, Site(kind="mlp_in", layer=site.layer), Site(kind="mlp_out", layer=site.layer),
                       "transcoder", None if path is None else str(path))
        return cls(name, sae, site, site, "sae", None if path is None else str(path))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", text).strip("_") or "sae"


@dataclass
class _State:
    recon: dict[str, ReconstructionAccumulator] = field(default_factory=dict)
    loss: dict[str, LossAccumulator] = field(default_factory=dict)
    uniformity: UniformityAccumulator = field(default_factory=UniformityAccumulator)


def _reconstruct(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = sae.encode(x)
    if getattr(sae, "W_skip", None) is not None:   # a skip transcoder's output also reads its input: forward(x)
        return f, sae.decode(f, x)
    return f, sae.decode(f)


@dataclass(frozen=True)
class MetricOptions:
    """What the suite evaluator measures beyond L0/FVU/Δ loss, and how precisely (validated once).

    ``uniformity_tokens`` caps the tokens per SAE used for App. C.3 (it needs a backward pass per batch; 0: off).
    ``position_bins`` groups positions for Δ loss by position (App. C.2). ``principal_directions`` is k of
    ``fvu_top``/``fvu_rest`` (0: skip). ``bootstrap_samples``, ``confidence`` and ``bootstrap_seed`` set the
    paired bootstrap interval of Δ loss over windows (each row of a batch is one window;
    :func:`~saescope.evaluate.metrics.bootstrap_delta_loss`). ``zero_ablation_tokens`` caps the tokens per site
    and domain that are also run zero-ablated (for loss recovered; whole batches, from the first; None: every
    batch). Zero-ablation costs as much as one more SAE per site, and its loss (~20 nats on Gemma 3) needs far
    fewer tokens than Δ loss to be known well. :meth:`saescope.evaluate.run.EvalConfig.metric_options` builds
    one from an evaluation config.
    """

    uniformity_tokens: int = 4096
    position_bins: int = 32
    principal_directions: int = 1
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0
    zero_ablation_tokens: int | None = 16384

    def __post_init__(self) -> None:
        if self.principal_directions < 0 or self.bootstrap_samples < 1 or not 0 < self.confidence < 1:
            raise SaescopeError(f"principal_directions must be ≥ 0 (got {self.principal_directions}), "
                                f"bootstrap_samples ≥ 1 (got {self.bootstrap_samples}) and confidence in (0, 1) "
                                f"(got {self.confidence})")

    @property
    def bootstrap(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`~saescope.evaluate.metrics.LossAccumulator.result`'s interval."""
        return {"n_boot": self.bootstrap_samples, "confidence": self.confidence, "seed": self.bootstrap_seed}


@torch.no_grad()
def evaluate_saes(
    model: Any,
    saes: Mapping[str, Any] | Sequence[EvalTarget],
    batches: Iterable[EvalBatch],
    metrics: MetricOptions | None = None,
    *,
    chunk_size: int = 512,
    token_chunk: int = 2048,
    progress: bool = True,
    total_batches: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every SAE of ``saes`` on ``batches``; returns one result dict per SAE (JSON-ready).

    ``saes`` maps names to SAE objects (``encode``/``decode``/``W_dec`` and ``config.site``/``layer``) or is
    a list of :class:`EvalTarget`. ``metrics`` (:class:`MetricOptions`, default: its defaults) sets the
    uniformity, Δ-loss-interval, principal-direction and zero-ablation settings. With ``total_batches`` known,
    the batches that carry the App. C.3 gradient are spread evenly over the evaluation (every
    ``total_batches // needed``-th), so the statistic samples every domain rather than the first windows.
    Latents are built ``token_chunk`` tokens at a time, so memory stays bounded for wide SAEs; ``chunk_size``
    tokens are unembedded at once.
    """
    metrics = MetricOptions() if metrics is None else metrics
    uniformity_tokens, zero_ablation_tokens = metrics.uniformity_tokens, metrics.zero_ablation_tokens
    principal_directions = metrics.principal_directions
    targets = [EvalTarget.of(n, s) for n, s in saes.items()] if isinstance(saes, Mapping) else list(saes)
    if not targets:
        raise SaescopeError("no SAEs to evaluate")
    lm = _unwrap(model)
    if any(t.kind == "transcoder" for t in targets):
        from saescope.folding import fold_mlp_in_norm, mlp_in_is_folded
        if not mlp_in_is_folded(lm):
            fold_mlp_in_norm(lm)  # same outputs; mlp_in becomes the gain-free normalized input (App. B)
    sites = list(dict.fromkeys([t.read_site for t in targets] + [t.write_site for t in targets]))
    write_sites = list(dict.fromkeys(t.write_site for t in targets))
    states = {t.name: _State() for t in targets}
    uniformity_left = {t.name: uniformity_tokens for t in targets}
    device = next(lm.parameters()).device
    bar = tqdm(batches, total=total_batches, desc="evaluate", unit="batch", disable=not progress)
    tokens_seen = 0
    zero_seen: dict[tuple[str, str], int] = {}
    uniformity_stride = 0  # set from the first batch: spread App. C.3's tokens over the whole evaluation
    for batch_index, batch in enumerate(bar):
        ids = batch.input_ids.to(device)
        mask = batch.mask.to(device=device, dtype=torch.bool)
        if ids.shape != mask.shape or ids.dim() != 2 or ids.shape[1] < 2:
            raise SaescopeError(f"a batch must be input_ids and mask of the same shape [batch, seq≥2], got "
                                f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        counted = mask[:, :-1]
        if batch.attention_mask is not None:
            counted = counted & batch.attention_mask.to(device).bool()[:, 1:]
        cache: CleanPass = clean_pass(lm, ids, sites, attention_mask=batch.attention_mask, chunk_size=chunk_size)
        zero = {s.id: spliced_losses(cache, s, torch.zeros_like(cache.sites[s.id]), mask) for s in write_sites
                if zero_ablation_tokens is None or zero_seen.get((s.id, batch.domain), 0) < zero_ablation_tokens}
        for site_id in zero:
            zero_seen[(site_id, batch.domain)] = zero_seen.get((site_id, batch.domain), 0) + int(counted.sum())
        gradients: dict[str, torch.Tensor] = {}
        if not uniformity_stride:
            per_batch = max(1, int(counted.sum()))
            needed = -(-uniformity_tokens // per_batch) if uniformity_tokens > 0 else 1
            uniformity_stride = max(1, (total_batches or 0) // max(1, needed))
        uniformity_batch = batch_index % uniformity_stride == 0
        for t in targets:
            state = states[t.name]
            x_in = cache.sites[t.read_site.id]
            x_out = cache.sites[t.write_site.id]
            x_sel, x_true = x_in[mask], x_out[mask]
            x_hat = torch.empty(x_true.shape, dtype=x_true.dtype, device=x_true.device)
            for lo in range(0, x_sel.shape[0], token_chunk):  # latents [token_chunk, d_sae] at a time
                f, x_hat_part = _reconstruct(t.sae, x_sel[lo:lo + token_chunk])
                x_hat[lo:lo + token_chunk] = x_hat_part.to(x_hat.dtype)
                for key in ("all", batch.domain):
                    acc = state.recon.setdefault(key, ReconstructionAccumulator(
                        d_sae=f.shape[-1], principal_directions=principal_directions))
                    acc.update(x_true[lo:lo + token_chunk], x_hat_part, f)
            full = x_out.clone()
            full[mask] = x_hat
            spliced = spliced_losses(cache, t.write_site, full, mask)
            for key in ("all", batch.domain):
                state.loss.setdefault(key, LossAccumulator()).update(
                    cache.clean_loss, spliced, counted, zero.get(t.write_site.id))
            if uniformity_left[t.name] > 0 and uniformity_batch:
                if t.write_site.id not in gradients:
                    gradients[t.write_site.id] = mean_centered_logit_gradient(cache, t.write_site, counted)
                grad = gradients[t.write_site.id]
                take = torch.zeros_like(mask)
                take[:, :-1] = counted
                g = grad[take]
                keep = min(uniformity_left[t.name], g.shape[0])
                f_all = t.sae.encode(x_in[take][:keep])
                w_dec = t.sae.W_dec.to(torch.float32)
                y = f_all[:keep].float() * (g[:keep].float() @ w_dec.T)
                state.uniformity.update(y)
                uniformity_left[t.name] -= keep
        tokens_seen += int(mask.sum())
        bar.set_postfix(tokens=tokens_seen)
    results = []
    for t in targets:
        state = states[t.name]
        if "all" not in state.recon:
            raise SaescopeError("no evaluation batches were given (or every position was masked)")
        results.append(_result(t, state, metrics.position_bins, metrics.bootstrap))
    return results


def _training_summary(sae: Any) -> dict[str, Any]:
    config = getattr(sae, "config", None)
    training = getattr(config, "training", None) or {}
    return dict(training) if isinstance(training, Mapping) else {}


def _result(t: EvalTarget, state: _State, position_bins: int, boot: Mapping[str, Any]) -> dict[str, Any]:
    overall = state.recon["all"].result()
    frequencies = overall.pop("_frequencies")
    overall.update(state.loss["all"].result(position_bins=position_bins, **boot))
    overall.update(state.uniformity.result())
    domains = {}
    for key in state.recon:
        if key == "all":
            continue
        r = state.recon[key].result()
        r.pop("_frequencies")
        for drop in ("log10_frequency_histogram", "d_sae", "dead", "dense", "dead_fraction", "dense_fraction",
                     "dense_l0_share"):
            r.pop(drop, None)
        r.update(state.loss[key].result(position_bins=position_bins, **boot))
        r.pop("delta_loss_by_position", None)
        r.pop("delta_loss_windows", None)
        domains[key] = r
    sae = t.sae
    return finite_or_none({
        "name": t.name,
        "path": t.path,
        "kind": t.kind,
        "site": t.write_site.id if t.kind == "sae" else f"{t.read_site.id}->{t.write_site.id}",
        "read_site": t.read_site.id,
        "write_site": t.write_site.id,
        "layer": t.write_site.layer,
        "d_in": int(getattr(sae, "d_in", 0) or 0),
        "d_sae": int(frequencies.numel()),
        "training": _training_summary(sae),
        "metrics": overall,
        "domains": domains,
        "dead_latent_ids_sample": [int(i) for i in torch.nonzero(frequencies == 0).flatten()[:32]],
    })


TABLE_COLUMNS = ("name", "kind", "site", "d_sae", "l0", "fvu", "fvu_top", "fvu_rest", "top_variance_share", "mse",
                 "cosine", "clean_loss", "spliced_loss", "delta_loss", "delta_loss_lower", "delta_loss_upper",
                 "loss_recovered", "dead", "dense", "dense_l0_share", "r_l0", "n_tokens", "n_windows")


def _row_value(column: str, r: Mapping[str, Any], m: Mapping[str, Any]) -> Any:
    ci = m.get("delta_loss_ci") or {}
    if column == "delta_loss_lower":
        return ci.get("lower")
    if column == "delta_loss_upper":
        return ci.get("upper")
    if column == "n_windows":
        return ci.get("n_windows")
    return r.get(column) if column in r else m.get(column)


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per SAE: the headline numbers, then ``delta_loss[<domain>]`` / ``fvu[<domain>]``."""
    rows = []
    for r in results:
        m = r["metrics"]
        row = {c: _row_value(c, r, m) for c in TABLE_COLUMNS}
        for dom, dm in sorted(r.get("domains", {}).items()):
            row[f"delta_loss[{dom}]"] = dm.get("delta_loss")
            ci = dm.get("delta_loss_ci") or {}
            row[f"delta_loss_lower[{dom}]"] = ci.get("lower")
            row[f"delta_loss_upper[{dom}]"] = ci.get("upper")
            row[f"fvu[{dom}]"] = dm.get("fvu")
            row[f"fvu_rest[{dom}]"] = dm.get("fvu_rest")
            row[f"l0[{dom}]"] = dm.get("l0")
        rows.append(row)
    return rows


def write_eval(results: Sequence[Mapping[str, Any]], out_dir: str | Path, *,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/<sae>.json`` per SAE and ``<out_dir>/table.json`` (every number, plus the rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        (out / f"{_slug(r['name'])}.json").write_text(json.dumps(r, indent=2, allow_nan=False))
    table = {"columns": list(table_rows(results)[0].keys()) if results else list(TABLE_COLUMNS),
             "rows": table_rows(results), "results": list(results), **(dict(extra) if extra else {})}
    path = out / "table.json"
    path.write_text(json.dumps(finite_or_none(table), indent=2, allow_nan=False))
    return path


