"""``saescope scope MODEL --out DIR``: SAEs on every layer and site of a model, trained together, evaluated side by
side, reported by layer and released as one suite (Gemma Scope's *scope*).

Stages (each the library's own; re-running the same command resumes each where it stopped):

1. check everything (layers, sites, widths, target L0s, text, disk) before any long work;
2. activations: ``--stream`` reads them straight from the model's forward passes through a bounded shuffle buffer
   (:mod:`saescope.stream`; the norm scale ``C`` of each site estimated from the first ``norm_sample_tokens``
   tokens and recorded in ``<out>/stream/norm_scales.json``), otherwise one store of every site is cached first
   (``saescope cache``; its size is checked against the free disk);
3. train every SAE on the same batches (one forward pass serves every site and layer), standardize, write the
   suite (:func:`saescope.train.train`);
4. evaluate on held-out documents (:func:`saescope.evaluate.evaluate_run`);
5. with ``--dashboards``, every SAE's latent dashboards into ``<sae folder>/dashboards``
   (:func:`saescope.dashboards.build_dashboards`) from ``dashboard_tokens`` rows of the training store, or with
   ``--stream`` from a small store of that many training-text tokens cached to ``<out>/dashboard_activations``;
   SAEs whose dashboards exist are skipped;
6. the by-layer report (:mod:`saescope.scope.report`, linking the dashboards) and the usual report page, and
   with ``--export`` the Gemma Scope 2 release layout under ``<out>/release`` (with each SAE's dashboards).

Times per stage, the shuffle buffer's and the SAEs' memory, and the peak resident memory go to
``<out>/scope_summary.json``.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from saescope.errors import SaescopeError
from saescope.scope.config import ScopeConfig, parse_layers

STATE_FILE = "scope_config.json"


def plan(cfg: ScopeConfig, n_layers: int) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """The SAE specs of the run, the release size name of each (by spec name) and the sites to read."""
    from saescope.train.config import SAESpec

    layers = parse_layers(cfg.layers, n_layers)
    specs, sizes, sites = [], {}, []
    for layer in layers:
        for target, size in cfg.targets(layer, n_layers):
            for width in cfg.widths:
                here = [{"site": f"{kind}/layer_{layer}", "width": width, "target_l0": target}
                        for kind in cfg.sites]
                if cfg.transcoders:
                    here.append({"site": f"mlp_in/layer_{layer}", "width": width, "target_l0": target,
                                 "kind": "transcoder"})
                for spec in here:
                    sizes[SAESpec(**spec).name] = size
                specs += here
        sites += [f"{kind}/layer_{layer}" for kind in cfg.sites]
        if cfg.transcoders:
            sites += [f"mlp_in/layer_{layer}", f"mlp_out/layer_{layer}"]
    return specs, sizes, list(dict.fromkeys(sites))


def sae_bytes(d_in: int, width: int, d_out: int | None = None, itemsize: int = 4) -> int:
    """Training memory of one SAE: its parameters four times over (themselves, Adam's two moments, gradients)."""
    d_out = d_in if d_out is None else d_out
    params = d_in * width + width * d_out + 2 * width + d_out
    return 4 * params * itemsize


def store_bytes(tokens: int, dims: dict[str, int], itemsize: int = 4) -> int:
    """Disk needed by a store of ``tokens`` rows of every site (activations + token id, document, position)."""
    return tokens * (sum(dims.values()) * itemsize + 4 + 8 + 8)


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


NO_STORE_ADVICE = "use --stream (no store on disk), fewer --tokens, layers or sites, or another --out"
DASHBOARD_STORE = "dashboard_activations"
DASHBOARDS = "dashboards"


def _check_disk(store: Path, needed: int, advice: str = NO_STORE_ADVICE) -> None:
    probe = store
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    have = _folder_bytes(store)
    if needed - have > free:
        raise SaescopeError(f"the activation store needs {human_bytes(needed)} ({needed - have:,} bytes more than "
                            f"written so far) but {probe} has {human_bytes(free)} free; {advice}")


def _check_resume(cfg: ScopeConfig) -> None:
    path = cfg.out / STATE_FILE
    # post-training stages (evaluation, dashboards, release) may be added or changed on an existing run
    mine = cfg.model_dump(mode="json", exclude={"out", "export", "eval_windows", "eval_domains", "prefetch",
                                                "dashboards", "dashboard_tokens"})
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise SaescopeError(f"{cfg.out} holds a scope run made with other settings (differs in: "
                                f"{', '.join(diff)}); use a new --out, or the same settings to resume")
    cfg.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2) + "\n")


