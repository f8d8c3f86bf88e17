"""Training-step speed: dense reference vs the sparse fast path vs SAELens, on the same batches.

Protocol (shared/reference/benchmark-protocol.md): d_in = 640, d_sae = 16384, batch 4096, float32; the
thresholds are set so that L0 ≈ 64 on the benchmark batch (reported); in one process, alternating rounds of

- ``floor``   — the encoder product alone, ``x @ W_enc`` (the one full-size product every step needs);
- ``floor_out`` — the same product written into a reused buffer (no fresh 268 MB allocation: the stricter
  floor, since the fast step reuses its buffer too);
- ``dense``   — saescope's plain step: ``training_forward`` + autograd + decoder projection + Adam + renorm;
- ``fast``    — saescope's sparse step (the trainer's default: on the compiled CPU kernels where a C++
  compiler is found), same update;
- ``fast_torch`` — the same sparse step on torch ops (``cpu_kernels=False``; CPU only);
- ``saelens`` — SAELens ``JumpReLUTrainingSAE.training_forward_pass`` + backward + ``torch.optim.Adam``
  (if sae-lens is installed);

medians of ``--repeats`` timed runs after one warm-up each. Prints tokens/s and the ratios fast/SAELens
(throughput) and fast/floor (step time), with the machine's load average (other processes on a shared CPU
slow every step; compare only the ratios of one run).

    python benchmarks/train_step_speed.py                  # the protocol's shapes
    python benchmarks/train_step_speed.py --d-sae 4096     # the second width
    python benchmarks/train_step_speed.py --device cuda    # on a GPU
    python benchmarks/train_step_speed.py --device cuda --quick   # 3 repeats (a short GPU slot)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from saescope.train.config import SAESpec, TrainConfig
from saescope.train.unit import TrainingUnit


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--l0", type=float, default=64.0, help="target active latents per token")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 timed repeats instead of --repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", action="append", default=[],
                        help="floor, floor_out, dense, fast, fast_torch or saelens (repeat)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    device = args.device
    torch.manual_seed(0)

    # Batches: a sparse mixture of directions plus noise, scaled to E‖x‖² = 1 (what the trainer sees).
    gen = torch.Generator().manual_seed(1)
    dirs = torch.randn(4 * args.d_in, args.d_in, generator=gen)
    batches = []
    for _ in range(2):
        codes = torch.rand(args.batch, 4 * args.d_in, generator=gen) * (
            torch.rand(args.batch, 4 * args.d_in, generator=gen) < 0.02)
        x = codes @ dirs + 0.1 * torch.randn(args.batch, args.d_in, generator=gen)
        batches.append(x)
    scale = float(torch.cat(batches).pow(2).sum(1).mean().sqrt())
    batches = [(b / scale).to(device) for b in batches]

    site = "resid_post/layer_6"
    spec = SAESpec(site=site, width=args.d_sae, sparsity_coefficient=1e-3)

    def make_unit(fast: bool, kernels: bool = True) -> TrainingUnit:
        cfg = TrainConfig(saes=[spec], total_tokens=10 * args.batch, batch_size=args.batch, device=device,
                          fast_path=fast, fast_path_max_density=1.0, sparsity_warmup_steps=0, lr_warmup_steps=0,
                          cpu_kernels=kernels)
        unit = TrainingUnit(spec, cfg, 1.0, args.d_in, args.d_in)
        unit.density = 0.0      # time the path asked for from the first step
        with torch.no_grad():   # one threshold for all latents at the quantile that gives L0 ≈ target
            z = unit.module.pre_activations(batches[0][:512]).flatten()
            sample = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(2))[:1_000_000]
                       .to(z.device)]
            q = torch.quantile(sample.float().cpu(), 1 - args.l0 / args.d_sae).item()
            unit.module.threshold.fill_(q)
            if unit.log_threshold is not None:
                unit.log_threshold.copy_(torch.log(unit.module.threshold))
        return unit, cfg

    fast_unit, fast_cfg = make_unit(True)
    torch_unit, torch_cfg = make_unit(True, kernels=False)
    dense_unit, dense_cfg = make_unit(False)
    with torch.no_grad():
        l0 = float((fast_unit.module.pre_activations(batches[0]) > fast_unit.module.threshold).sum(1).float().mean())

    runners = {}
    W_enc = fast_unit.module.W_enc.detach().t().contiguous().t().contiguous()   # plain [d_in, d_sae] layout
    counter = {"i": 0}

    def batch():
        counter["i"] += 1
        return batches[counter["i"] % len(batches)]

    runners["floor"] = lambda: batch() @ W_enc
    product = torch.empty(args.batch, args.d_sae, device=device)
    runners["floor_out"] = lambda: torch.mm(batch(), W_enc, out=product)
    runners["dense"] = lambda: dense_unit.step({site: batch()}, 0, dense_cfg, dense_cfg.lr)
    runners["fast"] = lambda: fast_unit.step({site: batch()}, 0, fast_cfg, fast_cfg.lr)
    if device == "cpu":
        runners["fast_torch"] = lambda: torch_unit.step({site: batch()}, 0, torch_cfg, torch_cfg.lr)

    try:
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        JumpReLUTrainingSAE = None
        print("sae-lens is not installed: skipping its step")
    if JumpReLUTrainingSAE is not None and "saelens" not in args.skip:
        sl_cfg = JumpReLUTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, device=device,
                                           jumprelu_bandwidth=0.001, jumprelu_init_threshold=0.001)
        sl = JumpReLUTrainingSAE(sl_cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                getattr(sl, name).copy_(getattr(fast_unit.module, name).detach())
        sl_opt = torch.optim.Adam(sl.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8)

        def saelens_step():
            out = sl.training_forward_pass(TrainStepInput(sae_in=batch(), coefficients={"l0": 1e-3},
                                                          dead_neuron_mask=None, n_training_steps=0,
                                                          is_logging_step=False))
            out.loss.backward()
            sl_opt.step()
            sl_opt.zero_grad(set_to_none=True)

        runners["saelens"] = saelens_step
    for name in args.skip:
        runners.pop(name, None)

    load = f"{os.getloadavg()[0]:.2f}"
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():       # warm-up
        run()
        _sync(device)
    for _ in range(args.repeats):            # alternating rounds
        for name, run in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name}), torch {torch.__version__}; d_in {args.d_in}, "
          f"d_sae {args.d_sae}, batch {args.batch}, float32; L0 on the benchmark batch {l0:.1f}; "
          f"medians of {args.repeats}; load average {load} before, {os.getloadavg()[0]:.2f} after")
    print(f"{'step':<10} {'ms':>10} {'tokens/s':>12}")
    for name, t in median.items():
        print(f"{name:<10} {t * 1e3:>10.1f} {args.batch / t:>12,.0f}")
    if "fast" in median:
        if "saelens" in median:
            print(f"fast / SAELens throughput: {median['saelens'] / median['fast']:.2f}x  (target >= 5)")
        if "dense" in median:
            print(f"fast / dense throughput:   {median['dense'] / median['fast']:.2f}x")
        if "fast_torch" in median:
            print(f"fast / fast on torch ops:  {median['fast_torch'] / median['fast']:.2f}x")
        if "floor" in median:
            print(f"fast step time / encoder product: {median['fast'] / median['floor']:.2f}x  (target <= 1.5)")
        if "floor_out" in median:
            print(f"fast step time / encoder product into a reused buffer: "
                  f"{median['fast'] / median['floor_out']:.2f}x")


if __name__ == "__main__":
    main()
