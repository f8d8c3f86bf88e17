"""Evaluation speed: the suite evaluator (one clean pass per batch shared by all SAEs, spliced passes that
start at the site's layer from cached layer inputs) against the plain way (for each SAE a clean run and a
spliced run from the embeddings with saescope.splice.run_with_splice), side by side in one process on the
same batch. Prints seconds and the ratio; checks both give the same Δ loss.

    .venv/bin/python benchmarks/bench_evaluate.py [--model gemma-3-270m] [--layer 6] [--saes 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saescope.evaluate import EvalBatch, MetricOptions, evaluate_saes
from saescope.models import load_model
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.splice import run_with_splice


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--saes", type=int, default=4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    lm = loaded.model
    site = f"resid_post/layer_{args.layer}"
    saes = {}
    for i in range(args.saes):
        sae = JumpReLUSAE(loaded.d_model, args.width, seed=i, norm_scale=4000.0)
        sae.config.site, sae.config.layer = "resid_post", args.layer
        with torch.no_grad():
            sae.threshold.fill_(0.02 * (i + 1))
        saes[f"sae{i}"] = sae.standardize()
    ids = torch.randint(10, 20000, (args.batch, args.tokens))
    ids[:, 0] = loaded.tokenizer.bos_token_id
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    batch = [EvalBatch("bench", ids, mask)]

    def plain() -> dict[str, float]:
        out = {}
        for name, sae in saes.items():
            clean = run_with_splice(lm, ids, None, None).loss_per_token
            spliced = run_with_splice(lm, ids, site, sae.forward, splice_mask=mask).loss_per_token
            counted = mask[:, :-1]
            out[name] = float((spliced - clean)[counted].mean())
        return out

    def suite() -> dict[str, float]:
        res = evaluate_saes(lm, saes, batch, MetricOptions(uniformity_tokens=0), progress=False)
        return {r["name"]: r["metrics"]["delta_loss"] for r in res}

    plain(), suite()  # warm-up
    t_plain, t_suite = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = suite()
        t_suite.append(time.perf_counter() - t0)
    worst = max(abs(a[k] - b[k]) for k in a)
    p, s = statistics.median(t_plain), statistics.median(t_suite)
    print(f"{args.model} {site}: {args.saes} SAEs × width {args.width}, batch {args.batch}×{args.tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"plain (clean + full spliced run per SAE): {p:.2f} s   Δ loss {[round(v, 4) for v in a.values()]}")
    print(f"suite evaluator (shared clean, layer-cached splice, + zero-ablation and all metrics): {s:.2f} s")
    print(f"speed-up {p / s:.2f}×   largest Δ loss difference {worst:.2e}")


if __name__ == "__main__":
    main()
