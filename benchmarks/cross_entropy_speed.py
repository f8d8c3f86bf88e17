"""Chunked next-token cross-entropy into a large vocabulary: in place (what the evaluator runs) vs the
out-of-place ``torch.logsumexp`` path (what runs under autograd), side by side in one process.

Shapes default to Gemma 3 270M (d_model 640, vocab 262,144) and the evaluator's chunk of 512 tokens; every
spliced pass of an evaluation is one such unembedding. Prints seconds per call and the ratio.

    python benchmarks/cross_entropy_speed.py [--tokens 1024] [--vocab 262144] [--d-model 640] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from saescope.splice import token_cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    unembed = torch.nn.Linear(args.d_model, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.d_model, generator=g)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    unembed.weight.requires_grad_(False)
    leaf = hidden.clone().requires_grad_(True)      # the autograd path: logits require grad

    def timed(fn) -> float:
        fn()                                          # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    with torch.no_grad():
        in_place = timed(lambda: token_cross_entropy(hidden, targets, unembed, chunk_size=args.chunk))
        fast = token_cross_entropy(hidden, targets, unembed, chunk_size=args.chunk)
    out_of_place = timed(lambda: token_cross_entropy(leaf, targets, unembed, chunk_size=args.chunk))
    slow = token_cross_entropy(leaf, targets, unembed, chunk_size=args.chunk).detach()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.tokens} tokens x vocab {args.vocab:,} (d {args.d_model}, chunks of {args.chunk}), best of "
          f"{args.repeats}")
    print(f"out of place (autograd path): {out_of_place:.3f} s")
    print(f"in place (evaluator):         {in_place:.3f} s   ratio {in_place / out_of_place:.2f}x")
    print(f"max |difference| {float((fast - slow).abs().max()):.2e} nats")


if __name__ == "__main__":
    main()
