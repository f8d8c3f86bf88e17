"""Validation shared by every SAE file reader: names the file, the key and what was expected.

No reader ever unpickles: safetensors files are parsed as safetensors, ``.npz`` files are opened with
``np.load(allow_pickle=False)``, and anything else is refused.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saescope.errors import SAEFileError
from saescope.sae.jumprelu import PARAMETER_NAMES
from saescope.sae.transcoder import SKIP_NAME

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def looks_like_pickle(path: Path) -> bool:
    """True for a raw pickle or a torch.save zip (which holds ``data.pkl``)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head in PICKLE_MAGIC:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith(".pkl") for name in zf.namelist())
    return False


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SAEFileError(path, "file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFileError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SAEFileError(path, f"holds a JSON {type(data).__name__}", expected="a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU, refusing pickles with a clear message."""
    if not path.is_file():
        raise SAEFileError(path, "file not found")
    if looks_like_pickle(path):
        raise SAEFileError(path, "is a pickle (torch.save) file; saescope never unpickles files",
                           expected="safetensors; convert with safetensors.torch.save_file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise SAEFileError(path, f"cannot be read as safetensors ({exc})") from exc


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` with ``allow_pickle=False``."""
    if not path.is_file():
        raise SAEFileError(path, "file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise SAEFileError(path, "contains pickled data; saescope never unpickles files",
                               expected="an .npz of numeric arrays") from exc
        raise SAEFileError(path, f"cannot be read as .npz ({exc})") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise SAEFileError(path, f"cannot be read as .npz ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SAEFileError(path, "holds a single array", expected="an .npz archive of named arrays")
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                raise SAEFileError(path, "holds an object array (pickled data); saescope never unpickles",
                                   key=key, expected="a numeric array") from exc
    return arrays


def to_tensor(path: Path, key: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise SAEFileError(path, f"has dtype {value.dtype}", key=key, expected="a floating-point array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if not torch.is_floating_point(value):
        raise SAEFileError(path, f"has dtype {value.dtype}", key=key, expected="a floating-point tensor")
    return value


def parameter_shapes(d_in: int, d_sae: int, d_out: int | None = None, skip: bool = False
                     ) -> dict[str, tuple[int, ...]]:
    """The expected shape of each parameter; a transcoder writes ``d_out`` (``W_dec [d_sae, d_out]``,
    ``b_dec [d_out]``) and a skip transcoder also holds ``W_skip [d_in, d_out]``."""
    d_out = d_in if d_out is None else d_out
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,),
              "threshold": (d_sae,)}
    if skip:
        shapes[SKIP_NAME] = (d_in, d_out)
    return shapes


def check_parameters(
    path: Path,
    tensors: Mapping[str, Any],
    names: Mapping[str, str] | None = None,
    *,
    expect_d_in: int | None = None,
    expect_d_sae: int | None = None,
    expect_d_out: int | None = None,
    transcoder: bool = False,
    transposed: Collection[str] = (),
    site: str | None = None,
) -> dict[str, torch.Tensor]:
    """Check a file's tensors and return them under the paper's names.

    ``names`` maps each paper name (``W_enc`` …, and ``W_skip``) to the key used in the file. A file holding
    the ``W_skip`` key is a skip transcoder; with ``transcoder`` (or ``W_skip``) ``W_dec`` may write another
    width ``d_out`` (checked against ``expect_d_out`` when given), otherwise it must write ``d_in``.
    ``transposed`` names parameters the file stores transposed (SAELens keeps ``W_skip`` as
    ``[d_out, d_in]``); they are returned in saescope's orientation. Raises :class:`SAEFileError` for a
    missing key, a wrong shape, a ``d_in`` that differs from what the site needs, a non-float dtype or a
    non-finite value.
    """
    names = {**{n: n for n in PARAMETER_NAMES + (SKIP_NAME,)}, **(names or {})}
    missing = [names[n] for n in PARAMETER_NAMES if names[n] not in tensors]
    if missing:
        raise SAEFileError(path, "missing key" + ("s " if len(missing) > 1 else " ") + ", ".join(missing),
                           key=missing[0], expected=f"keys {[names[n] for n in PARAMETER_NAMES]}")
    skip = names[SKIP_NAME] in tensors
    wanted = PARAMETER_NAMES + ((SKIP_NAME,) if skip else ())
    out = {n: to_tensor(path, names[n], tensors[names[n]]) for n in wanted}
    W_enc = out["W_enc"]
    if W_enc.dim() != 2:
        raise SAEFileError(path, f"has shape {tuple(W_enc.shape)}", key=names["W_enc"],
                           expected="a 2-d matrix [d_in, d_sae]")
    d_in, d_sae = W_enc.shape
    if expect_d_in is not None and d_in != expect_d_in:
        where = f"site {site}" if site else "the site"
        raise SAEFileError(path, f"has d_in {d_in} but {where} has width {expect_d_in}", key=names["W_enc"],
                           expected=f"shape [{expect_d_in}, d_sae]; is this SAE for another model or site?")
    if expect_d_sae is not None and d_sae != expect_d_sae:
        raise SAEFileError(path, f"has d_sae {d_sae} but the config says {expect_d_sae}", key=names["W_enc"],
                           expected=f"shape [{d_in}, {expect_d_sae}]")
    d_out = d_in
    if transcoder or skip:
        W_dec = out["W_dec"]
        if W_dec.dim() != 2:
            raise SAEFileError(path, f"has shape {tuple(W_dec.shape)}", key=names["W_dec"],
                               expected="a 2-d matrix [d_sae, d_out]")
        d_out = W_dec.shape[1]
        if expect_d_out is not None and d_out != expect_d_out:
            raise SAEFileError(path, f"has d_out {d_out} but the config says {expect_d_out}", key=names["W_dec"],
                               expected=f"shape [{d_sae}, {expect_d_out}]")
    for name, shape in parameter_shapes(d_in, d_sae, d_out, skip).items():
        if name in transposed:
            shape = shape[::-1]
        if tuple(out[name].shape) != shape:
            widths = f"d_in={d_in}, d_sae={d_sae}" + (f", d_out={d_out}" if transcoder or skip else "")
            raise SAEFileError(path, f"has shape {tuple(out[name].shape)}", key=names[name],
                               expected=f"shape {list(shape)} for {widths}")
        if name in transposed:
            out[name] = out[name].T.contiguous()
    if skip and out[SKIP_NAME].dtype != out["W_enc"].dtype:
        raise SAEFileError(path, f"has dtype {out[SKIP_NAME].dtype} but {names['W_enc']} has {out['W_enc'].dtype}",
                           key=names[SKIP_NAME], expected="the same dtype as the other weights")
    for name, value in out.items():
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise SAEFileError(path, f"holds {bad} non-finite value(s) (NaN or inf)", key=names[name],
                               expected="finite values; the SAE was probably saved after a diverged step")
    if bool((out["threshold"] < 0).any()):
        raise SAEFileError(path, "holds negative thresholds", key=names["threshold"], expected="θ >= 0")
    return out
