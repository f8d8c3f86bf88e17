"""Shard files of the activation store: safetensors written atomically, read straight into a buffer.

A shard file is plain safetensors (no pickle): an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the raw data. Writing goes through a temporary
file in the same folder, ``fsync`` and ``os.replace``, so a reader (or a resumed run) sees either the old
state or the whole new file, never half of one. Reading parses the header once and copies a row range
from the file into a caller's buffer with one ``readinto`` (no mmap, so resident memory stays at the
size of the buffer, not of the file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

from saescope.errors import SaescopeError

STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8,
}


def storage_error(exc: OSError, path: Path | str, action: str) -> SaescopeError:
    """Turn an ``OSError`` met while writing the store into a message saying what happened and what to do."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        why = "the disk is full"
        fix = "free some space (or pass a smaller --max-tokens / another --out)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied"
        fix = "make the folder writable (or choose another --out)"
    else:
        why = exc.strerror or str(exc)
        fix = "fix the cause"
    return SaescopeError(
        f"could not {action} {path}: {why} ({exc.__class__.__name__}: {exc}). "
        f"The store is left resumable: {fix}, then run the same command again to continue where it stopped."
    )


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + ``os.replace`` (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_shard_file(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one safetensors shard atomically; return ``{"path", "bytes", "sha256"}`` for the index."""
    data = safetensors_save({name: t.contiguous() for name, t in tensors.items()})
    atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def sha256_file(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorLayout:
    """Where one 2-D (or 1-D) tensor's bytes lie in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of element 0 in the file

    @property
    def row_bytes(self) -> int:
        width = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        return width * torch.empty((), dtype=self.dtype).element_size()


def read_layout(path: Path) -> dict[str, TensorLayout]:
    """Parse a safetensors header (8-byte length + JSON) into tensor layouts."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise SaescopeError(f"{path}: truncated shard file (no safetensors header); "
                                    "re-run `saescope cache` with the same arguments to rewrite it")
            (size,) = struct.unpack("<Q", head)
            header = json.loads(handle.read(size))
    except OSError as exc:
        raise SaescopeError(f"cannot read shard {path}: {exc}") from exc
    layouts = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise SaescopeError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        layouts[name] = TensorLayout(_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                     8 + size + int(info["data_offsets"][0]))
    return layouts


def read_rows_into(handle, layout: TensorLayout, start: int, stop: int, out: torch.Tensor) -> None:
    """Copy rows ``[start, stop)`` of a tensor from an open file into ``out`` (contiguous, same dtype)."""
    if out.dtype != layout.dtype or not out.is_contiguous():
        raise ValueError("out must be contiguous with the stored dtype")
    nbytes = (stop - start) * layout.row_bytes
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    if len(view) != nbytes:
        raise ValueError(f"out holds {len(view)} bytes, rows {start}:{stop} need {nbytes}")
    handle.seek(layout.offset + start * layout.row_bytes)
    got = handle.readinto(view)
    if got != nbytes:
        raise SaescopeError(f"{handle.name}: shard is shorter than its index says "
                            f"(wanted {nbytes} bytes at row {start}, got {got}); the store is damaged — "
                            "delete it and cache again")
