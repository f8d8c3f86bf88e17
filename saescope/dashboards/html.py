"""HTML for latent dashboards: self-contained pages (inline CSS/JS, no CDN) that open offline from disk.

Every string that comes from a corpus, a tokenizer or a user goes through :func:`esc` (``html.escape`` with
quotes), so a corpus line holding ``<script>`` shows as text. The page script only sorts table rows by the
numbers in their ``data-`` attributes; it never inserts text into the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Links:
    """Where pages live: static export (relative files) or the browse server (absolute routes)."""

    index: str
    latent: Callable[[int], str]
    home: str | None = None
    analyze: str | None = None


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th{cursor:pointer;background:#f4f4f4}td.l,th.l{text-align:left}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;margin:2px 0;
white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px}.focus{outline:1.5px solid #c00;font-weight:bold}
.act{display:inline-block;width:5em;color:#666;font-size:12px}
.bar{display:inline-block;background:#e07020;height:12px;vertical-align:middle}
.muted{color:#777}.pos{color:#06c}.neg{color:#c30}nav a{margin-right:1em}
"""

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th[data-key]').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],key=th.dataset.key;
    var desc=th.dataset.dir!=='desc';th.dataset.dir=desc?'desc':'asc';
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);
      return desc?y-x:x-y;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}<script>{SORT_SCRIPT}</script></body></html>")


def show_token(text: str) -> str:
    """Make whitespace tokens visible: newlines as ↵, tabs as →."""
    return text.replace("\n", "↵").replace("\t", "→")


def render_context(example: dict, scale: float) -> str:
    """One context: each token shaded by the latent's activation on it (relative to ``scale``)."""
    spans = []
    for j, (tok, act) in enumerate(zip(example["tokens"], example["acts"])):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
        cls = "tok focus" if j == example["focus"] else "tok"
        style = f"background:rgba(255,120,0,{alpha:.3f})" if alpha > 0 else ""
        spans.append(f"<span class='{cls}' style='{style}' title='{act:.4g}'>{esc(show_token(tok))}</span>")
    return (f"<div class='ctx'><span class='act'>{example['act']:.3g}</span>{''.join(spans)}</div>")


def render_histogram(hist: dict, width: int = 300) -> str:
    counts = hist["counts"]
    if not counts:
        return "<p class='muted'>never fired</p>"
    top = max(counts)
    rows = []
    for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], counts):
        w = 0 if top == 0 else max(1 if c else 0, round(width * c / top))
        rows.append(f"<tr><td>{lo:.3g}–{hi:.3g}</td><td class='l'><span class='bar' style='width:{w}px'>"
                    f"</span> {c}</td></tr>")
    return "<table class='hist'><tr><th class='l'>activation</th><th class='l'>count</th></tr>" \
        + "".join(rows) + "</table>"


def render_logits(logits: dict | None) -> str:
    if logits is None:
        return "<p class='muted'>no logit effect: this site is not a write to the residual stream</p>"
    def col(items: Sequence, cls: str) -> str:
        return "".join(f"<tr><td class='l'><code>{esc(show_token(t))}</code></td><td class='{cls}'>{v:+.3f}</td>"
                       "</tr>" for t, v in items)
    return ("<div style='display:flex;gap:3em'>"
            f"<table><tr><th class='l'>top tokens</th><th>effect</th></tr>{col(logits['top'], 'pos')}</table>"
            f"<table><tr><th class='l'>bottom tokens</th><th>effect</th></tr>{col(logits['bottom'], 'neg')}"
            "</table></div>")


def render_latent_page(latent: dict, meta: dict, links: Links) -> str:
    i = latent["index"]
    d_sae = meta["d_sae"]
    nav = [f"<a href='{esc(links.index)}'>all latents</a>"]
    if links.home:
        nav.insert(0, f"<a href='{esc(links.home)}'>all SAEs</a>")
    if i > 0:
        nav.append(f"<a id='prev' href='{esc(links.latent(i - 1))}'>← latent {i - 1}</a>")
    if i + 1 < d_sae:
        nav.append(f"<a id='next' href='{esc(links.latent(i + 1))}'>latent {i + 1} →</a>")
    scale = latent["max"] or 1.0
    top = "".join(render_context(ex, scale) for ex in latent["top"]) or "<p class='muted'>never fired</p>"
    quant = []
    for group in latent["quantiles"]:
        quant.append(f"<h3 class='muted'>{esc(group['label'])}</h3>"
                     + "".join(render_context(ex, scale) for ex in group["examples"]))
    body = (
        f"<nav>{''.join(nav)}</nav>"
        f"<h1>{esc(meta['title'])} · latent {i}</h1>"
        f"<p>firing frequency <b id='freq'>{latent['frequency']:.3g}</b> ({latent['count']} of "
        f"{meta['rows']} tokens) · max activation <b id='maxact'>{latent['max']:.4g}</b> · mean when firing "
        f"{latent['mean']:.4g}</p>"
        f"<h2>Top activating contexts</h2><div id='top'>{top}</div>"
        f"<h2>Contexts at activation quantiles (random firing sample)</h2><div id='quantiles'>"
        f"{''.join(quant) or '<p class=muted>none</p>'}</div>"
        f"<h2>Logit effect (decoder direction · final norm gain · unembedding)</h2>{render_logits(latent['logits'])}"
        f"<h2>Activation histogram (log-spaced bins)</h2>{render_histogram(latent['histogram'])}"
    )
    return page(f"{meta['title']} latent {i}", body)


def render_index_page(summary: dict, links: Links, *, extra: str = "") -> str:
    rows = []
    for row in summary["latents"]:
        i, freq, mx = row["index"], row["frequency"], row["max"]
        rows.append(f"<tr data-index='{i}' data-freq='{freq:.9g}' data-max='{mx:.9g}'>"
                    f"<td><a href='{esc(links.latent(i))}'>{i}</a></td><td>{freq:.4g}</td><td>{mx:.4g}</td>"
                    f"<td class='l'>{esc(show_token(row.get('preview', '')))}</td></tr>")
    home = f"<nav><a href='{esc(links.home)}'>all SAEs</a></nav>" if links.home else ""
    dead = sum(1 for row in summary["latents"] if row["count"] == 0)
    body = (
        f"{home}<h1>{esc(summary['title'])}</h1>"
        f"<p>{summary['d_sae']} latents · {summary['rows']} tokens from <code>{esc(summary['store'])}</code> · "
        f"{dead} never fired</p>{extra}"
        "<table class='sortable' id='latents'><thead><tr><th data-key='index'>latent</th>"
        "<th data-key='freq'>frequency</th><th data-key='max'>max activation</th>"
        "<th class='l'>top token</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return page(summary["title"], body)


def fmt_float(x: float) -> float:
    return 0.0 if not math.isfinite(x) else float(x)
