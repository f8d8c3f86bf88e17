"""The by-layer report of a scope run (the paper's per-layer figures, Gemma Scope §4, Figs. 5–6 of 2408.05147).

Reads ``RUN_DIR/eval/table.json`` and writes, under ``RUN_DIR/report/``:

* per site kind (``resid_post``, ``attn_out``, ``mlp_out``, ``transcoder``) four figures against layer:
  ``figures/fvu_by_layer_<site>.png``, ``delta_loss_by_layer_<site>.png`` (with the evaluator's confidence
  bootstrap interval over windows as error bars, ``metrics.delta_loss_ci = {"lower", "upper", ...}``
  from :func:`saescope.evaluate.metrics.bootstrap_delta_loss`), ``l0_by_layer_<site>.png`` and ``dead_dense_by_layer_<site>.png``; one line per width
  and target-L0 rank (small / medium / big when the ladder was used);
* ``by_layer.json``: one row per SAE (site, layer, width, target L0, L0, FVU, Δ loss and its interval, dead and
  dense latents);
* ``by_layer.html``: the figures, the table, and an index of every SAE grouped by site and then layer, linking
  each SAE's folder and its dashboards where they were built.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saescope.errors import SaescopeError

COLUMNS = ("site", "layer", "d_sae", "target_l0", "l0", "fvu", "fvu_rest", "delta_loss", "delta_loss_low",
           "delta_loss_high", "dead", "dense", "dense_l0_share", "name")


def _interval(metrics: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The evaluator's Δ loss interval (``delta_loss_ci``: a dict with ``lower``/``upper``), or (None, None)."""
    ci = metrics.get("delta_loss_ci")
    if isinstance(ci, Mapping):
        return ci.get("lower"), ci.get("upper")
    return None, None


def site_kind(result: Mapping[str, Any]) -> str:
    if result.get("kind") == "transcoder":
        return "transcoder"
    return str(result.get("write_site") or result["site"]).split("/")[0]


