"""Write an activation store shard by shard, crash-safe and resumable (see :mod:`saescope.store.index`).

A producer hands :class:`StoreWriter` *chunks* — for each chunk, ``{site_id: Tensor[n, d]}`` plus each row's
token id, document id and position — in a deterministic order. Rows are buffered to ``shard_rows`` and
written as one shard per site (temp file + ``os.replace``); only then is ``index.json`` rewritten (also
atomically). Killing the process at any moment therefore loses at most the buffered rows, and the index
says where to restart: :attr:`StoreWriter.chunks_done` chunks are fully stored (the producer skips them)
and the first rows of the next chunk that are already stored are dropped when it is added again. The
result is byte-for-byte the store an uninterrupted run writes.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saescope.errors import SaescopeError
from saescope.store.index import TOKENS_FOLDER, FileEntry, ShardEntry, SiteEntry, StoreIndex, exists
from saescope.store.norm_scale import norm_scale_from_sums, sum_squared_norms
from saescope.store.shards import STORAGE_DTYPES, storage_error, write_shard_file

DEFAULT_SHARD_ROWS = 16384
_SITE_ID = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


class StoreWriter:
    """Append rows to an activation store at ``path``, creating it or resuming an unfinished one.

    ``sites`` maps site ids (``"resid_post/layer_6"``) to widths ``d``. ``settings`` records what produced
    the store (text source, model, ...); reopening with different settings is an error, so a resumed run
    can never mix two corpora. ``max_rows`` caps the stored rows (the last chunk is cut).
    """

    def __init__(
        self,
        path: str | Path,
        sites: Mapping[str, int],
        *,
        dtype: str = "float32",
        shard_rows: int = DEFAULT_SHARD_ROWS,
        model: str | None = None,
        context_len: int | None = None,
        settings: Mapping[str, Any] | None = None,
        max_rows: int | None = None,
    ):
        self.path = Path(path)
        if dtype not in STORAGE_DTYPES:
            raise SaescopeError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        if shard_rows <= 0:
            raise SaescopeError(f"shard_rows must be positive, got {shard_rows}")
        if max_rows is not None and max_rows <= 0:
            raise SaescopeError(f"max_rows (--max-tokens) must be positive, got {max_rows}")
        if not sites:
            raise SaescopeError("give at least one site to cache")
        for site_id, d in sites.items():
            if not _SITE_ID.match(site_id) or ".." in site_id.split("/") or site_id == TOKENS_FOLDER:
                raise SaescopeError(f"site id {site_id!r} cannot name a folder in the store")
            if int(d) <= 0:
                raise SaescopeError(f"site {site_id}: width must be positive, got {d}")
        self.dtype = dtype
        self._torch_dtype = STORAGE_DTYPES[dtype]
        settings = dict(settings or {})
        settings["max_rows"] = max_rows
        wanted = StoreIndex(dtype=dtype, shard_rows=shard_rows, model=model, context_len=context_len,
                            sites={s: SiteEntry(d=int(d)) for s, d in sites.items()}, settings=settings)
        wanted = StoreIndex.model_validate_json(wanted.model_dump_json())  # normalise settings as JSON would
        if exists(self.path):
            index = StoreIndex.load(self.path)
            self._check_same_settings(index, wanted)
            self._remove_orphans(index)
        else:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise SaescopeError(f"{self.path} exists and is not an activation store (no index.json); "
                                    "choose an empty or new folder for --out")
            index = wanted
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                index.save(self.path)
            except OSError as exc:
                raise storage_error(exc, self.path, "create the activation store") from exc
        self.index = index
        self.max_rows = max_rows
        self.sites = list(index.sites)
        self._skip = index.skip_rows          # rows of the next added chunk already stored
        self._next_chunk = index.chunks_done  # number the next added chunk will get
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffered = 0
        self._accepted = index.rows           # rows stored + buffered
        self._pending: deque[tuple[int, int, int]] = deque()  # (chunk, first row, end row) not fully stored
        self.document_name = str  # how error messages name a document id (the caching glue adds the name)

    # -- state -------------------------------------------------------------------------------------------
    @property
    def chunks_done(self) -> int:
        """Chunks whose rows are all stored: a resuming producer skips this many and adds the rest."""
        return self.index.chunks_done

    @property
    def complete(self) -> bool:
        return self.index.complete

    @property
    def rows(self) -> int:
        """Rows accepted so far (stored or buffered)."""
        return self._accepted

    @property
    def done(self) -> bool:
        """True once ``max_rows`` rows were accepted (the producer can stop) or the store is complete."""
        return self.complete or (self.max_rows is not None and self._accepted >= self.max_rows)

    # -- writing -----------------------------------------------------------------------------------------
    def add(self, chunk: Mapping[str, torch.Tensor], *, token_ids: torch.Tensor, document_ids: torch.Tensor,
            positions: torch.Tensor) -> None:
        """Add one chunk of rows: ``{site_id: [n, d]}`` and each row's token id, document id and position.

        Raises :class:`SaescopeError` naming the site, document and position of the first non-finite value.
        """
        if self.complete:
            raise SaescopeError(f"the activation store at {self.path} is already complete")
        if set(chunk) != set(self.sites):
            raise SaescopeError(f"chunk has sites {sorted(chunk)}, the store has {sorted(self.sites)}")
        n = int(token_ids.shape[0])
        meta = {"token_ids": token_ids.reshape(-1).to(torch.int32),
                "document_ids": document_ids.reshape(-1).to(torch.int64),
                "positions": positions.reshape(-1).to(torch.int32)}
        for name, t in meta.items():
            if t.shape[0] != n:
                raise SaescopeError(f"chunk has {n} token ids but {t.shape[0]} {name}")
        rows: dict[str, torch.Tensor] = {}
        for site_id in self.sites:
            x = chunk[site_id]
            d = self.index.sites[site_id].d
            if x.ndim != 2 or x.shape[0] != n or x.shape[1] != d:
                raise SaescopeError(f"site {site_id}: expected activations of shape [{n}, {d}], "
                                    f"got {list(x.shape)}")
            rows[site_id] = x.detach().to(device="cpu", dtype=self._torch_dtype)
        rows.update(meta)

        start = min(self._skip, n)
        stop = n
        if self.max_rows is not None:
            stop = min(n, start + max(0, self.max_rows - self._accepted))
        rows = {name: t[start:stop] for name, t in rows.items()}
        for site_id in self.sites:
            self._check_finite(site_id, rows[site_id], rows)
        chunk_no = self._next_chunk
        self._next_chunk += 1
        self._skip = 0
        first = self._accepted - start  # global row where this chunk's row 0 is (or would be)
        kept = stop - start
        self._pending.append((chunk_no, first, self._accepted + kept))
        if kept:
            self._buffer.append(rows)
            self._buffered += kept
            self._accepted += kept
        while self._buffered >= self.index.shard_rows:
            self._flush(self.index.shard_rows)

    def close(self) -> StoreIndex:
        """Write the last (possibly short) shard, compute the norm scale C per site and mark the store complete."""
        if self.complete:
            return self.index
        if self._buffered:
            self._flush(self._buffered)
        index = self.index
        if index.rows == 0:
            raise SaescopeError(f"no rows were written to {self.path}: the text source gave no tokens "
                                "(check --text, and that documents are not empty)")
        index.chunks_done = self._next_chunk
        index.skip_rows = 0
        for site_id, entry in index.sites.items():
            total = sum(shard.sum_sq_norm[site_id] for shard in index.shards)
            entry.norm_scale = norm_scale_from_sums(total, index.rows, site=site_id)
        index.complete = True
        self._save_index()
        return index

    # -- internals ---------------------------------------------------------------------------------------
    def _check_finite(self, site_id: str, x: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        if x.numel() == 0 or math.isfinite(float(x.sum())):
            return  # a finite sum means every value is finite (NaN and ±inf propagate); fast path
        finite = torch.isfinite(x)
        bad_rows = (~finite).any(dim=1).nonzero()
        r = int(bad_rows[0])
        col = int((~finite[r]).nonzero()[0])
        raise SaescopeError(
            f"non-finite activation ({float(x[r, col])}) at site {site_id}, document "
            f"{self.document_name(int(rows['document_ids'][r]))}, position {int(rows['positions'][r])} (token id "
            f"{int(rows['token_ids'][r])}, dimension {col}); {int(bad_rows.numel())} row(s) of this chunk are "
            "affected. Nothing of this chunk was stored. Run the model in float32 (bfloat16/float16 can "
            "overflow) or drop the offending text."
        )

    def _take(self, n: int) -> dict[str, torch.Tensor]:
        """Remove the first ``n`` buffered rows and return them concatenated."""
        parts: list[dict[str, torch.Tensor]] = []
        need = n
        while need:
            head = self._buffer[0]
            have = int(head["token_ids"].shape[0])
            if have <= need:
                parts.append(self._buffer.pop(0))
                need -= have
            else:
                parts.append({k: v[:need] for k, v in head.items()})
                self._buffer[0] = {k: v[need:] for k, v in head.items()}
                need = 0
        self._buffered -= n
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _flush(self, n: int) -> None:
        rows = self._take(n)
        k = len(self.index.shards)
        files: dict[str, FileEntry] = {}
        sums: dict[str, float] = {}
        try:
            for site_id in self.sites:
                rel = f"{site_id}/{shard_name(k)}"
                info = write_shard_file(self.path / rel, {"activations": rows[site_id]})
                files[site_id] = FileEntry(path=rel, **info)
                sums[site_id] = sum(sum_squared_norms(block) for block in rows[site_id].split(4096))
            rel = f"{TOKENS_FOLDER}/{shard_name(k)}"
            info = write_shard_file(self.path / rel, {name: rows[name] for name in
                                                      ("token_ids", "document_ids", "positions")})
            files[TOKENS_FOLDER] = FileEntry(path=rel, **info)
        except OSError as exc:
            raise storage_error(exc, self.path / rel, "write shard") from exc
        index = self.index
        index.shards.append(ShardEntry(rows=n, files=files, sum_sq_norm=sums))
        index.rows += n
        while self._pending and self._pending[0][2] <= index.rows:
            self._pending.popleft()
        if self._pending:
            chunk_no, first, _ = self._pending[0]
            index.chunks_done, index.skip_rows = chunk_no, index.rows - first
        else:
            index.chunks_done, index.skip_rows = self._next_chunk, 0
        self._save_index()

    def _save_index(self) -> None:
        try:
            self.index.save(self.path)
        except OSError as exc:
            raise storage_error(exc, self.path / "index.json", "update the index") from exc

    def _check_same_settings(self, index: StoreIndex, wanted: StoreIndex) -> None:
        have = {"dtype": index.dtype, "shard_rows": index.shard_rows, "model": index.model,
                "context_len": index.context_len, "sites": {s: e.d for s, e in index.sites.items()},
                "settings": index.settings}
        want = {"dtype": wanted.dtype, "shard_rows": wanted.shard_rows, "model": wanted.model,
                "context_len": wanted.context_len, "sites": {s: e.d for s, e in wanted.sites.items()},
                "settings": wanted.settings}
        diff = [f"{key}: store has {have[key]!r}, this run asks {want[key]!r}"
                for key in have if have[key] != want[key]]
        if diff:
            raise SaescopeError(
                f"{self.path} holds an activation store made with other settings, so it cannot be resumed "
                f"or reused ({'; '.join(diff)}). Run with the same settings, or choose a new --out.")

    def _remove_orphans(self, index: StoreIndex) -> None:
        """Delete temp files and shards written after the last index update (a crash between the two)."""
        keep = {f.path for shard in index.shards for f in shard.files.values()}
        folders = [self.path / s for s in index.sites] + [self.path / TOKENS_FOLDER]
        for folder in folders:
            if not folder.is_dir():
                continue
            for file in folder.iterdir():
                rel = file.relative_to(self.path).as_posix()
                if file.is_file() and rel not in keep and (file.suffix == ".tmp"
                                                          or file.name.endswith(".safetensors")):
                    try:
                        file.unlink()
                    except OSError as exc:
                        raise storage_error(exc, file, "remove the unfinished shard") from exc
        tmp = self.path / "index.json.tmp"
        if tmp.exists():
            tmp.unlink()
