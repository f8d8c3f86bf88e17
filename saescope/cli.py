"""The ``saescope`` command: one subcommand per stage of the pipeline (see ``shared/DESIGN.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from saescope.errors import SaescopeError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Train, standardize, evaluate and browse JumpReLU SAEs (the Gemma Scope recipe).")


def fail(message: str) -> None:
    """Print a clear error and exit with status 2 (bad input), before any long work starts."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def info(path: Path = typer.Argument(..., help="folder holding an SAE in any supported format")) -> None:
    """Print an SAE's format, shapes and config."""
    from saescope.formats import detect_format, load_sae

    try:
        fmt, folder = detect_format(path)
        sae = load_sae(folder)
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo(f"format: {fmt}\nfolder: {folder}")
    typer.echo(json.dumps(sae.config.model_dump(mode="json"), indent=2))


@app.command()
def convert(
    source: Path = typer.Argument(..., help="folder holding an SAE in any supported format"),
    destination: Path = typer.Argument(..., help="folder to write"),
    to: str = typer.Option("native", "--to", help="native, gemma-scope, gemma-scope-2 or saelens"),
    standardize: bool = typer.Option(False, help="standardize (Appendix A) before writing"),
) -> None:
    """Convert an SAE between formats (Gemma Scope and Gemma Scope 2 files are always standardized)."""
    from saescope.formats import FORMATS, load_sae

    if to not in FORMATS:
        fail(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    try:
        sae = load_sae(source)
    except SaescopeError as exc:
        fail(str(exc))
    if standardize:
        sae = sae.standardize()
    try:
        out = sae.save(destination, format=to)
    except SaescopeError as exc:     # e.g. a skip transcoder to gemma-scope (params.npz has no W_skip)
        fail(str(exc))
    typer.echo(f"wrote {to} SAE to {out}")


@app.command()
def export(
    suite: Path = typer.Argument(..., help="a suite folder (e.g. runs/demo/suite) or any folder of SAEs"),
    out: Path = typer.Argument(..., help="an empty folder to write the release layout into"),
    layout: str = typer.Option("gemma-scope-2", help="gemma-scope (params.npz) or gemma-scope-2"),
) -> None:
    """Write a suite in a Gemma Scope release layout (standardized parameters)."""
    from saescope.suite import export_suite

    try:
        written = export_suite(suite, out, layout=layout)
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo(f"wrote {len(written)} SAEs in the {layout} layout under {out}")


@app.command()
def sites(
    model: str = typer.Argument(..., help="embedded name (gemma-3-270m, smollm2-135m), folder, .gguf or hub id"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or float64"),
) -> None:
    """Print every site of a model (resid_post, attn_out, mlp_out, mlp_in per layer) with its width."""
    from saescope.models import load_model
    from saescope.sites import hook_point, list_sites

    try:
        loaded = load_model(model, dtype=dtype)
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo(f"model: {loaded.name}  architecture: {loaded.architecture}  layers: {loaded.n_layers}  "
               f"d_model: {loaded.d_model}")
    typer.echo(f"{'site':<22} {'width':>6}  hook point")
    for site, width in list_sites(loaded):
        typer.echo(f"{site.id:<22} {width:>6}  {hook_point(loaded, site)}")


@app.command()
def cache(
    model: str = typer.Argument(..., help="embedded name (gemma-3-270m, smollm2-135m), folder, .gguf or hub id"),
    sites: list[str] = typer.Option(..., "--sites", help="site to cache, e.g. resid_post/layer_6 (repeat)"),
    text: str = typer.Option("shakespeare", help="shakespeare, python, file:PATH or hf:NAME[:SPLIT[:COLUMN]]"),
    out: Path = typer.Option(..., help="store folder, e.g. runs/x/activations (re-run to resume)"),
    max_tokens: int | None = typer.Option(None, help="stop after this many stored tokens"),
    context_len: int = typer.Option(1024, help="tokens per window (BOS first)"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
    shard_rows: int = typer.Option(16384, help="rows per shard file"),
    dtype: str = typer.Option("float32", help="storage dtype: float32 or bfloat16"),
    model_dtype: str = typer.Option("float32", help="dtype to run the model in"),
    device: str = typer.Option("cpu", help="device to run the model on"),
    held_out_fraction: float = typer.Option(0.1, help="share of documents kept out of the store for evaluation"),
) -> None:
    """Run a model over a text once and store the activations of some sites (resumable: re-run to continue)."""
    from saescope.config import Site
    from saescope.corpus import documents_from_spec
    from saescope.distributed import process_group
    from saescope.models import load_model
    from saescope.store import StoreFormat
    from saescope.store.ranks import cache_across_ranks

    try:
        parsed = [Site.parse(s) for s in sites]
    except ValueError as exc:
        fail(str(exc))
    if dtype not in ("float32", "bfloat16"):
        fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    for name, value in (("--max-tokens", max_tokens), ("--context-len", context_len),
                        ("--batch-size", batch_size), ("--shard-rows", shard_rows)):
        if value is not None and value <= 0:
            fail(f"{name} must be positive, got {value}")
    try:
        documents = documents_from_spec(text)  # checks the spec before the model loads
        # under torchrun each rank caches every W-th window into its part of the same store (saescope.distributed)
        with process_group(device) as device:
            loaded = load_model(model, dtype=model_dtype, device=device)
            index = cache_across_ranks(loaded, documents, parsed, out, context_len=context_len,
                                       batch_size=batch_size, store_format=StoreFormat(dtype=dtype, shard_rows=shard_rows),
                                       max_tokens=max_tokens, text_name=text, held_out_fraction=held_out_fraction)
    except SaescopeError as exc:
        fail(str(exc))
    for site_id, entry in index.sites.items():
        typer.echo(f"{site_id}: {index.rows} rows × {entry.d} ({index.dtype}), norm scale C = {entry.norm_scale:.6g}")
    typer.echo(f"wrote the activation store to {out} ({len(index.shards)} shards)")


TRAIN_FLAG_FIELDS: dict[str, tuple[str, str]] = {
    # train flag (parameter name) → ("run" TrainConfig | "spec" SAESpec, field): the flag's help is the field's
    # description, so the two cannot drift (tests/test_cli.py checks every flag is here or CLI-only)
    "store": ("run", "store"), "out": ("run", "out_dir"), "total_tokens": ("run", "total_tokens"),
    "batch_size": ("run", "batch_size"), "lr": ("run", "lr"), "lr_warmup_steps": ("run", "lr_warmup_steps"),
    "lr_decay_steps": ("run", "lr_decay_steps"), "adam_update_clip": ("run", "adam_update_clip"),
    "sparsity_warmup_steps": ("run", "sparsity_warmup_steps"),
    "threshold_parameterization": ("run", "threshold_parameterization"),
    "transcoder_target_scale": ("run", "transcoder_target_scale"), "checkpoint_every": ("run", "checkpoint_every"),
    "log_every": ("run", "log_every"), "seed": ("run", "seed"), "device": ("run", "device"),
    "latent_shards": ("run", "latent_shards"), "model": ("run", "model"), "tensorboard": ("run", "tensorboard"),
    "wandb": ("run", "wandb"),
    "widths": ("spec", "width"), "lambdas": ("spec", "sparsity_coefficient"), "target_l0s": ("spec", "target_l0"),
    "target_l0_over": ("spec", "target_l0_over"),
    "frequency_penalty": ("spec", "frequency_penalty"), "frequency_cap": ("spec", "frequency_cap"),
    "architecture": ("spec", "architecture"), "k": ("spec", "k"), "skip": ("spec", "skip"),
    "matryoshka_prefixes": ("spec", "matryoshka_prefixes"), "matryoshka_weights": ("spec", "matryoshka_weights"),
}
_REPEATABLE = {"widths", "lambdas", "target_l0s", "matryoshka_prefixes", "matryoshka_weights"}


def _train_help(flag: str) -> str:
    """The help of a ``train`` flag: its config field's description (plus "repeat" for the repeatable ones)."""
    from saescope.train.config import SAESpec, TrainConfig

    where, field = TRAIN_FLAG_FIELDS[flag]
    text = (TrainConfig if where == "run" else SAESpec).model_fields[field].description
    return text + (" (repeat for several)" if flag in _REPEATABLE else "")


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="training config (.toml or .json); flags override it"),
    store: Path | None = typer.Option(None, help=_train_help("store")),
    out: Path | None = typer.Option(None, help=_train_help("out")),
    sites: list[str] = typer.Option([], "--sites", help="SAE site, e.g. resid_post/layer_6 (repeat)"),
    transcoder_layers: list[int] = typer.Option([], "--transcoder-layer", help="train mlp_in→mlp_out "
                                                "transcoders at this layer (repeat)"),
    widths: list[int] = typer.Option([], "--width", help=_train_help("widths")),
    lambdas: list[float] = typer.Option([], "--lambda", help=_train_help("lambdas")),
    target_l0s: list[float] = typer.Option([], "--target-l0", help=_train_help("target_l0s")),
    target_l0_over: str | None = typer.Option(None, help=_train_help("target_l0_over")),
    frequency_penalty: float | None = typer.Option(None, help=_train_help("frequency_penalty")),
    frequency_cap: float | None = typer.Option(None, help=_train_help("frequency_cap")),
    architecture: str | None = typer.Option(None, help=_train_help("architecture")),
    k: int | None = typer.Option(None, "--k", help=_train_help("k")),
    skip: bool = typer.Option(False, "--skip", help=_train_help("skip")),
    matryoshka: bool = typer.Option(False, "--matryoshka", help="SAEs sum the loss over nested latent prefixes "
                                    "(default prefixes width/16, /8, /4, /2, width)"),
    matryoshka_prefixes: list[int] = typer.Option([], "--matryoshka-prefix", help=_train_help("matryoshka_prefixes")),
    matryoshka_weights: list[float] = typer.Option([], "--matryoshka-weight", help=_train_help("matryoshka_weights")),
    preset: str | None = typer.Option(None, help="fill unset settings from a named preset: short-budget (runs "
                                      "of ~1M tokens; what `saescope demo` uses; see saescope.train.presets)"),
    total_tokens: int | None = typer.Option(None, help=_train_help("total_tokens")),
    batch_size: int | None = typer.Option(None, help=_train_help("batch_size")),
    lr: float | None = typer.Option(None, help=_train_help("lr")),
    lr_warmup_steps: int | None = typer.Option(None, help=_train_help("lr_warmup_steps")),
    lr_decay_steps: int | None = typer.Option(None, help=_train_help("lr_decay_steps")),
    adam_update_clip: float | None = typer.Option(None, help=_train_help("adam_update_clip")),
    sparsity_warmup_steps: int | None = typer.Option(None, help=_train_help("sparsity_warmup_steps")),
    threshold_parameterization: str | None = typer.Option(None, help=_train_help("threshold_parameterization")),
    transcoder_target_scale: str | None = typer.Option(None, help=_train_help("transcoder_target_scale")),
    checkpoint_every: int | None = typer.Option(None, help=_train_help("checkpoint_every")),
    log_every: int | None = typer.Option(None, help=_train_help("log_every")),
    seed: int | None = typer.Option(None, help=_train_help("seed")),
    device: str | None = typer.Option(None, help=_train_help("device")),
    latent_shards: int | None = typer.Option(None, help=_train_help("latent_shards")),
    model: str | None = typer.Option(None, help=_train_help("model")),
    dense: bool = typer.Option(False, "--dense", help="use the plain dense step instead of the fast path"),
    no_cpu_kernels: bool = typer.Option(False, "--no-cpu-kernels", help="run the fast path on torch ops, not on "
                                        "its compiled CPU kernels (same gradients; slower on the CPU)"),
    tensorboard: bool = typer.Option(False, help=_train_help("tensorboard")),
    wandb: bool = typer.Option(False, help=_train_help("wandb")),
) -> None:
    """Train JumpReLU SAEs / transcoders on an activation store (the Gemma Scope recipe); the same command
    resumes from the newest checkpoint in the run folder."""
    from saescope.train import TrainConfig, TrainingInterrupted, train_from_store

    overrides = {"store": store, "out_dir": out, "total_tokens": total_tokens, "batch_size": batch_size, "lr": lr,
                 "lr_warmup_steps": lr_warmup_steps, "lr_decay_steps": lr_decay_steps,
                 "adam_update_clip": adam_update_clip, "sparsity_warmup_steps": sparsity_warmup_steps,
                 "threshold_parameterization": threshold_parameterization, "checkpoint_every": checkpoint_every,
                 "transcoder_target_scale": transcoder_target_scale,
                 "log_every": log_every, "seed": seed, "device": device, "model": model,
                 "latent_shards": latent_shards}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for flag, value in (("fast_path", False if dense else None), ("cpu_kernels", False if no_cpu_kernels else None),
                        ("tensorboard", tensorboard or None), ("wandb", wandb or None)):
        if value is not None:
            overrides[flag] = value
    if (matryoshka_prefixes or matryoshka_weights) and not (matryoshka or matryoshka_prefixes):
        fail("--matryoshka-weight needs --matryoshka or --matryoshka-prefix")
    if (matryoshka or matryoshka_prefixes) and not sites:
        fail("--matryoshka / --matryoshka-prefix apply to SAEs: give --sites (transcoders have no Matryoshka "
             "prefixes)")
    if skip and not transcoder_layers:
        fail("--skip applies to transcoders: give --transcoder-layer")
    if sites or transcoder_layers:
        if architecture not in (None, "jumprelu", "topk", "batchtopk"):
            fail(f"--architecture {architecture!r}: choose jumprelu, topk or batchtopk")
        if architecture in ("topk", "batchtopk") and (k is None or transcoder_layers or lambdas or target_l0s):
            fail(f"--architecture {architecture} needs --k and --sites, and takes no --lambda / --target-l0 / "
                 "--transcoder-layer (the baselines are SAEs whose sparsity is k)")
        if not widths or not (lambdas or target_l0s or architecture in ("topk", "batchtopk")):
            fail("give at least one --width and one --lambda or --target-l0 with --sites / --transcoder-layer")
        if target_l0_over is not None and not target_l0s:
            fail("--target-l0-over applies to the target-L0 penalty: give --target-l0")
        penalties = [{"sparsity_coefficient": lam, "target_l0": t,
                      "target_l0_over": None if t is None else target_l0_over}
                     for lam in (lambdas or [None]) for t in (target_l0s or [None])]
        nested = {}
        if matryoshka or matryoshka_prefixes:
            nested["matryoshka_prefixes"] = list(matryoshka_prefixes) or "default"
            if matryoshka_weights:
                nested["matryoshka_weights"] = list(matryoshka_weights)
        options = {"frequency_penalty": frequency_penalty, "frequency_cap": frequency_cap,
                   "architecture": architecture, "k": k}
        if architecture in ("topk", "batchtopk"):   # a baseline: no λ / target L0 (k sets its sparsity)
            penalties = [{}]
        specs = [{"site": s, "width": w, **pen, **nested, **options} for s in sites for w in widths
                 for pen in penalties]
        specs += [{"site": f"mlp_in/layer_{layer}", "width": w, **pen, "kind": "transcoder", "skip": skip,
                   "frequency_penalty": frequency_penalty, "frequency_cap": frequency_cap}
                  for layer in transcoder_layers for w in widths for pen in penalties]
        overrides["saes"] = [{k: v for k, v in spec.items() if v is not None} for spec in specs]
    elif (widths or lambdas or target_l0s or skip or matryoshka or matryoshka_prefixes or k is not None
          or architecture or frequency_penalty is not None or frequency_cap is not None):
        fail("--width / --lambda / --target-l0 / --skip / --matryoshka / --architecture / --k / --frequency-* "
             "need --sites or --transcoder-layer")
    try:
        if config is not None:
            cfg = TrainConfig.from_file(config, preset=preset, **overrides)
        else:
            if "saes" not in overrides:
                fail("give a config file or --sites/--width/--lambda or --target-l0 (see saescope train --help)")
            if "total_tokens" not in overrides:
                fail("give --total-tokens (or a config file that sets total_tokens)")
            cfg = TrainConfig.from_dict(overrides, source="the command-line flags", preset=preset)
        folders = train_from_store(cfg)
    except TrainingInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130) from exc
    except SaescopeError as exc:
        fail(str(exc))
    for name, folder in folders.items():
        typer.echo(f"{name} -> {folder}")