def layer_rows(results: Sequence[Mapping[str, Any]], ladder: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per SAE, sorted by site, layer, width and target; ``line`` names its curve in the figures."""
    rows = []
    for r in results:
        m = r.get("metrics", {})
        low, high = _interval(m)
        rows.append({"site": site_kind(r), "layer": int(r["layer"]), "d_sae": int(r["d_sae"]),
                     "target_l0": (r.get("training") or {}).get("target_l0"), "l0": m.get("l0"), "fvu": m.get("fvu"),
                     "fvu_rest": m.get("fvu_rest"), "dense_l0_share": m.get("dense_l0_share"),
                     "delta_loss": m.get("delta_loss"), "delta_loss_low": low, "delta_loss_high": high,
                     "dead": m.get("dead"), "dense": m.get("dense"), "name": r["name"], "path": r.get("path")})
    rows.sort(key=lambda x: (x["site"], x["layer"], x["d_sae"], x["target_l0"] or 0.0, x["l0"] or 0.0))
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_cell[(row["site"], row["layer"], row["d_sae"])].append(row)
    for cell in by_cell.values():
        for rank, row in enumerate(cell):
            row["rank"] = rank
    for (site, width), group in _by(rows, ("site", "d_sae")).items():
        for rank, members in _by(group, ("rank",)).items():
            targets = {m["target_l0"] for m in members}
            if ladder and len(ladder) == max(len(by_cell[(site, m["layer"], width)]) for m in members):
                label = f"l0 {ladder[rank[0]]}"
            elif len(targets) == 1 and None not in targets:
                label = f"target L0 {targets.pop():g}"
            else:
                label = f"target #{rank[0] + 1}"
            for m in members:
                m["line"] = f"width {width} · {label}"
    return rows


def _by(rows: Sequence[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in keys)].append(row)
    return dict(sorted(out.items()))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _figure(rows: Sequence[dict], site: str, metric: str, path: Path) -> Path:
    from saescope.report.figures import _save, plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for line, members in _by(rows, ("line",)).items():
        members = sorted(members, key=lambda m: m["layer"])
        if metric == "dead_dense":
            for key, style in (("dead", "-o"), ("dense", "--s")):
                pts = [(m["layer"], m[key]) for m in members if _finite(m[key])]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{line[0]} · {key}")
            continue
        pts = [m for m in members if _finite(m[metric])]
        if not pts:
            continue
        xs, ys = [m["layer"] for m in pts], [m[metric] for m in pts]
        if metric == "delta_loss" and all(_finite(m["delta_loss_low"]) and _finite(m["delta_loss_high"]) for m in pts):
            # a percentile interval need not contain the point estimate (one window, rounding): clip at 0
            err = [[max(y - m["delta_loss_low"], 0.0) for y, m in zip(ys, pts)],
                   [max(m["delta_loss_high"] - y, 0.0) for y, m in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, fmt="-o", capsize=3, label=line[0])
        else:
            ax.plot(xs, ys, "-o", label=line[0])
    labels = {"fvu": "FVU (held-out)", "delta_loss": "Δ LM loss (nats)", "l0": "L0 (held-out)",
              "dead_dense": "latents (dead: never fire; dense: > 10% of tokens)"}
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(labels[metric])
    ax.set_title(f"{site}: {labels[metric].split(' (')[0]} by layer")
    if metric == "fvu":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def layer_figures(rows: Sequence[dict], folder: Path) -> dict[str, list[Path]]:
    """``{site: [figure paths]}``, four per site kind (file names contain ``by_layer``)."""
    out: dict[str, list[Path]] = {}
    for (site,), members in _by(rows, ("site",)).items():
        out[site] = [_figure(members, site, metric, folder / f"{metric}_by_layer_{site}.png")
                     for metric in ("fvu", "delta_loss", "l0", "dead_dense")]
    return out


def _index(rows: Sequence[dict], run_dir: Path) -> str:
    parts = ["<h2 id='index'>Every SAE, by site and layer</h2>"]
    for (site,), members in _by(rows, ("site",)).items():
        parts.append(f"<h3>{html.escape(site)}</h3><ul class='index'>")
        for (layer,), cell in _by(members, ("layer",)).items():
            links = []
            for row in cell:
                folder = Path(row["path"]) if row.get("path") else None
                href = (Path("..") / folder.resolve().relative_to(run_dir.resolve())).as_posix() if folder and \
                    folder.resolve().is_relative_to(run_dir.resolve()) else None
                text = f"width {row['d_sae']}, L0 {row['l0']:.1f}" if _finite(row["l0"]) else row["name"]
                link = f"<a href='{html.escape(href)}/'>{html.escape(text)}</a>" if href else html.escape(text)
                if folder is not None and (folder / "dashboards" / "index.html").is_file():
                    link += f" (<a href='{html.escape(href)}/dashboards/index.html'>dashboards</a>)"
                links.append(link)
            parts.append(f"<li>layer {layer}: {' · '.join(links)}</li>")
        parts.append("</ul>")
    return "\n".join(parts)


def write_layer_report(run_dir: str | Path) -> Path:
    """Write the by-layer figures, ``by_layer.json`` and ``by_layer.html`` under ``RUN_DIR/report``."""
    from saescope.report.html import STYLE, _image, _table

    run_dir = Path(run_dir)
    source = run_dir / "eval" / "table.json"
    if not source.is_file():
        raise SaescopeError(f"{source} does not exist: evaluate the run first (saescope evaluate {run_dir})")
    results = json.loads(source.read_text()).get("results") or []
    if not results:
        raise SaescopeError(f"{source} holds no results; evaluate the run again")
    scope_cfg = run_dir / "scope_config.json"
    ladder = json.loads(scope_cfg.read_text()).get("l0") if scope_cfg.is_file() else None
    rows = layer_rows(results, ladder)
    out = run_dir / "report"
    figures = layer_figures(rows, out / "figures")
    (out / "by_layer.json").write_text(json.dumps({"columns": list(COLUMNS), "rows": rows}, indent=2) + "\n")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>by layer: {html.escape(run_dir.name)}"
             f"</title><style>{STYLE}</style></head><body><h1>{html.escape(run_dir.name)}: every SAE by layer</h1>",
             f"<p>{len(rows)} SAE(s) evaluated on held-out documents; the full report is "
             "<a href='index.html'>index.html</a>, every number also in <code>by_layer.json</code>.</p>"]
    for site, paths in figures.items():
        parts.append(f"<h2 id='site-{html.escape(site)}'>{html.escape(site)}</h2>")
        parts += [f"<figure><img alt='{html.escape(p.stem)}' src='{_image(p)}'><figcaption>"
                  f"<a href='figures/{html.escape(p.name)}'>{html.escape(p.name)}</a></figcaption></figure>"
                  for p in paths]
    parts += ["<h2 id='table'>Every SAE</h2>", _table(list(COLUMNS), rows, table_id="layer-table"),
              _index(rows, run_dir), "</body></html>"]
    page = out / "by_layer.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
