"""torch.distributed training (saescope.distributed): two (or four) gloo processes on CPU give the same SAEs as one
process trained on the same global batches, and a checkpoint from two ranks resumes in one. Through the CLI on an
activation store (`torchrun -m saescope train`): 1, 2 and 4 processes give the same SAEs, and a run stopped on
one number of processes resumes on another.

The reference is the ordinary single-process Trainer (itself checked against autograd and float64 elsewhere);
the in-memory tests start the processes with torch.multiprocessing and a FileStore rendezvous; the store tests run
the real command lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saescope import distributed
from saescope.errors import SaescopeError
from saescope.formats import load_sae
from saescope.store import StoreWriter
from saescope.train import SAESpec, TrainConfig, Trainer
from saescope.train.checkpoint import latest_checkpoint, load_checkpoint
from saescope.train.sources import TensorBatchSource
from saescope.train.unit import TrainingUnit

SITE = "resid_post/layer_2"
D = 16
STEPS = 8


def _acts(n=1024, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(32, D, generator=gen, dtype=torch.float64)
    codes = torch.rand(n, 32, generator=gen, dtype=torch.float64) * (torch.rand(n, 32, generator=gen) < 0.15)
    x = codes @ dirs + 0.05 * torch.randn(n, D, generator=gen, dtype=torch.float64) + 1.0
    y = torch.randn(n, D, generator=gen, dtype=torch.float64) + codes[:, :D]
    return {SITE: x * 5.0, "mlp_in/layer_1": x / x.norm(dim=1, keepdim=True) * D ** 0.5, "mlp_out/layer_1": y}


def _config(out_dir, **kw) -> TrainConfig:
    base = {"saes": [SAESpec(site=SITE, width=32, sparsity_coefficient=0.02),
                     SAESpec(site="mlp_in/layer_1", width=32, sparsity_coefficient=0.01, kind="transcoder")],
            "total_tokens": STEPS * 64, "batch_size": 64, "lr": 3e-3, "lr_warmup_steps": 3,
            "sparsity_warmup_steps": 4, "log_every": 3, "checkpoint_every": 0, "out_dir": out_dir,
            "initial_threshold": 0.05, "bandwidth": 0.05, "dtype": "float64",
            # first-batch initialisation: the data-parallel run must see the global first batch
            "initial_b_dec": "mean", "initial_threshold_quantile": 0.8, "initial_exclude_top_pcs": 1,
            "threshold_lr_scale": 0.5,
            "fast_path_max_density": 1.0}     # the sparse step from step 2 on (the first step is dense)
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg: TrainConfig, data_rank: int = 0, data_shards: int = 1, max_steps: int | None = None):
    acts = _acts()
    source = TensorBatchSource(acts, cfg.batch_size, seed=11)
    if data_shards > 1:
        source = distributed.DataShard(source, data_rank, data_shards)
    scales = {k: TensorBatchSource(acts, cfg.batch_size).norm_scale(k) for k in acts}
    return Trainer(cfg, source, scales, progress=False).run(max_steps=max_steps)


def _worker(rank: int, world: int, init_file: str, cfg_json: str, max_steps: int | None, result_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig.model_validate_json(cfg_json)
        par = distributed.current(cfg.latent_shards)
        folders = _train(cfg, par.data_rank, par.data_shards, max_steps)
        with open(f"{result_file}.{rank}", "w") as fh:
            json.dump({k: str(v) for k, v in folders.items()}, fh)
    finally:
        dist.destroy_process_group()


def _spawn(cfg: TrainConfig, world: int, tmp_path, max_steps: int | None = None) -> list[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    result = str(tmp_path / f"result_{tag}")
    mp.spawn(_worker, args=(world, str(tmp_path / f"rendezvous_{tag}"), cfg.model_dump_json(), max_steps, result),
             nprocs=world, join=True)
    out = []
    for r in range(world):
        with open(f"{result}.{r}") as fh:
            out.append(json.load(fh))
    return out


def _final_state(out_dir) -> dict[str, torch.Tensor]:
    tensors, meta = load_checkpoint(latest_checkpoint(out_dir / "checkpoints"))
    assert meta["step"] == STEPS
    return {k: v for k, v in tensors.items() if k.startswith("sae")}


def _assert_same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]):
    assert ref.keys() == got.keys()
    for k, expected in ref.items():
        assert expected.shape == got[k].shape, k
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_suites(ref_folders: dict, got_folders: dict):
    assert ref_folders.keys() == got_folders.keys()
    for name, folder in ref_folders.items():
        a, b = load_sae(folder), load_sae(got_folders[name])
        for key, t in a.state_tensors().items():
            torch.testing.assert_close(b.state_tensors()[key], t, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    folders = _train(_config(out))
    state = _final_state(out)
    # the test is not vacuous: training moved the weights and both SAEs fire
    init = _config(tmp_path_factory.mktemp("init"), total_tokens=64)
    _train(init, max_steps=0)
    moved = (state["sae0/param/W_enc"] - load_checkpoint(latest_checkpoint(init.out_dir / "checkpoints"))[0][
        "sae0/param/W_enc"]).abs().max()
    assert moved > 1e-3
    assert (state["sae0/tokens_since_fired"] == 0).any() and (state["sae1/tokens_since_fired"] == 0).any()
    return state, folders


@pytest.mark.parametrize("world,latent_shards", [(2, 1), (2, 2), (4, 2)],
                         ids=["data-parallel", "latent-sharded", "data+latent"])
def test_matches_one_process(tmp_path, reference, world, latent_shards):
    ref_state, ref_folders = reference
    out = tmp_path / "run"
    results = _spawn(_config(out, latent_shards=latent_shards), world, tmp_path)
    _assert_same(ref_state, _final_state(out))
    assert all(r == results[0] for r in results)          # every rank returns the folders rank 0 wrote
    _assert_same_suites(ref_folders, results[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (STEPS // 3)                   # one writer: rank 0
    assert rows[-1]["tokens"] == 6 * 64                    # global tokens


@pytest.mark.parametrize("latent_shards", [1, 2], ids=["data-parallel", "latent-sharded"])
def test_resume_two_ranks_to_one(tmp_path, reference, latent_shards):
    ref_state, ref_folders = reference
    out = tmp_path / "run"
    cfg = _config(out, latent_shards=latent_shards)
    _spawn(cfg, 2, tmp_path, max_steps=5)
    tensors, meta = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == 5 and meta["world_size"] == 2
    assert tensors["sae0/param/W_dec"].shape == (32, D)    # full parameters, not a shard
    folders = _train(cfg)                                  # one process, the same command
    _assert_same(ref_state, _final_state(out))
    _assert_same_suites(ref_folders, folders)


@pytest.mark.parametrize("latent_shards", [1, 2], ids=["data-parallel", "latent-sharded"])
def test_resume_one_rank_to_two(tmp_path, reference, latent_shards):
    ref_state, ref_folders = reference
    out = tmp_path / "run"
    cfg = _config(out, latent_shards=latent_shards)
    _train(cfg, max_steps=3)                               # one process, stopped at step 3
    results = _spawn(cfg, 2, tmp_path)                     # two ranks pick it up
    _assert_same(ref_state, _final_state(out))
    _assert_same_suites(ref_folders, results[0])


def _own_stream_worker(rank: int, world: int, init_file: str, cfg_json: str, result_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig.model_validate_json(cfg_json)
        acts = _acts()
        source = TensorBatchSource(acts, cfg.batch_size // world, seed=rank)     # a stream of its own
        scales = {k: TensorBatchSource(acts, cfg.batch_size).norm_scale(k) for k in acts}
        try:
            Trainer(cfg, source, scales, progress=False).run(max_steps=1)
            message = "no error"
        except SaescopeError as exc:
            message = str(exc)
        with open(f"{result_file}.{rank}", "w") as fh:
            fh.write(message)
    finally:
        dist.destroy_process_group()


def test_ranks_with_streams_of_their_own_are_refused(tmp_path):
    """A checkpoint holds one global data position; ranks whose sources disagree on it cannot be resumed, so
    the first checkpoint stops with a message instead of recording one rank's position for all."""
    result = str(tmp_path / "result")
    cfg = _config(tmp_path / "run", initial_b_dec="zeros", initial_threshold_quantile=None, initial_exclude_top_pcs=0)
    mp.spawn(_own_stream_worker, args=(2, str(tmp_path / "rendezvous"), cfg.model_dump_json(), result), nprocs=2,
             join=True)
    for r in range(2):
        with open(f"{result}.{r}") as fh:
            assert "the same (global) position" in fh.read()