@app.command()
def dashboards(
    path: Path = typer.Argument(..., help="an SAE folder, or a run directory (every SAE under suite/)"),
    store: Path | None = typer.Option(None, help="activation store (default: <run>/activations)"),
    model: str | None = typer.Option(None, help="model for the tokenizer and logit effect (default: the "
                                                   "SAE config's model)"),
    top_k: int = typer.Option(20, help="top activating contexts per latent"),
    max_tokens: int | None = typer.Option(None, help="read at most this many store rows"),
    no_html: bool = typer.Option(False, "--no-html", help="write only summary.json + latents.jsonl"),
    device: str = typer.Option("cpu", help="device for the SAE and model"),
) -> None:
    """Latent dashboards (top contexts, quantile samples, histogram, logit effect) as static HTML in
    <sae folder>/dashboards/index.html, from one streaming pass over the activation store."""
    from saescope.dashboards import DashboardSettings
    from saescope.dashboards.build import dashboards_for

    try:
        settings = DashboardSettings(top_k=top_k, max_rows=max_tokens)
    except ValueError as exc:
        fail(str(exc))
    try:
        outs = dashboards_for(path, store=store, model=model, settings=settings, device=device, html=not no_html)
    except SaescopeError as exc:
        fail(str(exc))
    for out in outs:
        typer.echo(f"wrote {out / 'index.html'}")


