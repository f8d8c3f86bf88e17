"""``saescope demo``: the whole flow on the embedded default, in one command.

Gemma 3 270M (from PyPI) → cache three sites of a middle layer on Shakespeare's plays (the training part of the
by-document split) → train a λ sweep of JumpReLU SAEs on ``resid_post`` and one transcoder ``mlp_in → mlp_out``,
all on the same batches → standardize and write the suite → evaluate on held-out plays and Python source →
HTML report → latent dashboards for one SAE. Every stage is the library's own (the same as the CLI commands);
re-running the command resumes each stage where it stopped.

The demo trains for a few hundred steps, so it cannot use the paper's schedule as is (recipe §6: with lr 7e-5 and
10,000 warm-up steps for λ nothing moves in that time). It uses a named *short-budget preset* — a larger learning
rate, warm-ups scaled to the run, the lr decayed to 0 over the last 20% of steps, θ trained directly (the SAEs'
θ at a tenth of the lr), b_dec started at the data mean, θ at the 99th percentile of the first batch's
pre-activations and the SAEs' initial directions orthogonal to the top principal direction (Gemma 3's
massive-activation dimension) — which is printed and written to the run folder. Measured with the defaults
(240k tokens of Shakespeare and Python interleaved, layer 6, 2-core AMD EPYC Zen 2 with AVX2 only, 2026-12-08,
with the preset's Adam update clip): 7.5 min in all — load 7 s, cache 172 s (~1.4k tokens/s for three sites),
train 84 s, evaluate 130 s (8 windows of 256 tokens per domain; each spliced pass is one unembedding into the
262k vocabulary), dashboards 59 s (the run before the clip took 6.1 min; its evaluation and dashboards, which the
clip does not touch, were 15–25% faster too, so part of the difference is the machine).
λ = 1e-3, 3e-4, 1e-4 gave held-out L0 17, 29, 52, FVU 0.086, 0.072, 0.057 and Δ LM loss 1.38 [1.17, 1.65],
1.24 [1.05, 1.49], 1.11 [0.93, 1.34] nats (plays 1.03, 0.97, 0.83; Python 1.74, 1.50, 1.39): Δ loss falls as
L0 rises on both domains, though the intervals of neighbours overlap at this budget, and dense latents make
42–67% of L0 (λ·L0 specs have no frequency penalty; issue 17). Before the lr decay the same sweep gave 1.52, 1.70,
1.71. The transcoder: L0 101, FVU 0.26, Δ loss 0.14.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from saescope.errors import SaescopeError


class DemoConfig(BaseModel):
    """What the demo runs. Defaults take about 8 minutes on a 2-core CPU (7.7 measured on an AVX2-only EPYC:
    cache 2.9, train 1.3, evaluate 2.5, dashboards 1.0)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="run folder")
    model: str = Field("gemma-3-270m", description="embedded name, folder, .gguf or hub id")
    layer: int = Field(6, ge=0, description="the layer whose sites are cached and trained on")
    text: str = Field("mix:shakespeare+python", description="training text (saescope.corpus spec): both "
                      "evaluation domains, interleaved, so both are in distribution")
    eval_domains: list[str] = Field(default_factory=lambda: ["shakespeare", "python"])
    tokens: int = Field(240_000, gt=0, description="tokens cached and trained on")
    context_len: int = Field(256, ge=16, description="tokens per window (Gemma Scope: 1024)")
    width: int = Field(4096, gt=0, description="latents per SAE")
    lambdas: list[float] = Field(default_factory=lambda: [1e-4, 3e-4, 1e-3], min_length=1)
    # The short-budget preset divides a transcoder's target (mlp_out) by its own norm scale (not App. B's input
    # scale, under which Gemma 3's mlp_out is ~57× too large for Adam to follow in 800k tokens): λ 1e-5 gave
    # training L0 96, FVU 0.118 on 800k tokens (λ 30 at the input scale: L0 116, FVU 0.336).
    transcoder_lambda: float | None = Field(1e-5, description="λ of the mlp_in→mlp_out transcoder (None: skip)")
    batch_size: int = Field(1024, gt=0, description="tokens per step (recipe: 4096)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (recipe: 7e-5 over billions of tokens)")
    eval_windows: int = Field(8, gt=0, description="held-out windows per domain")
    # Each spliced pass costs one unembedding into Gemma 3's 262k vocabulary (~70% of the evaluation's time):
    # zero-ablation (~20 nats, known well from few tokens) and App. C.3 run on a sample only.
    eval_zero_ablation_tokens: int = Field(512, gt=0, description="held-out tokens per site and domain also "
                                           "run zero-ablated (loss recovered)")
    eval_uniformity_tokens: int = Field(512, ge=0, description="tokens per SAE for App. C.3 uniformity")
    dashboards: bool = True
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


