"""How an SAE's ``save`` method reaches the file formats without importing them.

The SAE modules are the lower layer: :mod:`saescope.formats` imports them to read and write files, so they
must not import it back (no import circle). The formats package registers its writer here when it is
imported — and ``import saescope`` (which runs before any ``saescope.*`` module) imports it — so
``sae.save(path, format=...)`` always finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from saescope.errors import SaescopeError

Saver = Callable[..., Path]
_saver: list[Saver] = []


def register_saver(saver: Saver) -> None:
    """Called by :mod:`saescope.formats`: ``saver(module, path, format=...)`` writes a file set."""
    _saver[:] = [saver]


def save_module(module: Any, path: str | Path, format: str) -> Path:
    """Write ``module`` through the registered formats layer (:func:`saescope.formats.save_sae`)."""
    if not _saver:
        raise SaescopeError("no file formats are registered; import saescope.formats (import saescope does)")
    return _saver[0](module, path, format=format)