@app.command()
def browse(
    run_dir: Path = typer.Argument(..., help="run directory (runs/<name>) or a folder of SAEs"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (only this machine by default)"),
    port: int = typer.Option(8000, help="port (0 picks a free one)"),
    model: str | None = typer.Option(None, help="model for typed texts (default: each SAE config's model)"),
    device: str = typer.Option("cpu", help="device for the SAEs and model"),
) -> None:
    """Serve a local web page: pick an SAE, open latent dashboards, type a text to see the latents per token."""
    from saescope.browse import serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: serving on {host}: other machines on that network can reach this page",
                    fg=typer.colors.YELLOW, err=True)
    try:
        serve(run_dir, host=host, port=port, model=model, device=device)
    except (SaescopeError, OSError) as exc:
        fail(str(exc))


@app.command()
def steer(
    sae_path: Path = typer.Argument(..., help="SAE folder"),
    latent: int = typer.Option(..., help="latent whose decoder direction is added"),
    coefficient: float = typer.Option(..., help="α added to the latent's activation (see its max on the dashboard)"),
    prompt: str = typer.Option(..., help="text to continue"),
    model: str | None = typer.Option(None, help="model (default: the SAE config's model)"),
    max_new_tokens: int = typer.Option(30, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0, help="sampling seed (the same for both runs)"),
    device: str = typer.Option("cpu", help="device"),
) -> None:
    """Generate with a latent's decoder direction added at its site (activation addition), next to the
    unsteered text."""
    from saescope.formats import load_sae
    from saescope.models import load_model
    from saescope.steer import SteerSettings, format_side_by_side
    from saescope.steer import steer as run_steer

    try:
        settings = SteerSettings(coefficient=coefficient, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed)
    except ValueError as exc:
        fail(str(exc))
    try:
        sae = load_sae(sae_path, device=device)
        if not 0 <= latent < sae.d_sae:
            fail(f"latent {latent} does not exist: this SAE has latents 0..{sae.d_sae - 1}")
        name = model or sae.config.model
        if not name:
            fail("the SAE config names no model; pass --model")
        lm = load_model(name, device=device)
        result = run_steer(lm, lm.tokenizer, sae, latent, prompt, settings)
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo(format_side_by_side(result, latent, coefficient))