def test_reduce_and_copy_autograd_pair(tmp_path):
    """One process (world of one): the pair is the identity forward and backward."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        y = distributed.reduce_from_shards(distributed.copy_to_shards(x) * 2.0)
        y.sum().backward()
        torch.testing.assert_close(y, x * 2.0)
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
        assert distributed.current(1) is None              # one rank: the ordinary single-process path
    finally:
        dist.destroy_process_group()


def test_bad_grids_are_refused():
    par = distributed.Parallel(rank=1, world_size=2, data_rank=0, data_shards=1, latent_rank=1, latent_shards=2,
                               data_group=None, latent_group=None)
    assert par.latent_slice(32) == slice(16, 32)
    with pytest.raises(SaescopeError, match="multiple of latent_shards"):
        par.latent_slice(33)


def test_data_shard_splits_each_global_batch():
    acts = _acts(n=256)
    whole = list(TensorBatchSource(acts, 64, seed=3, epochs=1))
    for shards in (2, 3):                   # 64 rows: 32/32 and 21/21/22
        parts = [list(distributed.DataShard(TensorBatchSource(acts, 64, seed=3, epochs=1), r, shards))
                 for r in range(shards)]
        for b, *shares in zip(whole, *parts, strict=True):
            for site in acts:
                assert torch.equal(torch.cat([p[site] for p in shares]), b[site])


def test_single_process_path_unchanged_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == "cpu"
    assert not dist.is_initialized()
    assert os.environ.get("WORLD_SIZE") is None


# ---------------------------------------------------------------------- on an activation store (saescope train)
STORE_SITE = "resid_post/layer_1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "acts"
    gen = torch.Generator().manual_seed(0)
    writer = StoreWriter(path, {STORE_SITE: 16}, shard_rows=500)
    dirs = torch.randn(40, 16, generator=gen)
    for chunk in range(4):
        codes = torch.rand(300, 40, generator=gen) * (torch.rand(300, 40, generator=gen) < 0.1)
        writer.add({STORE_SITE: (codes @ dirs + 1.0) * 30}, token_ids=torch.arange(300),
                   document_ids=torch.full((300,), chunk), positions=torch.arange(300))
    writer.close()
    return path


STORE_CONFIG = """
batch_size = 90
lr = 3e-3
lr_warmup_steps = 3
sparsity_warmup_steps = 4
log_every = 5
checkpoint_every = 0
dtype = "float64"
seed = 3
shuffle_buffer = 256
initial_threshold = 0.05
bandwidth = 0.05
initial_b_dec = "mean"
initial_threshold_quantile = 0.8
fast_path_max_density = 1.0

