"""Activation-store benchmarks, each against its baseline in the same process (shared/reference/
benchmark-protocol.md style: alternate runs, report medians and ratios).

1. Caching: tokens/s of ``cache_activations`` vs the bare truncated forward pass (``read_sites`` on the same
   windows, nothing stored) of the same model on the same text. Target: overhead ≤ 10%.
2. Reading: GB/s of ``ActivationLoader`` (shuffled float32 batches) vs a plain sequential ``readinto`` of the
   same shard files.
3. Memory: peak RSS writing and reading a store and one twice as large (fresh processes).

    python benchmarks/store_bench.py [--model gemma-3-270m] [--site resid_post/layer_6] [--chars 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def bench_cache(args, tmp: Path) -> None:
    from saescope.corpus import Document, pack_windows, shakespeare_documents
    from saescope.models import load_model
    from saescope.sites import read_sites
    from saescope.store import StoreFormat, cache_activations

    lm = load_model(args.model)
    text = next(iter(shakespeare_documents())).text[: args.chars]
    docs = [Document(id="bench", text=text)]
    windows = list(pack_windows(docs, lm.tokenizer, args.context_len))
    batches = [torch.stack([w.input_ids for w in windows[i:i + args.batch_size]])
               for i in range(0, len(windows), args.batch_size)]
    rows = int(sum(int(w.mask.sum()) for w in windows))
    positions = sum(b.numel() for b in batches)
    print(f"caching: {args.model} {args.site}, {len(windows)} windows of {args.context_len} "
          f"({positions} positions, {rows} stored rows), batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}")

    def bare() -> float:
        start = time.perf_counter()
        for ids in batches:
            read_sites(lm.model, ids, [args.site])
        return time.perf_counter() - start

    import saescope.sites

    real_read_sites = saescope.sites.read_sites
    in_forward = []

    def timed_read_sites(*a, **kw):  # the forward passes inside cache_activations, timed in the same run
        start = time.perf_counter()
        try:
            return real_read_sites(*a, **kw)
        finally:
            in_forward[-1] += time.perf_counter() - start

    def cached(k: int) -> float:
        out = tmp / f"cache_{k}"
        in_forward.append(0.0)
        saescope.sites.read_sites = timed_read_sites
        start = time.perf_counter()
        try:
            cache_activations(lm, docs, [args.site], out, context_len=args.context_len,
                              batch_size=args.batch_size, store_format=StoreFormat(shard_rows=4096), progress=False)
        finally:
            saescope.sites.read_sites = real_read_sites
        elapsed = time.perf_counter() - start
        shutil.rmtree(out)
        return elapsed

    bare()  # warm-up
    t_bare, t_cache = [], []
    for k in range(args.repeats):
        t_bare.append(bare())
        t_cache.append(cached(k))
    mb, mc = statistics.median(t_bare), statistics.median(t_cache)
    print(f"  bare truncated forward : {mb:7.2f} s  {positions / mb:9.0f} positions/s   (runs {fmt(t_bare)})")
    print(f"  cache_activations      : {mc:7.2f} s  {positions / mc:9.0f} positions/s   (runs {fmt(t_cache)})")
    print(f"  caching overhead = cache/bare - 1 = {100 * (mc / mb - 1):+.1f}%  (target ≤ +10%)")
    inside = [(t - f) / f for t, f in zip(t_cache, in_forward)]
    print(f"  within each cache run, time outside the forward pass (tokenize, mask, check, write shards) / "
          f"forward time = {100 * statistics.median(inside):+.1f}%  (runs {fmt([100 * v for v in inside])} %)")


def fmt(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def bench_read(args, tmp: Path) -> None:
    from saescope.store import ActivationLoader, StoreWriter

    d, rows = args.read_d, args.read_rows
    out = tmp / "read_store"
    writer = StoreWriter(out, {"resid_post/layer_0": d}, shard_rows=16384, dtype=args.read_dtype)
    g = torch.Generator().manual_seed(0)
    for c in range(0, rows, 8192):
        n = min(8192, rows - c)
        writer.add({"resid_post/layer_0": torch.randn(n, d, generator=g)}, token_ids=torch.zeros(n),
                   document_ids=torch.zeros(n), positions=torch.arange(n))
    index = writer.close()
    files = [out / s.files["resid_post/layer_0"].path for s in index.shards]
    nbytes = sum(s.files["resid_post/layer_0"].bytes for s in index.shards)
    print(f"reading: {rows} rows × {d} {args.read_dtype} = {nbytes / 1e9:.2f} GB in {len(files)} shards "
          "(page cache warm), batch 4096, shuffle buffer 65536 rows")

    def plain() -> float:
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        start = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as handle:
                while handle.readinto(view):
                    pass
        return time.perf_counter() - start

    ld = ActivationLoader(out, batch_size=4096, shuffle_buffer=65536, seed=1)  # one long stream
    stream = iter(ld)

    def loader() -> float:  # one epoch of the stream (steady state: buffers already allocated)
        start = time.perf_counter()
        for _ in range(ld.batches_per_epoch):
            next(stream)["resid_post/layer_0"]
        return time.perf_counter() - start

    loader()  # warm-up epoch

    plain()
    t_plain, t_loader = [], []
    for _ in range(args.repeats):
        t_plain.append(plain())
        t_loader.append(loader())
    mp, ml = statistics.median(t_plain), statistics.median(t_loader)
    print(f"  plain sequential read  : {nbytes / mp / 1e9:6.2f} GB/s   (runs {fmt(t_plain)} s)")
    print(f"  ActivationLoader       : {nbytes / ml / 1e9:6.2f} GB/s   (runs {fmt(t_loader)} s; yields float32)")
    print(f"  loader / plain read = {mp / ml:.2f}")


def bench_rss(args, tmp: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = str(ROOT / "benchmarks" / "store_rss.py")
    rows = args.rss_rows
    print(f"memory: peak RSS (MiB) in a fresh process; store of {rows} and {2 * rows} rows × 256 float32, "
          "shards 2048 rows, shuffle buffer 4096 rows")
    for mode in ("write", "read"):
        line = []
        for k, n in ((1, rows), (2, 2 * rows)):
            argv = [sys.executable, script, mode, str(tmp / f"rss_{k}")] + ([str(n)] if mode == "write" else [])
            res = json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout)
            line.append(f"{k}x ({res['bytes'] / 2**20:.0f} MiB store): peak {res['peak_rss_mib']:.0f} "
                        f"(after imports {res['base_rss_mib']:.0f})")
        print(f"  {mode:5s}: " + " | ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--site", default="resid_post/layer_6")
    parser.add_argument("--chars", type=int, default=12000, help="characters of Shakespeare to cache")
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-rows", type=int, default=400_000)
    parser.add_argument("--read-d", type=int, default=640)
    parser.add_argument("--read-dtype", default="float32")
    parser.add_argument("--rss-rows", type=int, default=100_000)
    parser.add_argument("--only", choices=["cache", "read", "rss"], default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="saescope_store_bench_"))
    try:
        for name, fn in (("read", bench_read), ("rss", bench_rss), ("cache", bench_cache)):
            if args.only in (None, name):
                fn(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
