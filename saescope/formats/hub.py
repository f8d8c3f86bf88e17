"""Fetching an SAE folder from a Hugging Face hub repository (e.g. the Gemma Scope 2 release).

``load_sae("google/gemma-scope-2-270m-pt", folder="resid_post/layer_12_width_16k_l0_medium")`` downloads only
that folder (``snapshot_download`` with ``allow_patterns``) into the usual hub cache and then reads it like any
local folder. With no network, a folder already in the cache is used (``local_files_only``), so a machine
that fetched it once keeps working offline; anything else gets an error saying how to get the files.
"""

from __future__ import annotations

import re
from pathlib import Path

from saescope.errors import SaescopeError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` with no path beyond it and nothing on disk by that name."""
    return bool(REPO_ID.match(text)) and not Path(text).exists()


def hub_folder(repo_id: str, folder: str, *, revision: str | None = None,
               cache_dir: str | Path | None = None) -> Path:
    """The local path of ``folder`` inside the hub repository ``repo_id``, downloading it if needed."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:   # pragma: no cover - huggingface_hub comes with transformers
        raise SaescopeError("reading from the hub needs huggingface_hub: pip install huggingface_hub") from exc
    folder = folder.strip("/")
    patterns = [f"{folder}/*"]
    # With no network, huggingface_hub falls back to the cached snapshot by itself (or raises when there is none).
    try:
        root = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise SaescopeError(
            f"cannot get {folder!r} from the hub repository {repo_id!r} ({type(exc).__name__}: {exc}). "
            f"Check the repository id and your network, or download it on a machine with internet "
            f"(huggingface-cli download {repo_id} --include '{folder}/*') and pass the local folder."
        ) from exc
    path = Path(root) / folder
    if not path.is_dir():
        raise SaescopeError(
            f"no folder {folder!r} in the hub repository {repo_id!r} (looked in {root}). Check the name "
            f"(e.g. resid_post/layer_12_width_16k_l0_medium); if you are offline, it is not in the hub cache.")
    return path
