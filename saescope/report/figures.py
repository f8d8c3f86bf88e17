"""Figures of the evaluation report (matplotlib, Agg backend: no display needed).

- sparsity–fidelity frontiers: FVU vs L0 and Δ LM loss vs L0, one curve per site and width
  (Gemma Scope Figs. 2, 11–16 of arXiv 2408.05147v2; Figs. 13, 14, 17, 18 of the appendix numbering);
- Δ loss by sequence position (App. C.2);
- latent firing-frequency histograms on a log scale with dead / dense counts (§4.2, Fig. 4);
- uniformity of active latent importance r_L0 vs L0 (App. C.3 / D.5).

Every function takes the per-SAE result dicts of :func:`saescope.evaluate.evaluate_saes` and writes one PNG.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def group_key(result: Mapping[str, Any]) -> str:
    """Curves are drawn per site and width (and kind), as in the paper's frontier plots; TopK / BatchTopK
    baselines, SAEs trained with the frequency penalty and those with the batch-mean target L0 get curves of their
    own."""
    prefix = "transcoder " if result.get("kind") == "transcoder" else ""
    training = result.get("training") or {}
    baseline = {"topk": "TopK ", "batchtopk": "BatchTopK "}.get(training.get("architecture"), "")
    label = f"{baseline}{prefix}{result['site']} · width {result['d_sae']}"
    if training.get("frequency_penalty"):
        label += f" · frequency penalty {training['frequency_penalty']:g}"
    if training.get("target_l0_over") == "batch":
        label += " · target on the batch mean L0"
    return label


def _groups(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    return {k: sorted(v, key=lambda r: r["metrics"].get("l0") or 0.0) for k, v in sorted(groups.items())}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier_lines(results: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The lines of a frontier: per site/width group, ``x`` (L0), ``y`` (``metric``) and ``yerr`` — the
    distances down and up to the bootstrap interval ``metrics.<metric>_ci`` (Δ loss) where every point of
    the line has one, else None."""
    lines = []
    for label, rows in _groups(results).items():
        pts = [(r["metrics"]["l0"], r["metrics"].get(metric), r["metrics"].get(f"{metric}_ci")) for r in rows]
        pts = [(x, y, ci) for x, y, ci in pts if x is not None and y is not None]
        if not pts:
            continue
        xs, ys, cis = zip(*pts)
        yerr = None
        if all(isinstance(ci, Mapping) and ci.get("lower") is not None and ci.get("upper") is not None
               for ci in cis):
            # a percentile interval need not contain the point estimate (few windows, rounding): clip at 0
            yerr = [[max(y - ci["lower"], 0.0) for y, ci in zip(ys, cis)],
                    [max(ci["upper"] - y, 0.0) for y, ci in zip(ys, cis)]]
            label = f"{label} ({cis[0].get('confidence', 0.95):.0%} interval)"
        lines.append({"label": label, "x": list(xs), "y": list(ys), "yerr": yerr})
    return lines


def frontier(results: Sequence[Mapping[str, Any]], metric: str, path: Path, *, ylabel: str,
             title: str, log_y: bool = False) -> Path:
    """``metric`` against L0, one line with markers per site/width group; Δ loss with its bootstrap interval
    over windows as error bars (:func:`frontier_lines`)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for line in frontier_lines(results, metric):
        if line["yerr"] is not None:
            ax.errorbar(line["x"], line["y"], yerr=line["yerr"], marker="o", capsize=3, label=line["label"])
        else:
            ax.plot(line["x"], line["y"], marker="o", label=line["label"])
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def delta_loss_by_position(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Δ loss per group of sequence positions, one line per SAE (App. C.2, Fig. 15)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in results:
        by = r["metrics"].get("delta_loss_by_position") or {}
        if by.get("start"):
            mids = [(s + e) / 2 for s, e in zip(by["start"], by["end"])]
            ax.plot(mids, by["delta_loss"], marker=".", label=f"{r['name']} (L0 {r['metrics']['l0']:.0f})")
    ax.set_xlabel("sequence position (token t predicts t+1)")
    ax.set_ylabel("Δ LM loss (nats)")
    ax.set_title("Δ loss by sequence position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


def density_histograms(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """log10 firing-frequency histograms, one panel per SAE, dead / dense counts in the titles (Fig. 4)."""
    n = max(1, len(results))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        m = r["metrics"]
        hist = m["log10_frequency_histogram"]
        edges, counts = hist["edges"], hist["counts"]
        ax.stairs(counts, edges, fill=True, alpha=0.7)
        ax.axvline(-1.0, color="red", lw=0.8, ls="--")  # dense: more than 10% of tokens
        ax.set_title(f"{r['name']}\ndead {m['dead']} · dense {m['dense']} of {m['d_sae']}", fontsize=7)
        ax.set_xlabel("log10 firing frequency", fontsize=7)
        ax.set_ylabel("latents", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    return _save(fig, path)


def domain_bars(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Δ loss per text domain, grouped bars per SAE (as the paper's Δ loss per Pile subset)."""
    domains = sorted({d for r in results for d in r.get("domains", {})})
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(results) * max(1, len(domains))), 4.4))
    width = 0.8 / max(1, len(domains))
    for j, dom in enumerate(domains):
        xs = [i + (j - (len(domains) - 1) / 2) * width for i in range(len(results))]
        ys = [(r.get("domains", {}).get(dom) or {}).get("delta_loss") or 0.0 for r in results]
        ax.bar(xs, ys, width=width, label=dom)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([f"{r['name']}\n(L0 {r['metrics']['l0']:.0f})" for r in results], fontsize=6,
                       rotation=20, ha="right")
    ax.set_ylabel("Δ LM loss (nats)")
    ax.set_title("Δ loss per text domain")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_figures(results: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, Path]:
    """Every figure of the report, as PNG files in ``folder``; returns ``{figure id: path}``."""
    folder = Path(folder)
    return {
        "frontier_fvu": frontier(results, "fvu", folder / "frontier_fvu.png", ylabel="FVU",
                                 title="Sparsity–fidelity: FVU vs L0"),
        "frontier_delta_loss": frontier(results, "delta_loss", folder / "frontier_delta_loss.png",
                                        ylabel="Δ LM loss (nats)", title="Sparsity–fidelity: Δ LM loss vs L0"),
        "delta_loss_by_position": delta_loss_by_position(results, folder / "delta_loss_by_position.png"),
        "density": density_histograms(results, folder / "density.png"),
        "domains": domain_bars(results, folder / "domains.png"),
        "uniformity": frontier(results, "r_l0", folder / "uniformity.png", ylabel="r_L0 = exp(S(p)) / ‖y‖₀",
                               title="Uniformity of active latent importance (App. C.3)"),
    }
