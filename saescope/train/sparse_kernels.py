"""The compiled CPU kernels of the sparse step (``sparse_kernels.cpp``): build once, load, call.

The sparse step's bookkeeping is a chain of torch ops that each read and write a few hundred thousand
(token, latent) pairs or gather rows of 640 numbers; on the CPU they cost more than the encoder product
they accompany. ``sparse_kernels.cpp`` does the same math in four fused loops (see its header). It is plain
C++ with a C interface, compiled on first use with the machine's C++ compiler (``$CXX``, else ``g++``,
``c++`` or ``clang++``; about a second) into ``~/.cache/saescope/kernels/`` (or ``$SAESCOPE_CACHE/kernels``)
and called through :mod:`ctypes` on the tensors' memory. The file name holds a hash of the source, the
compiler and the CPU, so a changed source or another machine builds its own copy.

Where no compiler is found or the build fails, :func:`load` returns None (with one warning saying why) and
the step runs on torch ops — the same results to float rounding. ``SAESCOPE_CPU_KERNELS=0`` turns the
kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from saescope.user_cache import user_cache

SOURCE = Path(__file__).with_name("sparse_kernels.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]
# tried in order: this CPU's instructions with 512-bit vectors (x86 with AVX-512: ~15% faster than GCC's default
# of 256), this CPU's instructions (other architectures reject the vector-width flag), portable code
ARCH_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])
_STATE: dict[str, object] = {}
DTYPES = {torch.float32: 0, torch.float64: 1}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    """Compile the kernels with the first of ``ARCH_FLAGS`` the compiler accepts into the cache; returns the
    path."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for arch in ARCH_FLAGS:
        flags = FLAGS + arch
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = user_cache("kernels") / f"sparse_kernels_{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)        # atomic: a concurrent build of the same key is harmless
                return target
            errors.append(done.stderr.strip()[-2000:])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("the compiler failed:\n" + "\n".join(errors))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.saescope_scan_candidates.argtypes = [i32, p, p, i64, i64, i64, p, p, i64, p, i32]
    lib.saescope_scan_candidates.restype = i64
    lib.saescope_merge_blocks.argtypes = [i32, i64, i64, p, p, p, p, p, p, p]
    lib.saescope_merge_blocks.restype = None
    lib.saescope_forward.argtypes = [i32, i64, i64, p, p, p, p, dbl, p, p, p, p, i64, p, p, dbl, p, p, p, p, p, p,
                                     i32]
    lib.saescope_forward.restype = None
    lib.saescope_latent_order.argtypes = [i64, i64, p, p, p, p, p]
    lib.saescope_latent_order.restype = None
    lib.saescope_backward.argtypes = [i32, i64, i64, i64, p, p, p, p, p, p, dbl, dbl, p, p, p, i64, p, p, p, p,
                                      p, p, p, p, i32, i32]
    lib.saescope_backward.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The kernels' library, built on first call; None when turned off or when it cannot be built."""
    if os.environ.get("SAESCOPE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    lib = None
    compiler = _compiler()
    if compiler is None:
        why = "no C++ compiler found (set CXX, or install g++)"
    else:
        try:
            lib = _declare(ctypes.CDLL(str(_build(compiler))))
            why = ""
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            why = f"building {SOURCE.name} failed: {err}"
    if lib is None:
        warnings.warn(f"saescope: the compiled CPU kernels of the sparse step are not available ({why}); "
                      "training uses torch ops instead (same results, slower on the CPU)", stacklevel=2)
    _STATE["lib"] = lib
    return lib


def ptr(t: torch.Tensor | None) -> int | None:
    """The address of a tensor's first element (None for None)."""
    return None if t is None else t.data_ptr()