def _default(config: Any, name: str) -> Any:
    """A config field's default, so a flag and the library share one value."""
    return config.model_fields[name].get_default(call_default_factory=True)


def _eval_default(name: str) -> Any:
    from saescope.evaluate.run import EvalConfig

    return _default(EvalConfig, name)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="run directory with suite/ (from saescope train)"),
    model: str | None = typer.Option(None, help="model (default: the one the SAEs name)"),
    domains: list[str] = typer.Option(_eval_default("domains"), "--domain",
                                      help="held-out text domain (repeat): shakespeare, python, file:PATH, hf:NAME"),
    held_out_fraction: float = typer.Option(_eval_default("held_out_fraction"),
                                            help="fraction of documents held out (as when caching)"),
    context_len: int = typer.Option(_eval_default("context_len"), help="tokens per window, BOS first (Gemma Scope: 1024)"),
    windows: int = typer.Option(_eval_default("windows_per_domain"), help="held-out windows per domain"),
    batch_size: int = typer.Option(_eval_default("batch_size"), help="windows per forward pass"),
    uniformity_tokens: int = typer.Option(_eval_default("uniformity_tokens"),
                                          help="tokens per SAE for App. C.3 uniformity (0: skip)"),
    principal_directions: int = typer.Option(_eval_default("principal_directions"),
                                             help="k of fvu_top/fvu_rest: FVU along the site's top-k principal "
                                                  "directions and on the rest (0: skip)"),
    bootstrap_samples: int = typer.Option(_eval_default("bootstrap_samples"),
                                          help="bootstrap replicates of the Δ loss interval (over windows)"),
    confidence: float = typer.Option(_eval_default("confidence"), help="coverage of the Δ loss interval"),
    bootstrap_seed: int = typer.Option(_eval_default("bootstrap_seed"), help="seed of the bootstrap"),
    device: str = typer.Option("cpu", help="device"),
) -> None:
    """Evaluate every SAE of a run on held-out text: L0, FVU (whole, along the top principal directions and on
    the rest), MSE, cosine, Δ LM loss with a bootstrap interval over windows (whole, by position, per domain),
    loss recovered, dead and dense latents (and the dense latents' share of L0), uniformity (App. C.3).
    Writes RUN_DIR/eval/table.json."""
    from saescope.evaluate.run import EvalConfig, evaluate_run

    try:
        config = EvalConfig(domains=domains, held_out_fraction=held_out_fraction, context_len=context_len,
                            windows_per_domain=windows, batch_size=batch_size,
                            uniformity_tokens=uniformity_tokens, principal_directions=principal_directions,
                            bootstrap_samples=bootstrap_samples, confidence=confidence,
                            bootstrap_seed=bootstrap_seed, model=model, device=device)
    except ValueError as exc:
        fail(str(exc))
    try:
        path = evaluate_run(run_dir, config)
    except SaescopeError as exc:
        fail(str(exc))
    table = json.loads(path.read_text())
    typer.echo(format_eval_table(table["rows"], confidence))
    typer.echo(f"wrote {path}")


