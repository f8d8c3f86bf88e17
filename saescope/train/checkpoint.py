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
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saescope.errors import SaescopeError

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
