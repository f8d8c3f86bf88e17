"""Turn the streaming pass's numbers into per-latent dashboard records and write them (JSON + static HTML).

Output folder (default ``<sae folder>/dashboards``)::

    summary.json     SAE, store, settings, and per latent: frequency, max activation, count, byte offset
    latents.jsonl    one JSON record per latent, in latent order (contexts, quantile samples, histogram,
                     logit effect)
    index.html       sortable index of all latents (offline, no CDN)
    latents/<i>.html one page per latent with previous/next navigation
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saescope.dashboards.compute import (
    DashboardSettings,
    LatentStats,
    compute_latent_stats,
    decoder_site_id,
    sae_site_id,
)
from saescope.dashboards.html import Links, render_index_page, render_latent_page
from saescope.dashboards.logit_effect import top_logit_tokens
from saescope.dashboards.store_reader import TokenTable, read_token_table
from saescope.errors import SaescopeError

SUMMARY_NAME = "summary.json"
LATENTS_NAME = "latents.jsonl"


class TokenText:
    """Printable text of single token ids (cached); keeps a token's leading space."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._cache:
            tok = self.tokenizer
            piece = tok.convert_ids_to_tokens(token_id)
            if piece is None:
                text = f"<{token_id}>"
            elif "▁" in piece:  # sentencepiece: ▁ marks a space
                text = piece.replace("▁", " ")
            else:
                text = tok.convert_tokens_to_string([piece])
            self._cache[token_id] = text
        return self._cache[token_id]


def _example(row: int, act: float, window: torch.Tensor, table: TokenTable, text: TokenText,
             settings: DashboardSettings) -> dict:
    lo, hi = table.window(row, settings.context_before, settings.context_after)
    base = row - settings.context_before  # window[0] is this row
    return {"row": int(row), "act": float(act), "focus": int(row - lo),
            "document": int(table.document_ids[row]), "position": int(table.positions[row]),
            "tokens": [text(t) for t in table.token_ids[lo:hi]],
            "acts": [round(float(window[r - base]), 6) for r in range(lo, hi)]}


