"""``saescope report RUN_DIR``: one self-contained HTML page of a run's evaluation.

Reads ``RUN_DIR/eval/table.json`` (written by ``saescope evaluate``), draws the figures
(:mod:`saescope.report.figures`) into ``RUN_DIR/report/figures/*.png``, copies every number to
``RUN_DIR/report/metrics.json`` and writes ``RUN_DIR/report/index.html``. The page embeds the figures as
base64 ``data:`` URIs and uses no script or remote resource, so it works offline, opened straight from disk.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saescope.errors import SaescopeError

FIGURE_TITLES = {
    "frontier_fvu": ("Sparsity–fidelity frontier: FVU vs L0",
                     ("Fraction of variance unexplained Σ‖x − x̂‖² / Σ‖x − x̄‖² on held-out tokens; one curve per "
                     "site and width (Gemma Scope §4.1, App. C.1).")),
    "frontier_delta_loss": ("Sparsity–fidelity frontier: Δ LM loss vs L0",
                            ("Mean next-token cross-entropy with the reconstruction spliced in (BOS, EOS and "
                            "padding left clean and not counted) minus the clean model's (§4.1).")),
    "delta_loss_by_position": ("Δ loss by sequence position", "App. C.2 (Fig. 15 of the paper)."),
    "density": ("Latent firing frequencies",
                ("Histogram of log10(fraction of held-out tokens on which each latent fires); dead latents never "
                "fire and are left out of the histogram; the dashed line marks 10% (dense).")),
    "domains": ("Δ loss per text domain", "Held-out text of each domain (the paper breaks Δ loss down by Pile subset)."),
    "uniformity": ("Uniformity of active latent importance",
                   ("r_L0 = exp(S(p)) / ‖y‖₀ with p ∝ |y|, y = f ⊙ W_dec ∇ₓ𝓛 and 𝓛 the mean-centred logit of the "
                   "correct next token (App. C.3, eq. 13). 1 when every active latent matters equally.")),
}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], *, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            '</table></div>')


def _domain_rows(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    columns = ["sae", "domain", "tokens", "l0", "fvu", "fvu_rest", "cosine", "clean_loss", "spliced_loss",
               "delta_loss", "delta_loss_lower", "delta_loss_upper", "loss_recovered"]
    rows = []
    for r in results:
        for dom, m in sorted(r.get("domains", {}).items()):
            ci = m.get("delta_loss_ci") or {}
            rows.append({"sae": r["name"], "domain": dom, "tokens": m.get("n_tokens"),
                         **{c: m.get(c) for c in columns[3:]},
                         "delta_loss_lower": ci.get("lower"), "delta_loss_upper": ci.get("upper")})
    return columns, rows


def _uniformity_rows(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    columns = ["sae", "l0", "l0_attributed", "effective_active_latents", "r_l0", "uniformity_tokens"]
    return columns, [{"sae": r["name"], **{c: r["metrics"].get(c) for c in columns[1:]}} for r in results]


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:48%}
figure.wide{max-width:98%} figure img{max-width:100%} figcaption{font-size:12px;color:#555}
div.scroll{overflow-x:auto}
pre{background:#f7f7f7;padding:0.8em;font-size:11px;overflow:auto;max-height:30em}
"""


def render_html(table: Mapping[str, Any], figures: Mapping[str, Path], *, title: str) -> str:
    """The report page as a string (figures inlined)."""
    results = table.get("results", [])
    columns = list(table.get("columns") or [])
    main_columns = [c for c in columns if "[" not in c]
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(results)} SAE(s) evaluated on held-out text"
             + (f" with {html.escape(str(table.get('model')))}" if table.get("model") else "")
             + (f" in {table['seconds']:.0f} s" if isinstance(table.get("seconds"), (int, float)) else "")
             + ". Every number is also in <code>metrics.json</code> beside this page.</p>",
             "<h2 id='summary'>Summary</h2>", _table(main_columns, table.get("rows", []), table_id="summary-table")]
    parts.append("<h2 id='figures'>Figures</h2>")
    for key, path in figures.items():
        head, caption = FIGURE_TITLES.get(key, (key, ""))
        wide = " class='wide'" if key in ("density", "domains") else ""
        parts.append(f"<figure id='fig-{key}'{wide}><img alt='{html.escape(head)}' src='{_image(path)}'>"
                     f"<figcaption><b>{html.escape(head)}.</b> {html.escape(caption)} "
                     f"(<a href='figures/{html.escape(path.name)}'>PNG</a>)</figcaption></figure>")
    cols, rows = _uniformity_rows(results)
    parts += ["<h2 id='uniformity'>Uniformity of active latent importance (App. C.3)</h2>",
              ("<p>Mean over held-out tokens of r_L0 = exp(S(p))/‖y‖₀ (1/‖y‖₀ ≤ r_L0 ≤ 1) and of the effective "
              "number of active latents exp(S(p)), next to L0 (the paper's Fig. 14 in v2, D.5).</p>"),
              _table(cols, rows, table_id="uniformity-table")]
    cols, rows = _domain_rows(results)
    parts += ["<h2 id='domains'>Per text domain</h2>",
              "<p>As the paper's breakdown by Pile subset: the same metrics on each held-out domain.</p>",
              _table(cols, rows, table_id="domain-table")]
    config = {k: table.get(k) for k in ("eval_config", "run_config") if table.get(k)}
    parts += ["<h2 id='config'>Configuration</h2>",
              f"<pre id='config-json'>{html.escape(json.dumps(config, indent=2, default=str))}</pre>"]
    training = [{"sae": r["name"], **r.get("training", {})} for r in results if r.get("training")]
    if training:
        keys = ["sae"] + sorted({k for t in training for k in t if k != "sae"
                                 and isinstance(t[k], (int, float, str))})
        parts += ["<h3>Training summaries</h3>", _table(keys, training, table_id="training-table")]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write ``RUN_DIR/report/index.html`` (+ ``figures/*.png``, ``metrics.json``); returns the page's path."""
    from saescope.report.figures import write_figures

    run_dir = Path(run_dir)
    source = run_dir / "eval" / "table.json"
    if not source.is_file():
        raise SaescopeError(f"{source} does not exist: run `saescope evaluate {run_dir}` first")
    try:
        table = json.loads(source.read_text())
    except json.JSONDecodeError as exc:
        raise SaescopeError(f"{source} is not valid JSON ({exc}); re-run saescope evaluate") from exc
    if not table.get("results"):
        raise SaescopeError(f"{source} holds no results; re-run saescope evaluate")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(table["results"], out / "figures")
    shutil.copyfile(source, out / "metrics.json")
    page = out / "index.html"
    page.write_text(render_html(table, figures, title=title or f"saescope report: {run_dir.resolve().name}"),
                    encoding="utf-8")
    return page
