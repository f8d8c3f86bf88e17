"""Tokens/s of reading one middle layer with early stop vs a full forward pass, on the embedded Gemma 3 270M.

``read_sites`` runs the decoder blocks only up to the deepest requested layer (here layer 5 of 18) and stops:
no later blocks, no final norm, no 262,144-way unembedding. Baselines, timed alternately in the same process
on the same Shakespeare windows: the full forward ``model(ids).logits`` (what a naive hook-and-run does) and
the full decoder stack without the unembedding. Medians over ``--repeats`` timed runs after one warm-up.

    python benchmarks/read_sites_speed.py [--layer 5] [--batch 1] [--context-len 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from saescope.corpus import batch_windows, pack_windows, shakespeare_documents
from saescope.models import load_model
from saescope.sites import read_sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model = loaded.model
    windows = pack_windows(shakespeare_documents(), loaded.tokenizer, context_len=args.context_len)
    ids = next(batch_windows(itertools.islice(windows, args.batch), args.batch)).input_ids
    n_tokens = ids.numel()
    site = f"resid_post/layer_{args.layer}"

    def early() -> None:
        read_sites(loaded, ids, site)

    def full_logits() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def full_no_unembed() -> None:
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)

    runs = {"read_sites (early stop)": early, "full forward + logits": full_logits,
            "all layers, no unembed": full_no_unembed}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(f"{loaded.name}: {loaded.n_layers} layers, d_model {loaded.d_model}; reading {site}; "
          f"batch {args.batch} x {args.context_len} = {n_tokens} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["full forward + logits"]
    for name, seconds in medians.items():
        print(f"  {name:<26} {seconds * 1000:9.1f} ms  {n_tokens / seconds:10.0f} tok/s  "
              f"speed-up vs full forward {base / seconds:5.2f}x")
    print(f"layers run: {args.layer + 1} of {loaded.n_layers} "
          f"(ideal block-only ratio {loaded.n_layers / (args.layer + 1):.2f}x, plus the skipped unembedding)")


if __name__ == "__main__":
    main()