def format_eval_table(rows: list[dict[str, Any]], confidence: float = 0.95) -> str:
    """The `saescope evaluate` printout: one line per SAE with L0, FVU (all / top direction(s) / rest),
    dense latents and their share of L0, Δ loss and its interval."""
    def num(value: Any, fmt: str, width: int) -> str:
        return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    ci = f"{confidence:.0%} interval"
    lines = [f"{'sae':<40} {'L0':>7} {'FVU':>7} {'FVU_top':>8} {'FVU_rest':>8} {'dense':>6} {'dense/L0':>8} "
             f"{'Δ loss':>7}  {ci:<17} {'windows':>7}"]
    for row in rows:
        lo, hi = row.get("delta_loss_lower"), row.get("delta_loss_upper")
        interval = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "-"
        lines.append(f"{row['name']:<40} {num(row.get('l0'), '.4g', 7)} {num(row.get('fvu'), '.4f', 7)} "
                     f"{num(row.get('fvu_top'), '.4f', 8)} {num(row.get('fvu_rest'), '.4f', 8)} "
                     f"{num(row.get('dense'), 'd', 6)} {num(row.get('dense_l0_share'), '.1%', 8)} "
                     f"{num(row.get('delta_loss'), '.4f', 7)}  {interval:<17} {num(row.get('n_windows'), 'd', 7)}")
    return "\n".join(lines)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="run directory evaluated by saescope evaluate")) -> None:
    """Write RUN_DIR/report/index.html (offline page: frontiers, Δ loss by position, densities, uniformity,
    per-domain table, config), the figures as PNG and metrics.json."""
    from saescope.report import write_report

    try:
        page = write_report(run_dir)
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo(f"wrote {page}")