def latent_records(stats: LatentStats, table: TokenTable, tokenizer: Any, settings: DashboardSettings,
                   logits: tuple | None = None) -> Iterator[dict]:
    """One dashboard record per latent (see the module doc for the fields)."""
    text = TokenText(tokenizer)
    d_sae = stats.count.shape[0]
    freq = stats.frequency
    for i in range(d_sae):
        count = int(stats.count[i])
        top = [_example(int(r), float(v), stats.top_windows[i, j], table, text, settings)
               for j, (r, v) in enumerate(zip(stats.top_rows[i].tolist(), stats.top_values[i].tolist()))
               if r >= 0]
        kept = [(float(stats.sample_values[i, j]), int(r), j) for j, r in enumerate(stats.sample_rows[i].tolist())
                if r >= 0]
        kept.sort()
        quantiles = []
        q = settings.n_quantiles
        for g in range(q):
            group = kept[len(kept) * g // q: len(kept) * (g + 1) // q]
            if not group:
                continue
            pick = np.unique(np.linspace(0, len(group) - 1, min(settings.per_quantile, len(group))).round()
                             .astype(int))
            examples = [_example(group[p][1], group[p][0], stats.sample_windows[i, group[p][2]], table, text,
                                 settings) for p in pick]
            quantiles.append({"label": f"quantile {100 * g // q}–{100 * (g + 1) // q}% of firings "
                                       f"(activation {group[0][0]:.3g}–{group[-1][0]:.3g})",
                              "examples": examples})
        counts = stats.histogram[i].tolist()
        nz = [j for j, c in enumerate(counts) if c]
        hist = {"edges": [], "counts": []}
        if nz:
            a, b = nz[0], nz[-1] + 1
            hist = {"edges": [float(e) for e in stats.edges[a:b + 1]], "counts": counts[a:b]}
        record = {"index": i, "count": count, "frequency": float(freq[i]),
                  "max": float(stats.top_values[i, 0]) if count else 0.0,
                  "mean": float(stats.sum[i] / count) if count else 0.0,
                  "top": top, "quantiles": quantiles, "histogram": hist, "logits": None}
        if logits is not None:
            top_ids, top_v, bot_ids, bot_v = logits
            record["logits"] = {"top": [[text(t), float(v)] for t, v in zip(top_ids[i].tolist(), top_v[i].tolist())],
                                "bottom": [[text(t), float(v)] for t, v in zip(bot_ids[i].tolist(),
                                                                               bot_v[i].tolist())]}
        yield record


def sae_title(sae: Any, site: str) -> str:
    cfg = sae.config
    return f"{cfg.model or 'model'} · {site} · width {sae.d_sae}"


def build_dashboards(sae: Any, store: str | Path, tokenizer: Any, model: Any = None, *, out: str | Path,
                     site: str | None = None, settings: DashboardSettings | None = None,
                     html: bool = True, progress: bool = True) -> Path:
    """Compute and write the dashboards of every latent of ``sae`` from ``store`` into ``out``.

    ``model`` (a causal LM or LoadedModel) is only used for the logit effect (skipped when None). Returns
    the output folder.
    """
    settings = settings or DashboardSettings()
    site = site or sae_site_id(sae)
    if tokenizer is None:
        raise SaescopeError("dashboards need the model's tokenizer to show contexts as text")
    stats = compute_latent_stats(sae, store, site, settings, progress=progress)
    table = read_token_table(store)
    logits = None
    if model is not None:
        directions = sae.W_dec.detach().float() * sae.norm_scale
        # a transcoder's decoder writes its target site (mlp_out), not the site it reads (mlp_in)
        write_site = decoder_site_id(sae) if site == sae_site_id(sae) else site
        logits = top_logit_tokens(model, write_site, directions, k=settings.logit_k)
    out = Path(out)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    title = sae_title(sae, site)
    meta = {"title": title, "d_sae": sae.d_sae, "rows": stats.rows_seen}
    links = Links(index="../index.html", latent=lambda i: f"{i}.html")
    rows = []
    with open(out / LATENTS_NAME, "wb") as handle:
        records = latent_records(stats, table, tokenizer, settings, logits)
        for record in tqdm(records, total=sae.d_sae, desc="dashboard pages", unit="latent", disable=not progress):
            offset = handle.tell()
            handle.write((json.dumps(record) + "\n").encode())
            preview = record["top"][0]["tokens"][record["top"][0]["focus"]] if record["top"] else ""
            rows.append({"index": record["index"], "count": record["count"], "frequency": record["frequency"],
                         "max": record["max"], "offset": offset, "preview": preview})
            if html:
                (out / "latents" / f"{record['index']}.html").write_text(render_latent_page(record, meta, links))
    summary = {"title": title, "site": site, "model": sae.config.model, "d_sae": sae.d_sae,
               "rows": stats.rows_seen, "store": str(store), "settings": settings.model_dump(mode="json"),
               "logit_effect": "W_U (gamma * W_dec[i] * C); final norm gain gamma, no 1/rms, no soft-cap",
               "latents": rows}
    (out / SUMMARY_NAME).write_text(json.dumps(summary))
    if html:
        index_links = Links(index="index.html", latent=lambda i: f"latents/{i}.html")
        (out / "index.html").write_text(render_index_page(summary, index_links))
    return out


def load_summary(folder: str | Path) -> dict:
    path = Path(folder) / SUMMARY_NAME
    if not path.is_file():
        raise SaescopeError(f"no dashboards at {folder} (no {SUMMARY_NAME}); build them with "
                            "`saescope dashboards`")
    return json.loads(path.read_text())


def load_latent(folder: str | Path, summary: dict, i: int) -> dict:
    """Read latent ``i``'s record from ``latents.jsonl`` with one seek (the offset is in the summary)."""
    rows = summary["latents"]
    if not 0 <= i < len(rows):
        raise SaescopeError(f"latent {i} does not exist: this SAE has latents 0..{len(rows) - 1}")
    with open(Path(folder) / LATENTS_NAME, "rb") as handle:
        handle.seek(rows[i]["offset"])
        return json.loads(handle.readline())


def run_dir_of(folder: Path) -> Path | None:
    """``runs/<name>`` for an SAE folder ``runs/<name>/suite/<site>/...`` (None when not in a run)."""
    for parent in Path(folder).resolve().parents:
        if parent.name == "suite":
            return parent.parent
    return None


def dashboards_for(path: str | Path, *, store: str | Path | None = None, model: str | None = None,
                   settings: DashboardSettings | None = None, device: str = "cpu", html: bool = True,
                   progress: bool = True) -> list[Path]:
    """Build dashboards for the SAE at ``path``, or for every SAE of a run directory, into
    ``<sae folder>/dashboards``. The store defaults to ``<run>/activations``; the model (tokenizer and
    unembedding) to each SAE's ``config.model``. Inputs are checked for all SAEs before any long work."""
    from saescope.dashboards.store_reader import open_store
    from saescope.formats import load_sae
    from saescope.models import load_model
    from saescope.suite import sae_folders

    path = Path(path)
    if (path / "saescope.json").is_file() or not path.is_dir():
        folders = [path]
    else:
        folders = sae_folders(path)
    jobs = []
    for folder in folders:
        sae = load_sae(folder, device=device)
        site = sae_site_id(sae)
        if site is None:
            raise SaescopeError(f"{folder}: the SAE's config names no site/layer, so its store rows are unknown")
        where = Path(store) if store is not None else (run_dir_of(folder) or folder) / "activations"
        index = open_store(where, site)
        if index.sites[site].d != sae.d_in:
            raise SaescopeError(f"{folder}: the store's {site} rows have width {index.sites[site].d} but the SAE "
                                f"reads d_in={sae.d_in}")
        name = model or sae.config.model or index.model
        if not name:
            raise SaescopeError(f"{folder}: no model named in the SAE config or the store; pass --model")
        jobs.append((folder, sae, where, site, name))
    models: dict[str, Any] = {}
    outs = []
    for folder, sae, where, site, name in jobs:
        if name not in models:
            models[name] = load_model(name, device=device)
        lm = models[name]
        outs.append(build_dashboards(sae, where, lm.tokenizer, lm, out=Path(folder) / "dashboards", site=site,
                                     settings=settings, html=html, progress=progress))
    return outs
