"""The activation store's index: one ``index.json`` at the store root, rewritten atomically after each shard.

Layout of a store folder::

    <out>/index.json                              this index
    <out>/<kind>/layer_<L>/shard_00000.safetensors  {"activations": [rows, d]} per site (float32 or bfloat16)
    <out>/tokens/shard_00000.safetensors            {"token_ids", "document_ids", "positions"} per row

Shard ``k`` holds the same rows (the same tokens, in the same order) for every site, so several sites can
be read in lockstep (a transcoder reads ``mlp_in`` and ``mlp_out`` of the same token). ``chunks_done`` and
``skip_rows`` say where a producer resumes: chunks ``< chunks_done`` are fully stored, and the first
``skip_rows`` rows of chunk ``chunks_done`` are already in the last shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from saescope.errors import SaescopeError
from saescope.store.shards import atomic_write_bytes

INDEX_NAME = "index.json"
TOKENS_FOLDER = "tokens"
FORMAT_NAME = "saescope-activations"
FORMAT_VERSION = 1


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="path relative to the store root")
    bytes: int
    sha256: str


class ShardEntry(BaseModel):
    """One shard: its row count, its files (one per site plus the token file) and per-site Σ‖x‖²."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(gt=0)
    files: dict[str, FileEntry] = Field(description="site id → file, plus 'tokens'")
    sum_sq_norm: dict[str, float] = Field(description="site id → Σ over rows of ‖x‖² (float64, stored values)")


class SiteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    d: int = Field(gt=0)
    norm_scale: float | None = Field(None, description="C with E‖x/C‖² = 1 (Appendix A); set when complete")


class StoreIndex(BaseModel):
    """Everything a reader needs: rows, widths, dtype, provenance, shards and the norm scale per site."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["saescope-activations"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    dtype: Literal["float32", "bfloat16"]
    shard_rows: int = Field(gt=0)
    sites: dict[str, SiteEntry]
    model: str | None = None
    context_len: int | None = None
    settings: dict[str, Any] = Field(default_factory=dict,
                                     description="what produced the store; a resumed run must match it")
    rows: int = 0
    chunks_done: int = 0
    skip_rows: int = 0
    complete: bool = False
    shards: list[ShardEntry] = Field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Stored tokens (= rows: BOS, EOS and padding positions are never stored)."""
        return self.rows

    def save(self, root: Path) -> None:
        atomic_write_bytes(Path(root) / INDEX_NAME, (self.model_dump_json() + "\n").encode())  # compact: rewritten per shard

    @classmethod
    def load(cls, root: Path | str) -> StoreIndex:
        path = Path(root) / INDEX_NAME
        if not path.is_file():
            raise SaescopeError(f"no activation store at {root}: {path} does not exist "
                                "(create one with `saescope cache`)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SaescopeError(f"cannot read {path}: {exc}") from exc
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise SaescopeError(f"{path} is not a saescope activation index version {FORMAT_VERSION} "
                                f"(format={data.get('format')!r}, version={data.get('version')!r})")
        try:
            return cls.model_validate(data)
        except ValueError as exc:
            raise SaescopeError(f"{path} is malformed: {exc}") from exc


def exists(root: Path | str) -> bool:
    return (Path(root) / INDEX_NAME).is_file()
