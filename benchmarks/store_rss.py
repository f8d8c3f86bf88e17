"""Peak resident memory of writing and of reading an activation store, in a fresh process.

    python benchmarks/store_rss.py write OUT ROWS [D] [SHARD_ROWS]
    python benchmarks/store_rss.py read OUT [SHUFFLE_BUFFER] [BATCH]

prints one JSON line: {"peak_rss_mib": ..., "base_rss_mib": ..., "rows": ..., "bytes": ...}. ``base`` is the
peak after imports, before any store work. Used by tests/test_store_memory.py and benchmarks/store_bench.py.
"""

from __future__ import annotations

import json
import resource
import sys


def peak_mib() -> float:
    """Peak resident set of this process. ``VmHWM`` belongs to the address space made at exec; ``ru_maxrss``
    (the fallback) would also count the parent's peak from before the fork/exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    import torch

    from saescope.store import ActivationLoader, LoaderOutput, StoreWriter

    mode, out = sys.argv[1], sys.argv[2]
    base = peak_mib()
    if mode == "write":
        rows, d = int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 256
        shard_rows = int(sys.argv[5]) if len(sys.argv) > 5 else 2048
        writer = StoreWriter(out, {"resid_post/layer_0": d}, shard_rows=shard_rows)
        g = torch.Generator().manual_seed(0)
        written, c = 0, 0
        while written < rows:
            n = min(500, rows - written)
            writer.add({"resid_post/layer_0": torch.randn(n, d, generator=g)}, token_ids=torch.zeros(n),
                       document_ids=torch.full((n,), c), positions=torch.arange(n))
            written += n
            c += 1
        index = writer.close()
        total = index.rows
        nbytes = sum(f.bytes for s in index.shards for f in s.files.values())
    else:
        buffer = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
        batch = int(sys.argv[4]) if len(sys.argv) > 4 else 512
        loader = ActivationLoader(out, batch_size=batch, shuffle_buffer=buffer, epochs=1,
                                  output=LoaderOutput(with_tokens=True))
        total, checksum = 0, 0.0
        for b in loader:
            total += b["resid_post/layer_0"].shape[0]
            checksum += float(b["resid_post/layer_0"][:, 0].sum())
        nbytes = sum(f.bytes for s in loader.index.shards for f in s.files.values())
    print(json.dumps({"peak_rss_mib": peak_mib(), "base_rss_mib": base, "rows": total, "bytes": nbytes}))


if __name__ == "__main__":
    main()
