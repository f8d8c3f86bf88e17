"""A local, offline web server to browse a run's SAEs: pick a site/SAE, open a latent's dashboard, and type a
text to see which latents fire on each token (then jump to their dashboards).

Standard library only (``http.server``); binds ``127.0.0.1`` unless another host is asked for. Pages are
rendered by :mod:`saescope.dashboards.html`, which escapes every corpus, tokenizer and user string. Routes::

    /                          the SAEs found under RUN_DIR (site, width, L0, dashboards built or not)
    /sae/<n>/                  latent index of SAE n (sortable) + the text box
    /sae/<n>/latent/<i>        latent i's dashboard
    /sae/<n>/analyze?text=...  the latents firing on each token of the text
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch

from saescope.dashboards.build import load_latent, load_summary
from saescope.dashboards.compute import sae_site_id
from saescope.dashboards.html import Links, esc, page, render_index_page, render_latent_page, show_token
from saescope.errors import SaescopeError

DASHBOARDS_FOLDER = "dashboards"
MAX_TEXT_CHARS = 4000


@dataclass
class SAEEntry:
    number: int
    folder: Path
    label: str
    sae: Any = None
    summary: dict | None = None

    @property
    def dashboards(self) -> Path:
        return self.folder / DASHBOARDS_FOLDER


def find_saes(run_dir: str | Path) -> list[SAEEntry]:
    """Every SAE below ``run_dir`` (its ``suite/`` first), numbered in order (:func:`saescope.suite.sae_folders`)."""
    from saescope.suite import sae_folders

    root = Path(run_dir)
    base = root / "suite" if (root / "suite").is_dir() else root
    folders = sae_folders(root)
    return [SAEEntry(n, f, f.relative_to(base).as_posix() if f != base else f.name) for n, f in enumerate(folders)]


@dataclass
class BrowseApp:
    """The state behind the server: SAEs (loaded lazily), dashboards, and LMs (loaded on first analysis)."""

    run_dir: Path
    model: str | None = None  # overrides each SAE's config.model
    device: str = "cpu"
    saes: list[SAEEntry] = field(default_factory=list)
    _models: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.saes = find_saes(self.run_dir)

    # -- lazy loading ------------------------------------------------------------------------------------
    def entry(self, n: int) -> SAEEntry:
        if not 0 <= n < len(self.saes):
            raise LookupError(f"no SAE {n}")
        return self.saes[n]

    def load_sae(self, entry: SAEEntry):
        with self._lock:
            if entry.sae is None:
                from saescope.formats import load_sae

                entry.sae = load_sae(entry.folder, device=self.device)
            return entry.sae

    def summary(self, entry: SAEEntry) -> dict | None:
        if entry.summary is None and (entry.dashboards / "summary.json").is_file():
            entry.summary = load_summary(entry.dashboards)
        return entry.summary

    def language_model(self, sae) -> Any:
        name = self.model or sae.config.model
        if not name:
            raise SaescopeError("the SAE's config names no model; start `saescope browse` with --model")
        with self._lock:
            if name not in self._models:
                from saescope.models import load_model

                self._models[name] = load_model(name, device=self.device)
            return self._models[name]

    # -- pages -------------------------------------------------------------------------------------------
    def links(self, n: int) -> Links:
        return Links(index=f"/sae/{n}/", latent=lambda i: f"/sae/{n}/latent/{i}", home="/",
                     analyze=f"/sae/{n}/analyze")

    def home_page(self) -> str:
        """Every SAE, grouped by site and then layer (numerically: layer 2 before layer 10)."""
        groups: dict[tuple[str, int], list[SAEEntry]] = {}
        for e in self.saes:
            match = re.match(r"^([^/]+)/layer_(\d+)(/|$)", e.label)
            key = (match.group(1), int(match.group(2))) if match else ("other", -1)
            groups.setdefault(key, []).append(e)
        rows = []
        for (site, layer), entries in sorted(groups.items()):
            title = f"{site} · layer {layer}" if layer >= 0 else site
            rows.append(f"<tr class='group' id='{esc(site)}-{layer}'><th class='l' colspan='2'>{esc(title)}</th></tr>")
            for e in entries:
                built = (e.dashboards / "summary.json").is_file()
                rows.append(f"<tr><td class='l'><a class='sae' href='/sae/{e.number}/'>{esc(e.label)}</a></td>"
                            f"<td class='l'>{'yes' if built else 'no'}</td></tr>")
        body = (f"<h1>saescope · {esc(self.run_dir.name)}</h1>"
                "<table id='saes'><tr><th class='l'>SAE (site / width / L0)</th><th class='l'>dashboards</th></tr>"
                f"{''.join(rows)}</table>")
        return page(f"saescope {self.run_dir.name}", body)

    def text_form(self, n: int, text: str = "") -> str:
        return (f"<form action='/sae/{n}/analyze' method='get'><p>Text: <input id='text' name='text' size='70' "
                f"value='{esc(text)}'> <button id='go' type='submit'>show latents</button></p></form>")

    def sae_page(self, n: int) -> str:
        entry = self.entry(n)
        summary = self.summary(entry)
        form = self.text_form(n)
        if summary is None:
            body = (f"<nav><a href='/'>all SAEs</a></nav><h1>{esc(entry.label)}</h1>{form}"
                    f"<p class='muted'>No dashboards yet: run <code>saescope dashboards {esc(entry.folder)}</code>"
                    "</p>")
            return page(entry.label, body)
        return render_index_page(summary, self.links(n), extra=form)

    def latent_page(self, n: int, i: int) -> str:
        entry = self.entry(n)
        summary = self.summary(entry)
        if summary is None:
            raise LookupError(f"no dashboards for {entry.label}; run `saescope dashboards {entry.folder}`")
        record = load_latent(entry.dashboards, summary, i)
        meta = {"title": summary["title"], "d_sae": summary["d_sae"], "rows": summary["rows"]}
        return render_latent_page(record, meta, self.links(n))

    def analyze(self, n: int, text: str, top: int = 5) -> dict:
        """Per token of ``text``: its string and the ``top`` strongest latents ``[(i, act)]`` at the SAE's site."""
        from saescope.sites import forward_lock, read_sites

        entry = self.entry(n)
        sae = self.load_sae(entry)
        lm = self.language_model(sae)
        site = sae_site_id(sae)
        if site is None:
            raise SaescopeError("the SAE's config names no site")
        tokenizer = lm.tokenizer
        ids = tokenizer(text[:MAX_TEXT_CHARS], return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            return {"tokens": [], "site": site}
        with forward_lock(lm):  # the server's threads share the model: one forward pass at a time
            x = read_sites(lm, ids, [site])[site][0]
        with torch.no_grad():
            f = sae.encode(x.to(sae.device)).float().cpu()
        from saescope.dashboards.build import TokenText

        text_of = TokenText(tokenizer)
        # rank by activation relative to the latent's max over the store when dashboards exist, so that
        # specific latents are not drowned by always-on ones
        summary = self.summary(entry)
        score = f
        if summary is not None and len(summary["latents"]) == f.shape[1]:
            peak = torch.tensor([row["max"] for row in summary["latents"]], dtype=torch.float32)
            score = f / torch.where(peak > 0, peak, torch.full_like(peak, float("inf")))
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        tokens = []
        for t in range(ids.shape[1]):
            if int(ids[0, t]) in special:  # BOS & co. are never stored or trained on (Gemma Scope §3)
                tokens.append({"token": text_of(int(ids[0, t])), "latents": [], "special": True})
                continue
            k = min(top, f.shape[1])
            _, idx = score[t].topk(k)
            fired = [(int(i), float(f[t, i])) for i in idx if f[t, i] > 0]
            tokens.append({"token": text_of(int(ids[0, t])), "latents": fired})
        return {"tokens": tokens, "site": site}

    def analyze_page(self, n: int, text: str) -> str:
        entry = self.entry(n)
        result = self.analyze(n, text)
        links = self.links(n)
        rows = []
        for t, tok in enumerate(result["tokens"]):
            cells = " ".join(f"<a class='latent' href='{esc(links.latent(i))}'>#{i}</a> {v:.3g}"
                             for i, v in tok["latents"]) or "<span class='muted'>none</span>"
            if tok.get("special"):
                cells = "<span class='muted'>special token (not encoded)</span>"
            rows.append(f"<tr><td>{t}</td><td class='l'><code class='token'>{esc(show_token(tok['token']))}</code>"
                        f"</td><td class='l'>{cells}</td></tr>")
        body = (f"<nav><a href='/'>all SAEs</a><a href='{esc(links.index)}'>latents of this SAE</a></nav>"
                f"<h1>{esc(entry.label)} · latents per token</h1>{self.text_form(n, text)}"
                f"<p>You typed: <span id='typed'>{esc(text)}</span></p>"
                "<table id='tokens'><tr><th>#</th><th class='l'>token</th><th class='l'>latents at "
                f"{esc(result['site'])} (highest activation relative to the latent's max, when its dashboards "
                f"exist)</th></tr>{''.join(rows)}</table>")
        return page(f"{entry.label} analysis", body)


_ROUTES = [
    (re.compile(r"^/$"), "home"),
    (re.compile(r"^/sae/(\d+)/?$"), "sae"),
    (re.compile(r"^/sae/(\d+)/latent/(\d+)$"), "latent"),
    (re.compile(r"^/sae/(\d+)/analyze$"), "analyze"),
]


def _handler(app: BrowseApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "saescope-browse"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, body: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                        "script-src 'unsafe-inline'; form-action 'self'")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            for pattern, name in _ROUTES:
                match = pattern.match(url.path)
                if not match:
                    continue
                args = [int(g) for g in match.groups()]
                try:
                    if name == "home":
                        body = app.home_page()
                    elif name == "sae":
                        body = app.sae_page(*args)
                    elif name == "latent":
                        body = app.latent_page(*args)
                    else:
                        text = parse_qs(url.query).get("text", [""])[0]
                        body = app.analyze_page(args[0], text)
                except (LookupError, SaescopeError) as exc:
                    self._send(HTTPStatus.NOT_FOUND if isinstance(exc, LookupError) else HTTPStatus.BAD_REQUEST,
                               page("saescope: error", f"<nav><a href='/'>all SAEs</a></nav><p class='error'>"
                                                       f"{esc(exc)}</p>"))
                    return
                self._send(HTTPStatus.OK, body)
                return
            self._send(HTTPStatus.NOT_FOUND, page("not found", "<p>not found · <a href='/'>home</a></p>"))

    return Handler


def make_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model: str | None = None,
                device: str = "cpu") -> ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server; ``port=0`` picks a free port (``server.server_address``)."""
    app = BrowseApp(Path(run_dir), model=model, device=device)
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    return server


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model: str | None = None,
          device: str = "cpu") -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(run_dir, host=host, port=port, model=model, device=device)
    h, p = server.server_address[:2]
    print(f"saescope browse: http://{h}:{p}/  ({len(server.app.saes)} SAEs; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