def _demo_default(name: str) -> Any:
    from saescope.demo import DemoConfig

    return _default(DemoConfig, name)


def _scope_default(name: str) -> Any:
    from saescope.scope import ScopeConfig

    return _default(ScopeConfig, name)


@app.command()
def scope(
    model: str = typer.Argument(..., help="embedded name (gemma-3-270m, smollm2-135m), folder, .gguf or hub id"),
    out: Path = typer.Option(..., help="run folder (re-run the same command to resume)"),
    layers: str = typer.Option("all", help="all, a range like 0-17, or a list like 5,9,12"),
    sites: list[str] = typer.Option(["resid_post"], "--sites",
                                    help="resid_post, attn_out, mlp_out (repeat or comma-separate)"),
    transcoders: bool = typer.Option(False, help="also a transcoder mlp_in → mlp_out at every layer"),
    widths: list[int] = typer.Option([4096], "--width", help="latents per SAE (repeat for several)"),
    target_l0: list[float] = typer.Option([], "--target-l0", help="target L0 (repeat for several)"),
    l0: list[str] = typer.Option([], "--l0", help="Gemma Scope 2's per-layer ladder: small, medium, big (repeat)"),
    tokens: int = typer.Option(300_000, help="training tokens, the same for every SAE"),
    text: str = typer.Option("shakespeare", help="shakespeare, python, file:PATH or hf:NAME[:SPLIT[:COLUMN]]"),
    eval_windows: int = typer.Option(4, help="held-out windows per evaluation domain"),
    preset: str = typer.Option("short-budget", help="training preset, or none for the paper's schedule"),
    stream: bool = typer.Option(False, help="train from the model's forward passes: no activation store on disk"),
    batch_size: int = typer.Option(1024, help="tokens per step"),
    buffer_rows: int = typer.Option(16384, help="--stream: shuffle buffer in rows"),
    context_len: int = typer.Option(256, help="tokens per window (Gemma Scope: 1024)"),
    export: bool = typer.Option(False, help="also write the Gemma Scope 2 release layout to OUT/release"),
    dashboards: bool = typer.Option(_scope_default("dashboards"), help="also build every SAE's latent dashboards "
                                    "(<sae folder>/dashboards; copied into the release with --export)"),
    dashboard_tokens: int = typer.Option(_scope_default("dashboard_tokens"),
                                         help="training-text tokens the dashboards are computed from (--stream: "
                                              "cached to OUT/dashboard_activations)"),
    device: str = typer.Option("cpu", help="device for the model and the SAEs"),
) -> None:
    """Every SAE of a model in one command: train (one forward pass serves all sites), evaluate, latent dashboards
    (--dashboards), report, export."""
    from pydantic import ValidationError

    from saescope.scope import ScopeConfig, run_scope

    kinds = [k.strip() for s in sites for k in s.split(",") if k.strip()]
    try:
        cfg = ScopeConfig(model=model, out=out, layers=layers, sites=kinds, transcoders=transcoders, widths=widths,
                          target_l0=target_l0, l0=l0, tokens=tokens, text=text, eval_windows=eval_windows,
                          preset=None if preset == "none" else preset, stream=stream, batch_size=batch_size,
                          buffer_rows=buffer_rows, context_len=context_len, export=export, dashboards=dashboards,
                          dashboard_tokens=dashboard_tokens, device=device)
        summary = run_scope(cfg, echo=typer.echo)
    except ValidationError as exc:
        fail(f"invalid scope settings:\n{exc}")
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo(f"\n{summary['saes']} SAE(s); by-layer report: {summary['by_layer']}")
    if summary.get("dashboards"):
        built = summary["dashboards"]
        typer.echo(f"dashboards: {built['built']} built, {built['skipped']} already there (<sae folder>/dashboards)")
    if summary["release"]:
        typer.echo(f"release: {summary['release']}")
    typer.echo(f"took {summary['seconds']['total'] / 60:.1f} min ({summary['seconds']})")


