"""Cost of the one-pass dashboard statistics against its floor: reading the store and encoding every row.

Prints tokens/s of (a) read + ``sae.encode`` only and (b) the full streaming pass (top-k with windows,
reservoir sample, counts, histogram), side by side in one process, and their ratio.

    .venv/bin/python benchmarks/dashboards_stream.py [--rows 200000] [--d-in 640] [--d-sae 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saescope.dashboards import DashboardSettings, compute_latent_stats
from saescope.dashboards.store_reader import iter_site_rows
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.store import StoreWriter

SITE = "resid_post/layer_0"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--l0", type=float, default=60.0, help="target mean firings per row")
    parser.add_argument("--block-rows", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        writer = StoreWriter(store, {SITE: args.d_in}, shard_rows=32768)
        for start in range(0, args.rows, 8192):
            n = min(8192, args.rows - start)
            writer.add({SITE: torch.randn(n, args.d_in)}, token_ids=torch.randint(0, 1000, (n,)),
                       document_ids=torch.arange(start, start + n) // 256, positions=torch.arange(n) % 256)
        index = writer.close()
        sae = JumpReLUSAE(args.d_in, args.d_sae, norm_scale=index.sites[SITE].norm_scale, seed=0, site="resid_post",
                          layer=0)
        with torch.no_grad():  # pick θ so that about l0 latents fire per row (pre-activations ~ N(0, s²))
            z = sae.pre_activations(torch.randn(2048, args.d_in))
            q = 1 - args.l0 / args.d_sae
            sae.threshold.copy_(torch.quantile(z.flatten()[:1_000_000], q).expand(args.d_sae))
        t0 = time.perf_counter()
        l0 = 0.0
        with torch.no_grad():
            for _, x in iter_site_rows(store, SITE, args.block_rows):
                l0 += float((sae.encode(x) > 0).sum())
        floor = time.perf_counter() - t0
        t0 = time.perf_counter()
        compute_latent_stats(sae, store, settings=DashboardSettings(block_rows=args.block_rows), progress=False)
        full = time.perf_counter() - t0
        print(f"rows {args.rows}, d_in {args.d_in}, d_sae {args.d_sae}, mean L0 {l0 / args.rows:.1f}, "
              f"threads {torch.get_num_threads()}")
        print(f"read + encode only : {args.rows / floor:10.0f} tok/s ({floor:.2f} s)")
        print(f"full dashboard pass: {args.rows / full:10.0f} tok/s ({full:.2f} s)")
        print(f"ratio full / floor : {full / floor:.2f}x")


if __name__ == "__main__":
    main()