[[saes]]
site = "resid_post/layer_1"
width = 32
sparsity_coefficient = 0.02
"""
STORE_BATCH, STORE_STEPS = 90, 26
"""1,200 rows: 13 global batches of 90 per epoch, so 26 steps cross an epoch; shuffle blocks of 180 rows (two
batches). 90 rows split 45/45 over 2 ranks and 22/22/23/23 over 4 (unequal shares, weighted by rows). The
first batch initialises b_dec and θ (its rows gathered from every rank)."""


def _cli_train(tmp_path, store, out, processes: int, steps: int, *flags: str):
    """`python -m saescope train` (one process) or `torchrun --nproc-per-node N -m saescope train` (gloo)."""
    config = tmp_path / "train.toml"
    config.write_text(STORE_CONFIG)
    launcher = ([sys.executable, "-m", "saescope"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                 "-m", "saescope"])
    run = subprocess.run([*launcher, "train", str(config), "--store", str(store), "--out", str(out),
                          "--total-tokens", str(steps * STORE_BATCH), *flags], check=False, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    tensors, meta = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == steps and meta["tokens_seen"] == steps * STORE_BATCH
    return tensors, meta


def _assert_close_relative(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rel: float = 1e-8):
    """Every SAE tensor (parameters, Adam moments, counters) within ``rel`` of the reference in relative norm."""
    ref = {k: v for k, v in ref.items() if k.startswith("sae")}
    assert ref.keys() == {k for k in got if k.startswith("sae")}
    for k, expected in ref.items():
        if not expected.is_floating_point():
            assert torch.equal(got[k], expected), k
            continue
        error = float((got[k].double() - expected.double()).norm())
        assert error <= rel * float(expected.double().norm()) + 1e-300, (k, error)


@pytest.fixture(scope="module")
def store_reference(store, tmp_path_factory):
    """One process through the CLI, uninterrupted."""
    tmp = tmp_path_factory.mktemp("store_one_process")
    tensors, meta = _cli_train(tmp, store, tmp / "run", 1, STORE_STEPS)
    assert meta["loader"]["epoch"] == 1 and meta["loader"]["batch"] == 13   # two whole epochs
    return tensors, meta, _metrics(tmp / "run")


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("processes", [2, 4])
def test_cli_data_parallel_on_a_store_equals_one_process(tmp_path, store, store_reference, processes):
    """`torchrun --nproc-per-node {2,4} -m saescope train` ends with the one-process SAEs (float64, 1e-8
    relative): step t trains on the same global batch whatever the number of ranks."""
    ref_tensors, ref_meta, ref_rows = store_reference
    tensors, meta = _cli_train(tmp_path, store, tmp_path / "run", processes, STORE_STEPS)
    assert meta["world_size"] == processes and meta["loader"] == ref_meta["loader"]
    _assert_close_relative(ref_tensors, tensors)
    rows = _metrics(tmp_path / "run")      # the logged statistics of the global batches (row-weighted means)
    assert len(rows) == len(ref_rows) == STORE_STEPS // 5
    for a, b in zip(ref_rows, rows):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "mse", "l0", "fvu", "dead_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["step"], key)


@pytest.mark.parametrize("first,then,stop", [(1, 2, 11), (2, 1, 15)])
def test_cli_resume_on_another_number_of_processes(tmp_path, store, store_reference, first, then, stop):
    """Stopped at step `stop` on `first` processes, resumed by the same command on `then`: the checkpoint holds the
    global data position, so the run continues the same global batches (none skipped or repeated) and ends
    where the uninterrupted one-process run ends."""
    ref_tensors, ref_meta, _ = store_reference
    out = tmp_path / "run"
    stopped, meta = _cli_train(tmp_path, store, out, first, stop)
    assert meta["loader"]["epoch"] * 13 + meta["loader"]["batch"] == stop
    tensors, meta = _cli_train(tmp_path, store, out, then, STORE_STEPS)
    assert meta["loader"] == ref_meta["loader"]
    _assert_close_relative(ref_tensors, tensors)
    # not vacuous: the resumed steps moved the weights far more than the tolerance
    W_enc = ref_tensors["sae0/param/W_enc"]
    assert float((W_enc - stopped["sae0/param/W_enc"]).norm()) > 1e-2 * float(W_enc.norm())


def test_torchrun_cli_latent_sharded_then_resume_in_one_process(tmp_path, store):
    """`torchrun --nproc-per-node 2 -m saescope train --latent-shards 2` (gloo), then the same command in one
    process resumes."""
    out = tmp_path / "run"
    flags = ["train", "--store", str(store), "--out", str(out), "--sites", STORE_SITE, "--width", "32", "--lambda",
             "0.02", "--batch-size", "100", "--lr", "3e-3", "--lr-warmup-steps", "3", "--sparsity-warmup-steps", "4",
             "--log-every", "2", "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "saescope", *flags, "--total-tokens", "400", "--latent-shards", "2"],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    tensors, meta = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["latent_shards"] == 2
    assert meta["loader"]["batch"] == 4 and "loader_ranks" not in meta
    assert tensors["sae0/param/W_enc"].shape == (16, 32)
    assert (out / "suite" / "training_summary.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [200, 400]
    run = subprocess.run([sys.executable, "-m", "saescope", *flags, "--total-tokens", "800"],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    tensors, meta = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == 8 and "world_size" not in meta
    assert meta["loader"]["batch"] == 8 and meta["loader"]["batch_size"] == 100


def test_data_parallel_matryoshka_logs_the_global_fvu(tmp_path):
    """FVU comes from the whole dictionary's error (not the Matryoshka prefix sum): under data parallel that
    error is averaged over the ranks like the rest, so the logged metrics equal one process's."""
    specs = [SAESpec(site=SITE, width=32, sparsity_coefficient=0.02, matryoshka_prefixes=[4, 12, 32],
                     target_l0=6.0)]
    one = tmp_path / "one"
    _train(_config(one, saes=specs))
    two = tmp_path / "two"
    _spawn(_config(two, saes=specs), 2, tmp_path)
    rows = {name: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            for name, out in (("one", one), ("two", two))}
    assert len(rows["one"]) == len(rows["two"]) > 0
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("loss", "mse", "l0", "fvu"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["step"], key)
    assert rows["one"][-1]["mse"] < rows["one"][-1]["loss"]       # mse is the full error, not the prefix sum


