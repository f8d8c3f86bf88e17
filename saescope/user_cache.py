"""Where saescope keeps what it makes once per machine: ``$SAESCOPE_CACHE/<kind>``, default
``~/.cache/saescope/<kind>`` (converted GGUF models, compiled CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(kind: str) -> Path:
    """The cache folder for ``kind`` (not created here)."""
    base = os.environ.get("SAESCOPE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "saescope") / kind