def short_budget_train_config(cfg: DemoConfig, store: Path):
    """The training config of the demo: the recipe with the short-budget preset (recipe §6,
    :mod:`saescope.train.presets`)."""
    from saescope.train import TrainConfig

    site = f"resid_post/layer_{cfg.layer}"
    saes = [{"site": site, "width": cfg.width, "sparsity_coefficient": lam} for lam in cfg.lambdas]
    if cfg.transcoder_lambda is not None:
        saes.append({"site": f"mlp_in/layer_{cfg.layer}", "width": cfg.width,
                     "sparsity_coefficient": cfg.transcoder_lambda, "kind": "transcoder"})
    steps = max(cfg.steps, 1)
    return TrainConfig.from_dict(
        {"saes": saes, "total_tokens": cfg.tokens, "batch_size": cfg.batch_size, "lr": cfg.lr,
         "checkpoint_every": max(steps // 4, 1), "log_every": max(steps // 10, 1), "seed": cfg.seed,
         "out_dir": cfg.out, "store": store, "model": cfg.model},
        source="the demo's settings", preset="short-budget")


def run_demo(cfg: DemoConfig, *, progress: bool = True, echo=print) -> dict:
    """Run every stage; returns the headline numbers (also written to ``<out>/demo_summary.json``)."""
    from saescope.evaluate.run import EvalConfig, evaluate_run
    from saescope.models import load_model
    from saescope.report.html import write_report
    from saescope.store import cache_activations
    from saescope.train import train_from_store

    out = Path(cfg.out)
    if cfg.steps < 10:
        raise SaescopeError(f"tokens={cfg.tokens} gives only {cfg.steps} steps of {cfg.batch_size}; "
                            "raise --tokens or lower --batch-size")
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    times: dict[str, float] = {}
    start = time.perf_counter()

    echo(f"[1/5] loading {cfg.model}")
    t = time.perf_counter()
    lm = load_model(cfg.model)
    if cfg.layer >= lm.n_layers:
        raise SaescopeError(f"--layer {cfg.layer} does not exist: {lm.name} has layers 0-{lm.n_layers - 1}")
    times["load"] = time.perf_counter() - t

    sites = [f"resid_post/layer_{cfg.layer}"]
    if cfg.transcoder_lambda is not None:
        sites += [f"mlp_in/layer_{cfg.layer}", f"mlp_out/layer_{cfg.layer}"]
    store = out / "activations"
    echo(f"[2/5] caching {cfg.tokens:,} tokens of {cfg.text} at {', '.join(sites)} → {store}")
    t = time.perf_counter()
    index = cache_activations(lm, cfg.text, sites, store, context_len=cfg.context_len, max_tokens=cfg.tokens,
                              progress=progress)
    times["cache"] = time.perf_counter() - t
    for site, entry in index.sites.items():
        echo(f"      {site}: norm scale C = {entry.norm_scale:.4g}")

    train_cfg = short_budget_train_config(cfg, store)
    echo(f"[3/5] training {len(train_cfg.saes)} SAEs together for {train_cfg.total_steps} steps of "
         f"{train_cfg.batch_size} tokens (short-budget preset: lr {train_cfg.lr:g}, warm-ups "
         f"{train_cfg.lr_warmup_steps}/{train_cfg.sparsity_warmup_steps} steps, θ trained directly, b_dec from the "
         "mean, θ from the 99th percentile)")
    t = time.perf_counter()
    folders = train_from_store(train_cfg, progress=progress)
    times["train"] = time.perf_counter() - t

    echo(f"[4/5] evaluating on held-out {' and '.join(cfg.eval_domains)} ({cfg.eval_windows} windows each)")
    t = time.perf_counter()
    eval_cfg = EvalConfig(domains=cfg.eval_domains, context_len=cfg.context_len,
                          windows_per_domain=cfg.eval_windows, model=cfg.model,
                          zero_ablation_tokens=cfg.eval_zero_ablation_tokens,
                          uniformity_tokens=cfg.eval_uniformity_tokens)
    table_path = evaluate_run(out, eval_cfg, model=lm, progress=progress)
    page = write_report(out)
    times["evaluate"] = time.perf_counter() - t

    dashboards = None
    if cfg.dashboards:
        from saescope.dashboards.build import dashboards_for

        first = next(iter(folders.values()))
        echo(f"[5/5] latent dashboards for {first}")
        t = time.perf_counter()
        dashboards = dashboards_for(first, store=store, model=cfg.model, progress=progress)[0] / "index.html"
        times["dashboards"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start

    from saescope.evaluate.suite import table_rows

    table = json.loads(Path(table_path).read_text())
    rows = [{k: row.get(k) for k in ("name", "l0", "fvu", "delta_loss", "loss_recovered", "dead")}
            for row in table_rows(table["results"])]
    summary = {"report": str(page), "dashboards": str(dashboards) if dashboards else None,
               "seconds": {k: round(v, 1) for k, v in times.items()}, "saes": rows}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