GS2_SPECS = [SAESpec(site=SITE, width=32, sparsity_coefficient=0.02, target_l0=6.0,
                     matryoshka_prefixes=[5, 12, 20, 32], matryoshka_weights=[1.0, 0.5, 2.0, 1.0]),
             SAESpec(site="mlp_in/layer_1", width=32, kind="transcoder", skip=True, target_l0=5.0)]


@pytest.fixture(scope="module")
def gs2_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("gs2_one_process")
    folders = _train(_config(out, saes=GS2_SPECS))
    return _final_state(out), folders, out


@pytest.mark.parametrize("world,latent_shards", [(2, 2), (4, 2)], ids=["latent-sharded", "data+latent"])
def test_gemma_scope_2_options_under_latent_sharding(tmp_path, gs2_reference, world, latent_shards):
    """Target-L0, Matryoshka prefixes that cut across the shards' latent slices (20 of 16 + 16) and a skip
    transcoder (W_skip replicated) trained on split latents end where one process ends (float64, 1e-10)."""
    ref_state, ref_folders, ref_out = gs2_reference
    out = tmp_path / "run"
    results = _spawn(_config(out, saes=GS2_SPECS, latent_shards=latent_shards), world, tmp_path)
    state = _final_state(out)
    assert state["sae1/param/W_skip"].abs().max() > 0 and state["sae1/param/W_skip"].shape == (D, D)
    _assert_same(ref_state, state)
    _assert_same_suites(ref_folders, results[0])
    rows, ref_rows = ([json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()]
                      for o in (out, ref_out))
    assert len(rows) == len(ref_rows) > 0
    for a, b in zip(ref_rows, rows):
        for key in ("loss", "mse", "l0", "fvu"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["sae"], a["step"], key)


BATCH_TARGET = [SAESpec(site=SITE, width=32, sparsity_coefficient=0.02, target_l0=6.0, target_l0_over="batch")]


def test_batch_target_l0_under_latent_sharding_and_refused_data_parallel(tmp_path):
    """The batch-mean target-L0 penalty reads L0 summed over the latent shards: two shards end where one process
    ends (float64); data shards, which would each see only their rows' mean, are refused before training."""
    one = tmp_path / "one"
    _train(_config(one, saes=BATCH_TARGET))
    out = tmp_path / "run"
    _spawn(_config(out, saes=BATCH_TARGET, latent_shards=2), 2, tmp_path)
    _assert_same(_final_state(one), _final_state(out))
    grid = distributed.Parallel(rank=0, world_size=2, data_rank=0, data_shards=2, latent_rank=0, latent_shards=1,
                                data_group=None, latent_group=None)
    with pytest.raises(SaescopeError, match="target_l0_over = 'batch'"):
        TrainingUnit(BATCH_TARGET[0], _config(tmp_path / "dp", saes=BATCH_TARGET), 1.0, D, D, parallel=grid)
