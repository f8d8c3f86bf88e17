"""The CUDA path end to end, for a lent GPU: correctness of the sparse step, exact resume, trainer throughput.

Run on a machine with a GPU (CI never does)::

    python benchmarks/cuda_check.py                 # all parts, ~2-4 min on an H100
    python benchmarks/cuda_check.py --device cpu --small   # the same checks on the CPU, small shapes

1. ``step``: the sparse step in float32 on the device vs the dense autograd step in float64 on the CPU, on random
   data with latents on both sides of the threshold and inside the bandwidth window (SAE with and without the
   pre-encoder bias, transcoder, target-L0, Matryoshka, skip transcoder): the relative error of the loss and of
   every gradient.
2. ``resume``: the trainer on the device, 2N steps straight vs N steps + checkpoint + resume for N, two SAEs and a
   transcoder: the largest weight difference (bitwise on the CPU; on CUDA ``index_add_`` sums in a
   nondeterministic order, so a few float32 ulps are expected).
3. ``throughput``: the trainer's steps on in-memory batches (3 SAEs of width ``--width`` at L0 ≈ 64 reached by
   training) vs the encoder products alone (3 × ``x @ W_enc``): tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.train import SAESpec, TrainConfig, Trainer
from saescope.train.fast_path import dense_training_step, sparse_training_step
from saescope.train.sources import TensorBatchSource
from saescope.train.step import LossOptions, SAEParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_step(device: str, d_in: int, d_sae: int, batch: int) -> float:
    """Sparse step (float32, device) vs dense step (float64, CPU); returns the worst relative error."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    cases = (("sae", True, {}), ("sae", False, {}), ("transcoder", False, {}),
             ("sae", True, {"target_l0": 5.0}),
             ("sae", True, {"matryoshka_prefixes": [d_sae // 8, d_sae // 2, d_sae],
                            "matryoshka_weights": [0.5, 1.0, 2.0]}),
             ("skip", False, {"target_l0": 5.0}),
             ("sae", True, {"target_l0": 5.0, "frequency_penalty": 2.0, "frequency_cap": 0.01}))
    for kind, pre_bias, options in cases:
        if kind == "sae":
            ref = JumpReLUSAE(d_in, d_sae, 1.0, dtype=torch.float64, apply_b_dec_to_input=pre_bias, seed=1,
                              bandwidth=0.05)
        else:
            ref = JumpReLUTranscoder(d_in, d_sae, 1.0, dtype=torch.float64, seed=1, bandwidth=0.05,
                                     skip=kind == "skip")
        x = torch.randn(batch, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5 * 3
        y = torch.randn(batch, d_in, generator=gen, dtype=torch.float64) if kind != "sae" else None
        with torch.no_grad():
            ref.b_dec.copy_(torch.randn(d_in, generator=gen, dtype=torch.float64) * 0.01)
            ref.b_enc.copy_(torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.01)
            if kind == "skip":
                ref.W_skip.copy_(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64) * 0.05)
            z = ref.pre_activations(x)
            # thresholds at a high per-latent quantile: some pairs active, some inside the window; then moved
            # off any pair within 1e-4 of a decision boundary (z = θ, |z − θ| = ε/2), where float32 on the
            # device and float64 here may legitimately decide differently
            theta = torch.quantile(z, 0.97, dim=0).clamp_min(0.01)
            for _ in range(100):
                u = z - theta
                near = ((u.abs() < 1e-4) | ((u.abs() - 0.025).abs() < 1e-4)).any(dim=0)
                if not near.any():
                    break
                theta = theta + 3e-4 * near
            ref.threshold.copy_(theta)
        inside = int(((z - ref.threshold).abs() < 0.025).sum())
        loss = LossOptions(0.01, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        dense = dense_training_step(ref, x, loss, y)
        on_device = SAEParams.of(ref)
        on_device = SAEParams(**{k: v.float().to(device) if isinstance(v, torch.Tensor) else v
                                 for k, v in vars(on_device).items()})
        sparse = sparse_training_step(on_device, x.float().to(device), None if y is None else y.float().to(device),
                                      loss)
        errs = {k: _rel(sparse.grads[k], dense.grads[k]) for k in dense.grads}
        errs["loss"] = abs(sparse.loss - dense.loss) / abs(dense.loss)
        worst = max(worst, *errs.values())
        label = f"{kind} pre-bias {pre_bias} {'+'.join(k for k in options if k != 'matryoshka_weights') or 'plain'}"
        print(f"  step {label:<42} window pairs {inside:>6}: "
              + " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    return worst


def _specs(width: int) -> list[SAESpec]:
    return [SAESpec(site="resid_post/layer_1", width=width, sparsity_coefficient=1e-3),
            SAESpec(site="resid_post/layer_1", width=width, sparsity_coefficient=1e-2),
            SAESpec(site="mlp_in/layer_1", width=width, sparsity_coefficient=3.0, kind="transcoder")]


def _acts(n: int, d: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    dirs = torch.randn(8 * d, d, generator=gen)
    codes = torch.rand(n, 8 * d, generator=gen) * (torch.rand(n, 8 * d, generator=gen) < 0.01)
    x = codes @ dirs + 0.05 * torch.randn(n, d, generator=gen) + 0.5
    return {"resid_post/layer_1": x * 40.0, "mlp_in/layer_1": x / x.norm(dim=1, keepdim=True) * d ** 0.5,
            "mlp_out/layer_1": torch.tanh(x) @ torch.randn(d, d, generator=gen) * 3.0}


def _config(out: Path, specs, steps: int, batch: int, device: str, **kw) -> TrainConfig:
    return TrainConfig(saes=specs, total_tokens=steps * batch, batch_size=batch, lr=1e-3, lr_warmup_steps=5,
                       sparsity_warmup_steps=10, threshold_parameterization="direct", initial_b_dec="mean",
                       initial_threshold_quantile=0.99, checkpoint_every=0, log_every=10_000, out_dir=out,
                       device=device, **kw)


def _trainer(cfg: TrainConfig, acts: dict[str, torch.Tensor]) -> Trainer:
    source = TensorBatchSource(acts, cfg.batch_size, seed=5)
    return Trainer(cfg, source, {k: source.norm_scale(k) for k in acts}, progress=False)


def check_resume(device: str, width: int, batch: int, d: int) -> float:
    acts = _acts(batch * 16, d)
    with tempfile.TemporaryDirectory() as tmp:
        straight = _trainer(_config(Path(tmp) / "a", _specs(width), 12, batch, device), acts)
        straight.run()
        first = _trainer(_config(Path(tmp) / "b", _specs(width), 12, batch, device), acts)
        first.run(max_steps=6)
        first.save_checkpoint()
        second = _trainer(_config(Path(tmp) / "b", _specs(width), 12, batch, device), acts)
        second.run()
        again = _trainer(_config(Path(tmp) / "c", _specs(width), 12, batch, device), acts)
        again.run()

        def diff(a: Trainer, b: Trainer) -> float:
            worst = 0.0
            for u, v in zip(a.units, b.units):
                for k, t in u.module.state_tensors().items():
                    worst = max(worst, float((t - v.module.state_tensors()[k]).abs().max()))
            return worst

        worst, noise = diff(straight, second), diff(straight, again)
        print(f"  resume: 12 straight vs 6 + resume + 6 steps, {len(straight.units)} units, max |Δweight| {worst:.2e}"
              f" (bitwise: {worst == 0.0}); two straight runs differ by {noise:.2e} (run-to-run nondeterminism)",
              flush=True)
    return worst


def check_throughput(device: str, width: int, batch: int, d: int, steps: int) -> None:
    acts = _acts(batch * 8, d)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp), _specs(width), 10_000, batch, device, fast_path_max_density=0.05)
        trainer = _trainer(cfg, acts)
        trainer.run(max_steps=40)         # warm-up and let L0 fall (the sparse step takes over below 5%)
        l0 = [u.density * u.spec.width for u in trainer.units]
        # time the units' steps (what one trainer step runs) on device-resident batches
        batches = [{k: v[i * batch:(i + 1) * batch].to(device) for k, v in acts.items()} for i in range(4)]
        step_times = []
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            for u in trainer.units:
                u.step(batches[i % 4], 10_000, cfg, cfg.lr)
            _sync(device)
            step_times.append(time.perf_counter() - t0)
        train_s = statistics.median(step_times)
        x = acts["resid_post/layer_1"][:batch].to(device) / 40.0
        enc = [u.module.W_enc.detach() for u in trainer.units]
        times = []
        for _ in range(steps):
            _sync(device)
            t1 = time.perf_counter()
            for w in enc:
                x @ w
            _sync(device)
            times.append(time.perf_counter() - t1)
        floor_s = statistics.median(times)
    print(f"  throughput: 3 units of width {width} (L0 {', '.join(f'{v:.0f}' for v in l0)}), batch {batch}: "
          f"trainer {batch / train_s:,.0f} tokens/s ({train_s * 1e3:.1f} ms/step); 3 encoder products alone "
          f"{floor_s * 1e3:.1f} ms -> step / floor {train_s / floor_s:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--parts", default="step,resume,throughput")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True) (needs CUBLAS_WORKSPACE_CONFIG=:4096:8 on CUDA)")
    args = parser.parse_args()
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    device = args.device
    if device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    parts = args.parts.split(",")
    small = args.small
    if "step" in parts:
        worst = check_step(device, 32 if small else 256, 256 if small else 4096, 128 if small else 2048)
        print(f"step: worst relative error {worst:.1e} ({'ok' if worst < 1e-4 else 'TOO LARGE'})", flush=True)
    if "resume" in parts:
        check_resume(device, 64 if small else 4096, 64 if small else 1024, 16 if small else 640)
    if "throughput" in parts:
        for width in ((128,) if small else (16384, 65536)):
            check_throughput(device, width, 128 if small else 4096, 16 if small else 640, 5 if small else 30)


if __name__ == "__main__":
    main()