def train_config(cfg: ScopeConfig, specs: list[dict[str, Any]], store: Path | None):
    from saescope.train import TrainConfig

    steps = cfg.tokens // cfg.batch_size
    data = {"saes": specs, "total_tokens": cfg.tokens, "batch_size": cfg.batch_size,
            "checkpoint_every": max(steps // 4, 1), "log_every": max(steps // 10, 1), "seed": cfg.seed,
            "out_dir": cfg.out, "model": cfg.model, "device": cfg.device, "dtype": "float32"}
    if store is not None:
        data["store"] = store
    return TrainConfig.from_dict(data, source="the scope's settings", preset=cfg.preset)


def run_scope(cfg: ScopeConfig, *, model=None, progress: bool = True, echo=print) -> dict[str, Any]:
    """Run every stage (see the module docstring); returns the summary written to ``<out>/scope_summary.json``.

    ``model``: an already loaded :class:`saescope.models.LoadedModel` to use instead of loading ``cfg.model``."""
    from saescope.models import load_model
    from saescope.sites import site_width

    times: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.preset is not None:
        from saescope.train.presets import PRESETS

        if cfg.preset not in PRESETS:
            raise SaescopeError(f"unknown --preset {cfg.preset!r}; known: {', '.join(sorted(PRESETS))} (or none)")
    from saescope.corpus import documents_from_spec

    for spec in [cfg.text, *(cfg.eval_domains or [])]:
        documents_from_spec(spec)                  # a bad text spec fails here, before the model loads
    n = 6 if cfg.dashboards else 5              # stages echoed
    t = time.perf_counter()
    echo(f"[1/{n}] loading {cfg.model}")
    lm = model if model is not None else load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    times["load"] = time.perf_counter() - t
    specs, sizes, sites = plan(cfg, lm.n_layers)
    from saescope.config import Site

    dims = {s: site_width(lm.model, Site.parse(s)) for s in sites}
    _check_resume(cfg)
    tcfg = train_config(cfg, specs, None if cfg.stream else cfg.out / "activations")
    memory = {"saes_bytes": sum(sae_bytes(dims[s["site"]], s["width"],
                                          dims[s["site"].replace("mlp_in", "mlp_out")] if s.get("kind") else None)
                                for s in specs)}
    layers = sorted({Site.parse(s).layer for s in sites})
    echo(f"      {len(specs)} SAE(s) at {len(sites)} site(s) on layers {layers[0]}-{layers[-1]} "
         f"({len(layers)} layers), {cfg.tokens:,} tokens, {tcfg.total_steps} steps of {cfg.batch_size}; "
         f"SAE training memory ≈ {memory['saes_bytes'] / 2**20:,.1f} MiB")

    chunks = None
    if cfg.stream:
        from saescope.stream import ModelChunks, StreamingSource

        chunks = ModelChunks(lm, cfg.text, sites, context_len=cfg.context_len, windows_per_pass=cfg.windows_per_pass,
                             held_out_fraction=cfg.held_out_fraction, prefetch=cfg.prefetch)
        source = StreamingSource(chunks, cfg.batch_size, buffer_rows=cfg.buffer_rows, seed=cfg.seed,
                                 max_rows=cfg.tokens, norm_sample_rows=min(cfg.norm_sample_tokens, cfg.tokens),
                                 log=echo)
        memory["shuffle_buffer_bytes"] = source.expected_buffer_bytes()
        scales_path = cfg.out / "stream" / "norm_scales.json"
        t = time.perf_counter()
        if scales_path.is_file():
            scales = {k: float(v) for k, v in json.loads(scales_path.read_text())["norm_scales"].items()}
        else:
            echo(f"[2/{n}] estimating the norm scale C of {len(sites)} site(s) from the first "
                 f"{source.norm_sample_rows:,} tokens (App. A)")
            scales = source.norm_scales()
            scales_path.parent.mkdir(parents=True, exist_ok=True)
            scales_path.write_text(json.dumps({"norm_scales": scales, "rows": source.norm_sample_rows,
                                               "text": cfg.text}, indent=2) + "\n")
        times["norm_scale"] = time.perf_counter() - t
        echo(f"[3/{n}] training from the model's forward passes (no store on disk); shuffle buffer "
             f"{source.block_rows:,} rows = {memory['shuffle_buffer_bytes'] / 2**20:,.1f} MiB")
        t = time.perf_counter()
        from saescope.train import train

        try:
            folders = train(tcfg, source, scales, progress=progress)
        finally:
            source.close()
        times["train"] = time.perf_counter() - t
        times["train_forward"] = chunks.forward_seconds
    else:
        from saescope.store import cache_activations
        from saescope.train import train_from_store

        store = cfg.out / "activations"
        needed = store_bytes(cfg.tokens, dims)
        memory["store_bytes"] = needed
        _check_disk(store, needed)
        echo(f"[2/{n}] caching {cfg.tokens:,} tokens of {len(sites)} site(s) → {store} ({human_bytes(needed)})")
        t = time.perf_counter()
        cache_activations(lm, cfg.text, sites, store, context_len=cfg.context_len, batch_size=cfg.windows_per_pass,
                          max_tokens=cfg.tokens, held_out_fraction=cfg.held_out_fraction, progress=progress)
        times["cache"] = time.perf_counter() - t
        echo(f"[3/{n}] training from the store")
        t = time.perf_counter()
        folders = train_from_store(tcfg, progress=progress)
        times["train"] = time.perf_counter() - t

    echo(f"[4/{n}] evaluating {len(folders)} SAE(s) on held-out {', '.join(cfg.eval_domains or [cfg.text])} "
         f"({cfg.eval_windows} window(s) of {cfg.context_len} tokens each)")
    from saescope.report.html import write_report

    t = time.perf_counter()
    table_path = _evaluate(cfg, lm, progress)
    times["evaluate"] = time.perf_counter() - t

    dashboards = None
    if cfg.dashboards:
        t = time.perf_counter()
        read = {s["site"]: dims[s["site"]] for s in specs}      # the sites the SAEs read (not a target)
        dashboards = build_scope_dashboards(cfg, lm, folders, read, memory, progress=progress,
                                            echo=lambda line: echo(f"[5/{n}] {line}"))
        times["dashboards"] = time.perf_counter() - t

    echo(f"[{n}/{n}] report" + (" and release" if cfg.export else ""))
    from saescope.scope.report import write_layer_report

    t = time.perf_counter()
    page = write_report(cfg.out)
    layer_page = write_layer_report(cfg.out)
    times["report"] = time.perf_counter() - t
    release = None
    if cfg.export:
        t = time.perf_counter()
        release = export_release(cfg, folders, sizes)
        times["export"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {"saes": len(folders), "sites": sites, "stream": cfg.stream, "tokens": cfg.tokens,
               "seconds": {k: round(v, 2) for k, v in times.items()}, "memory": {**memory, "peak_rss_bytes": peak},
               "table": str(table_path), "report": str(page), "by_layer": str(layer_page),
               "release": None if release is None else str(release), "dashboards": dashboards,
               "activation_shards": len(list((cfg.out / "activations").rglob("shard_*.safetensors")))}
    (cfg.out / "scope_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_scope_dashboards(cfg: ScopeConfig, lm, folders: dict[str, Path], sites: dict[str, int],
                           memory: dict[str, int], *, progress: bool = True, echo=print) -> dict[str, Any]:
    """Latent dashboards of every SAE in ``folders`` into ``<folder>/dashboards`` (skipping those already built).
    ``sites``: the width of every site the SAEs read.

    Cached mode reads the first ``dashboard_tokens`` rows of the training store; ``--stream`` first caches
    ``dashboard_tokens`` tokens of the training text (training documents only, the same windows as the stream's
    first ones) for the sites the SAEs read into ``<out>/dashboard_activations`` (resumable, like any store).
    Returns ``{"built", "skipped", "store", "rows"}``."""
    from saescope.dashboards import DashboardSettings, build_dashboards
    from saescope.dashboards.compute import sae_site_id
    from saescope.formats import load_sae

    todo = [name for name in folders if not _has_dashboards(Path(folders[name]))]
    store = cfg.out / "activations"
    if cfg.stream:
        store = cfg.out / DASHBOARD_STORE
        needed = store_bytes(cfg.dashboard_tokens, sites)
        memory["dashboard_store_bytes"] = needed
        if todo:
            from saescope.store import cache_activations

            _check_disk(store, needed, advice="lower --dashboard-tokens, or another --out")
            echo(f"caching {cfg.dashboard_tokens:,} tokens of {len(sites)} site(s) for the dashboards → {store} "
                 f"({human_bytes(needed)})")
            cache_activations(lm, cfg.text, list(sites), store, context_len=cfg.context_len,
                              batch_size=cfg.windows_per_pass, max_tokens=cfg.dashboard_tokens,
                              held_out_fraction=cfg.held_out_fraction, progress=progress)
    echo(f"latent dashboards of {len(todo)} SAE(s) from {store}"
         + (f" ({len(folders) - len(todo)} already built)" if len(todo) < len(folders) else ""))
    settings = DashboardSettings(max_rows=cfg.dashboard_tokens, seed=cfg.seed)
    for name in todo:
        sae = load_sae(folders[name], device=cfg.device)       # one at a time: a whole suite may not fit
        build_dashboards(sae, store, lm.tokenizer, lm, out=Path(folders[name]) / DASHBOARDS, site=sae_site_id(sae),
                         settings=settings, progress=progress)
        del sae
    rows = sorted({json.loads((Path(f) / DASHBOARDS / "summary.json").read_text())["rows"] for f in folders.values()})
    return {"built": len(todo), "skipped": len(folders) - len(todo), "store": str(store), "rows": rows}


def _has_dashboards(folder: Path) -> bool:
    """Built dashboards: ``index.html`` is written last, after ``latents.jsonl`` and ``summary.json``."""
    out = folder / DASHBOARDS
    return all((out / name).is_file() for name in ("summary.json", "latents.jsonl", "index.html"))


def export_release(cfg: ScopeConfig, folders: dict[str, Path], sizes: dict[str, str]) -> Path:
    """Write the suite in Gemma Scope 2's whole-model layout ``<site>_all/layer_<L>_width_<W>_l0_<size>/``
    (transcoders under ``transcoder_all/``) into ``<out>/release``; the sizes are those of
    :meth:`ScopeConfig.targets` (the ladder's names, or the targets' rank). Re-running replaces it."""
    from saescope.suite import export_suite

    out = cfg.out / "release"
    if out.exists():
        shutil.rmtree(out)
    names = {Path(folder): sizes[name] for name, folder in folders.items() if name in sizes}
    export_suite(cfg.out / "suite", out, layout="gemma-scope-2", site_suffix="_all", sizes=names,
                 dashboards=True)
    return out


def _evaluate(cfg: ScopeConfig, lm, progress: bool) -> Path:
    from saescope.evaluate.run import EvalConfig, evaluate_run

    eval_cfg = EvalConfig(domains=cfg.eval_domains or [cfg.text], context_len=cfg.context_len,
                          windows_per_domain=cfg.eval_windows, model=cfg.model,
                          held_out_fraction=cfg.held_out_fraction, device=cfg.device, dtype=cfg.dtype)
    return evaluate_run(cfg.out, eval_cfg, model=lm, progress=progress)