@app.command()
def demo(
    out: Path = typer.Option(_demo_default("out"), help="run folder (re-run the command to resume)"),
    model: str = typer.Option(_demo_default("model"), help="embedded name, folder, .gguf or hub id"),
    layer: int = typer.Option(_demo_default("layer"), help="layer whose sites are cached and trained on"),
    text: str = typer.Option(_demo_default("text"), help="training text: shakespeare, python, file:PATH, "
                             "hf:NAME; A+B one after the other, mix:A+B interleaved"),
    tokens: int = typer.Option(_demo_default("tokens"), help="tokens cached and trained on"),
    width: int = typer.Option(_demo_default("width"), help="latents per SAE"),
    lambdas: list[float] = typer.Option([], "--lambda", help="λ of the resid_post SAEs (repeat; default 3)"),
    context_len: int = typer.Option(_demo_default("context_len"), help="tokens per window"),
    eval_windows: int = typer.Option(_demo_default("eval_windows"), help="held-out windows per evaluation domain"),
    transcoder: bool = typer.Option(True, help="also train an mlp_in→mlp_out transcoder"),
    dashboards: bool = typer.Option(_demo_default("dashboards"), help="build latent dashboards for one SAE"),
) -> None:
    """The whole flow on the embedded default: cache, train a λ sweep + a transcoder, evaluate, report."""
    from pydantic import ValidationError

    from saescope.demo import DemoConfig, run_demo

    fields = {"out": out, "model": model, "layer": layer, "text": text, "tokens": tokens, "width": width,
              "context_len": context_len, "eval_windows": eval_windows, "dashboards": dashboards}
    if lambdas:
        fields["lambdas"] = lambdas
    if not transcoder:
        fields["transcoder_lambda"] = None
    try:
        cfg = DemoConfig(**fields)
        summary = run_demo(cfg, echo=typer.echo)
    except ValidationError as exc:
        fail(f"invalid demo settings:\n{exc}")
    except SaescopeError as exc:
        fail(str(exc))
    typer.echo("\n{:<52} {:>7} {:>7} {:>9} {:>7}".format("SAE", "L0", "FVU", "Δ loss", "dead"))
    for row in summary["saes"]:
        def num(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        typer.echo(f"{row['name']:<52} {num(row['l0'], '7.1f')} {num(row['fvu'], '7.3f')} "
                   f"{num(row['delta_loss'], '9.4f')} {num(row['dead'], '7d')}")
    typer.echo(f"\nreport: {summary['report']}")
    if summary["dashboards"]:
        typer.echo(f"dashboards: {summary['dashboards']}")
    typer.echo(f"took {summary['seconds']['total'] / 60:.1f} min ({summary['seconds']})")


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - console entry point helper
    app(argv)
