"""Whole-model scope, streaming vs cached, time split by stage (issue 18).

    python benchmarks/scope_speed.py [--tokens 300000] [--layers all] [--width 4096] [--target-l0 60]
        [--modes stream,stream-noprefetch,cached] [--out /tmp/scope_bench]

Runs ``saescope scope`` (the library's :func:`saescope.scope.run_scope`) once per mode in this process on the same
settings (Gemma 3 270M, ``resid_post`` of the chosen layers): ``stream`` (forward passes one ahead in a thread,
overlapping the SAE steps), ``stream-noprefetch`` (forward and SAE steps in turn) and ``cached`` (store first,
then training from it). Prints per mode: load, C estimate, cache, training (and the time spent inside forward
passes during it), evaluation, report, total, and the ratio of each total to the cached one; then the by-layer
quality of the last mode (FVU, Δ LM loss, L0, dense latents). Wall times depend on the machine: quote them with
its CPU and load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from saescope.models import load_model
from saescope.scope import ScopeConfig, run_scope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--target-l0", type=float, default=60)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--modes", default="stream,stream-noprefetch,cached")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scope_bench"))
    args = parser.parse_args()
    lm = load_model(args.model, device=args.device)
    rows = {}
    for mode in args.modes.split(","):
        out = args.out / mode
        if out.exists():
            shutil.rmtree(out)
        cfg = ScopeConfig(model=args.model, out=out, layers=args.layers, sites=["resid_post"], widths=[args.width],
                          target_l0=[args.target_l0], tokens=args.tokens, eval_windows=args.eval_windows,
                          stream=mode.startswith("stream"), prefetch=0 if mode == "stream-noprefetch" else 1,
                          batch_size=args.batch_size, device=args.device)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        summary = run_scope(cfg, model=lm, progress=False, echo=lambda _: None)
        rows[mode] = {**summary["seconds"], "wall": time.perf_counter() - start, "load_before": load_before,
                      "load_after": os.getloadavg()[0], "peak_rss_gib": summary["memory"]["peak_rss_bytes"] / 2**30,
                      "shards": summary["activation_shards"], "table": summary["table"]}
    stages = ["norm_scale", "cache", "train", "train_forward", "evaluate", "report", "total"]
    print(f"\n{args.model}: {args.layers} resid_post layers, width {args.width}, target L0 {args.target_l0:g}, "
          f"{args.tokens:,} tokens, {os.cpu_count()} CPU(s), device {args.device}")
    print("| mode | " + " | ".join(stages) + " | total / cached | load 1-min before→after | shards |")
    print("|" + "---|" * (len(stages) + 4))
    base = rows.get("cached", {}).get("total")
    for mode, r in rows.items():
        cells = [f"{r[s]:.1f} s" if s in r else "–" for s in stages]
        ratio = f"{r['total'] / base:.2f}×" if base else "–"
        print(f"| {mode} | " + " | ".join(cells) + f" | {ratio} | {r['load_before']:.1f}→{r['load_after']:.1f} | "
              f"{r['shards']} |")
    last = next(reversed(rows.values()))
    table = json.loads(Path(last["table"]).read_text())
    print("\n| layer | L0 | FVU | Δ LM loss | dense latents |\n|---|---|---|---|---|")
    for r in sorted(table["results"], key=lambda r: r["layer"]):
        m = r["metrics"]
        print(f"| {r['layer']} | {m.get('l0', float('nan')):.1f} | {m.get('fvu', float('nan')):.4f} | "
              f"{m.get('delta_loss', float('nan')):.3f} | {m.get('dense')} |")


if __name__ == "__main__":
    main()
