"""Checkpoints for exact resume: one safetensors file of tensors plus one JSON file of everything else.

Layout under ``<run>/checkpoints/``::

    step_00001000/state.safetensors   all SAE parameters, optimizer moments, dead-latent counters, RNG bytes
    step_00001000/meta.json           step, tokens, config fingerprint, loader position, RNG states, sha256
    latest                            the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed when complete, and ``latest`` is
replaced atomically, so an interrupted write never leaves a half checkpoint as the newest one. The JSON
records the SHA-256 of the tensor file; a corrupt, truncated or foreign checkpoint raises
:class:`CheckpointError` saying what is wrong and how to start over. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saescope import distributed
from saescope.errors import SaescopeError
from saescope.train.compat import config_differences
from saescope.version import __version__

if TYPE_CHECKING:   # the trainer calls this module: no import back at run time
    from saescope.train.trainer import Trainer

FORMAT = "saescope-train-checkpoint"
FORMAT_VERSION = 1
KEEP = 2


class CheckpointError(SaescopeError):
    """A checkpoint that cannot be resumed from (corrupt, incomplete, or made by a different run)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- nested state ↔ (tensors, JSON)
def split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensor / array leaves of a nested dict/list into ``tensors`` (keys ``prefix/path``); the rest is
    returned as JSON-able data with ``{"__tensor__": key}`` placeholders."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(state))
        return {"__tensor__": prefix, "__numpy__": True}
    if isinstance(state, dict):
        for key in state:
            if not isinstance(key, str):
                raise CheckpointError(f"cannot checkpoint loader state with non-string key {key!r} at {prefix}")
        return {k: split_state(v, f"{prefix}/{k}", tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [split_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    if isinstance(state, (np.integer, np.floating)):
        return state.item()
    raise CheckpointError(f"cannot checkpoint a {type(state).__name__} at {prefix}: loader state must be "
                          "made of dicts, lists, numbers, strings and tensors")


def join_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            t = tensors[data["__tensor__"]]
            return t.numpy() if data.get("__numpy__") else t
        return {k: join_state(v, tensors) for k, v in data.items()}
    if isinstance(data, list):
        return [join_state(v, tensors) for v in data]
    return data


# ---------------------------------------------------------------------- RNG states
def capture_rng(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy and Python RNG states; bytes go to ``tensors``."""
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    return {"numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next],
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(meta.get("cuda_devices", 0))]
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------- save / load
def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = KEEP) -> Path:
    """Write ``step_<step>/`` under ``folder`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = folder / f".tmp_{name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensor_path = tmp / "state.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tensor_path),
              metadata={"format": FORMAT})
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                 "sha256": _sha256(tensor_path), **meta}
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1) + "\n")
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = folder / f".latest_{os.getpid()}"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, folder / "latest")
    old = sorted(p for p in folder.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or ``None`` if there is none."""
    folder = Path(folder)
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = folder / name
    if not name.startswith("step_") or not path.is_dir():
        raise CheckpointError(f"{pointer} names checkpoint {name!r}, which is missing; delete {folder} to "
                              "start the run over")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify one checkpoint folder: returns ``(tensors, meta)``."""
    path = Path(path)
    meta_path, tensor_path = path / "meta.json", path / "state.safetensors"
    advice = f"delete {path.parent} (or point the run at a new out_dir) to start over"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} has no meta.json; {advice}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {meta_path} is not valid JSON ({exc}); {advice}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a saescope training checkpoint; {advice}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format_version {meta['format_version']}; this saescope reads "
                              f"<= {FORMAT_VERSION}: upgrade saescope")
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no state.safetensors; {advice}")
    digest = _sha256(tensor_path)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {tensor_path} is corrupt: its SHA-256 is {digest[:12]}… but "
                              f"meta.json recorded {str(meta.get('sha256'))[:12]}…; {advice}")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {tensor_path}: {exc}; {advice}") from exc
    return tensors, meta


# ---------------------------------------------------------------------- a trainer's state
def training_meta(trainer: Trainer) -> dict[str, Any]:
    """Everything of a trainer's state that is not a tensor: config and fingerprint, tokens, norm scales, the
    SAEs' names, log windows, densities and λ."""
    units = trainer.units
    return {
        "saescope_version": __version__, "fingerprint": trainer.config.fingerprint(),
        "config": trainer.config.model_dump(mode="json"), "tokens_seen": trainer.tokens_seen,
        "norm_scales": trainer.norm_scales, "saes": [u.spec.name for u in units],
        "windows": [u.window for u in units], "last": [u.last for u in units],
        "last_logged": [u.last_logged for u in units], "density": [u.density for u in units],
        "lambda_base": [u.lambda_base for u in units],
    }


def save_training(trainer: Trainer) -> Path:
    """Write a checkpoint of the trainer (the full SAEs, Adam, counters, RNGs, the data position). Under
    torch.distributed every rank must call: latent slices are gathered, every data rank's loader position is
    checked to be the same global one, and rank 0 alone writes."""
    par = trainer.parallel
    tensors: dict[str, torch.Tensor] = {}
    for i, unit in enumerate(trainer.units):
        prefix = unit_prefix(i)
        state = unit.state_tensors(prefix)
        if unit.latents is not None:
            state = distributed.gather_latents(state, prefix, par.latent_group, par.latent_shards)
        tensors.update(state)
    meta = training_meta(trainer)
    meta["rng"] = capture_rng(tensors)
    position = trainer.stream.position()
    if position is not None:
        # the global data position: the same on every rank (the sources walk the same global batches)
        if par is not None and par.data_shards > 1 and not all(
                _same_position(other, position) for other in distributed.all_gather_object(position)):
            raise SaescopeError(
                "under data parallel every rank's batch source must report the same (global) position: give "
                "each rank its share of one global source (saescope.distributed.DataShard, or an "
                "ActivationLoader with rank/world_size), not a stream of its own")
        meta["loader"] = split_state(position, "loader", tensors)
    else:
        meta["loader"] = None
    folder = trainer.checkpoint_dir
    if par is None:
        return save_checkpoint(folder, trainer.step, tensors, meta)
    meta["world_size"], meta["latent_shards"] = par.world_size, par.latent_shards
    path = save_checkpoint(folder, trainer.step, tensors, meta) if par.is_main else None
    distributed.barrier()
    return path if path is not None else folder / f"step_{trainer.step:08d}"


def resume_training(trainer: Trainer) -> Path | None:
    """Load the newest checkpoint of the trainer's run into it (its units already built) and move its batch
    stream to the checkpoint's position; returns the checkpoint, or None when there is none. A checkpoint of a
    different config, SAE list or activations raises :class:`CheckpointError` saying what differs
    (:mod:`saescope.train.compat` decides which differences a resume allows)."""
    path = latest_checkpoint(trainer.checkpoint_dir)
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    _check_same_run(trainer, path, meta)
    for i, unit in enumerate(trainer.units):
        prefix = unit_prefix(i)
        unit.load_state_tensors(prefix, tensors if unit.latents is None else
                                distributed.slice_latents(tensors, prefix, unit.latents))
        unit.window = dict(meta["windows"][i])
        unit.last = dict(meta["last"][i])
        unit.last_logged = dict(meta["last_logged"][i])
        unit.density = float(meta["density"][i])
        saved_lambda = (meta.get("lambda_base") or [None] * len(trainer.units))[i]
        if saved_lambda is not None:
            unit.lambda_base = float(saved_lambda)
        elif unit.lambda_base is None:
            raise CheckpointError(f"the checkpoint in {path} does not record λ of {unit.spec.name}; use a new "
                                  "out_dir")
    trainer.step = int(meta["step"])
    trainer.tokens_seen = int(meta["tokens_seen"])
    restore_rng(meta["rng"], tensors)
    saved_ranks = [join_state(state, tensors) for state in meta.get("loader_ranks") or []]
    if any(state != saved_ranks[0] for state in saved_ranks):
        raise CheckpointError(
            f"the checkpoint in {path} records one data position per rank (an older saescope, where each data "
            "rank read its own stream); it cannot continue the same rows here; use a new out_dir")
    shards = trainer.parallel.data_shards if trainer.parallel is not None else 1
    saved_shards = int(meta.get("world_size", 1)) // int(meta.get("latent_shards", 1))
    if saved_shards != shards:
        trainer.log_line(f"resuming on {shards} data rank(s) from a checkpoint of {saved_shards}: the same "
                         "global batches continue")
    loader_state = meta.get("loader")
    trainer.stream.seek(None if loader_state is None or not trainer.stream.resumable
                        else join_state(loader_state, tensors), trainer.step)
    return path


def unit_prefix(index: int) -> str:
    """The tensor-name prefix of the ``index``-th SAE of a checkpoint."""
    return f"sae{index}"


def _check_same_run(trainer: Trainer, path: Path, meta: dict[str, Any]) -> None:
    if meta.get("fingerprint") != trainer.config.fingerprint():
        # no setting differs: the same config under an older fingerprint rule (one that hashed `model`)
        diffs = config_differences(meta.get("config", {}), trainer.config.model_dump(mode="json"))
        if diffs:
            raise CheckpointError(
                f"the checkpoint in {path} was made with a different config (differs in: {', '.join(diffs)}); "
                f"use a new out_dir, or delete {trainer.checkpoint_dir} to start over")
    names = [u.spec.name for u in trainer.units]
    if meta.get("saes") != names:
        raise CheckpointError(f"the checkpoint in {path} trains {meta.get('saes')}, not {names}")
    saved_scales = meta.get("norm_scales", {})
    for site in {u.spec.site for u in trainer.units}:
        if saved_scales.get(site) != trainer.norm_scales[site]:
            raise CheckpointError(
                f"the checkpoint in {path} used norm scale {saved_scales.get(site)} for {site} but this run has "
                f"{trainer.norm_scales[site]}: the activations changed; use a new out_dir")


def _same_position(a: Any, b: Any) -> bool:
    """Whether two batch-source positions are equal (positions holding tensors are taken as equal)."""
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return True
