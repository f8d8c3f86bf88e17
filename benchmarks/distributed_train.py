"""Distributed training speed: the same run (global batch, steps, SAE) in one process, then in ``--world``
gloo processes as data parallel, latent sharded and (with 4+) both. Prints tokens/s of each and the ratio to
one process, and the largest weight difference from the one-process run (they must agree to float rounding).

On CPU with few cores this measures the communication overhead more than any speed-up (the ranks share the
cores); on GPUs run the same code with NCCL: ``--device cuda`` (needs ``--world`` GPUs).

    .venv/bin/python benchmarks/distributed_train.py [--world 2] [--d 256] [--width 4096] [--batch 1024]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saescope import distributed
from saescope.train import SAESpec, TrainConfig, Trainer
from saescope.train.checkpoint import latest_checkpoint, load_checkpoint
from saescope.train.sources import TensorBatchSource

SITE = "resid_post/layer_0"


def _config(args, out: Path, latent_shards: int = 1) -> TrainConfig:
    return TrainConfig(saes=[SAESpec(site=SITE, width=args.width, sparsity_coefficient=1e-3)],
                       total_tokens=args.steps * args.batch, batch_size=args.batch, lr=1e-3, lr_warmup_steps=2,
                       sparsity_warmup_steps=4, checkpoint_every=0, log_every=10_000, out_dir=out,
                       device=args.device, latent_shards=latent_shards, fast_path=not args.dense)


def _data(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {SITE: torch.randn(args.batch * args.steps, args.d, generator=g) * 3 + 1}


def _run(args, cfg: TrainConfig, rank: int = 0, shards: int = 1) -> float:
    data = _data(args)
    source = TensorBatchSource(data, args.batch, seed=1)
    if shards > 1:
        source = distributed.DataShard(source, rank, shards)
    trainer = Trainer(cfg, source, {SITE: source.norm_scale(SITE)}, {SITE: args.d}, progress=False)
    if shards > 1 or cfg.latent_shards > 1:
        dist.barrier()
    start = time.perf_counter()
    trainer.run()
    return time.perf_counter() - start


def _worker(rank, world, init, args, out, latent_shards, result):
    torch.set_num_threads(max(1, args.threads // world))
    if args.device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", init_method=f"file://{init}",
                            rank=rank, world_size=world)
    try:
        cfg = _config(args, Path(out), latent_shards)
        par = distributed.current(latent_shards)
        if args.device.startswith("cuda"):
            cfg = cfg.model_copy(update={"device": f"cuda:{rank}"})
        seconds = _run(args, cfg, par.data_rank, par.data_shards)
        if rank == 0:
            Path(result).write_text(str(seconds))
    finally:
        dist.destroy_process_group()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(latest_checkpoint(out / "checkpoints"))[0].items() if "/param/" in k}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dense", action="store_true", help="no sparse fast path")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.steps * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = tmp / "one"
        _run(args, _config(args, tmp / "warm-up"))        # first-use costs (allocations, lazy imports) off the clock
        seconds = _run(args, _config(args, one))
        ref = _weights(one)
        print(f"1 process: {tokens / seconds:,.0f} tok/s ({seconds:.2f} s, {args.steps} steps of {args.batch})")
        modes = [("data parallel", 1), ("latent sharded", args.world)]
        if args.world >= 4 and args.world % 2 == 0:
            modes.append(("data+latent", 2))
        for name, latent_shards in modes:
            out, result = tmp / name.replace(" ", "_"), tmp / f"{name}.txt"
            mp.spawn(_worker, args=(args.world, str(tmp / f"rdv_{latent_shards}"), args, str(out), latent_shards,
                                    str(result)), nprocs=args.world, join=True)
            t = float(result.read_text())
            diff = max(float((w - ref[k]).abs().max()) for k, w in _weights(out).items())
            print(f"{args.world} ranks, {name}: {tokens / t:,.0f} tok/s ({t:.2f} s), {seconds / t:.2f}× one "
                  f"process; max |Δweight| vs one process {diff:.2e}")


if __name__ == "__main__":
    main()
