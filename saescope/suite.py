"""A suite of SAEs on disk, and exporting it in the Gemma Scope release layouts.

saescope writes a trained suite as ``suite/<kind>/layer_<L>/width_<W>/average_l0_<k>/`` in the native format
(see ``shared/DESIGN.md``), with ``suite/training_summary.json`` listing every member (:func:`write_suite`).
:func:`export_suite` rewrites it in either release layout:

- ``gemma-scope`` (Gemma Scope, Gemma 2): ``<kind>/layer_<L>/width_<W>/average_l0_<k>/params.npz``;
- ``gemma-scope-2`` (Gemma 3): ``<kind>/layer_<L>_width_<W>_l0_<size>/params.safetensors + config.json``,
  ``size`` in small / medium / big by rank of L0 among the SAEs of the same site and width (one SAE is
  ``medium``, two are ``small`` and ``big``); with more than three the measured L0 is used (``l0_<k>``).

Both hold standardized parameters (Appendix A); saving standardizes.

Transcoders (read ``mlp_in``, write ``mlp_out``) go under the site folder ``transcoder/`` in both layouts, as
the releases do; Gemma Scope 2 marks skip transcoders with the release's ``_affine`` folder suffix, ranking
their L0 sizes separately from plain transcoders. ``params.npz`` has no skip matrix, so exporting a suite
with a skip transcoder to the ``gemma-scope`` layout is refused before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saescope.config import Site
from saescope.errors import SAEFileError, SaescopeError
from saescope.formats import detect_format, load_sae
from saescope.formats.gemma_scope import width_name
from saescope.formats.gemma_scope_2 import TRANSCODER_SITE
from saescope.formats.gemma_scope_2 import release_folder as gemma_scope_2_folder

LAYOUTS = ("gemma-scope", "gemma-scope-2")
_AVERAGE_L0 = re.compile(r"^average_l0_(\d+)$")


@dataclass(frozen=True)
class SuiteEntry:
    """One SAE of a suite: where it is and what it is for."""

    folder: Path
    site: str          # kind, e.g. resid_post
    layer: int
    d_sae: int
    average_l0: int
    architecture: str = "jumprelu"    # or jumprelu_transcoder / jumprelu_skip_transcoder (then site is "transcoder")

    @property
    def key(self) -> tuple[str, int, int, str]:
        return self.site, self.layer, self.d_sae, self.architecture

    @property
    def affine(self) -> bool:
        """A skip transcoder (Gemma Scope 2's "affine skip connection")."""
        return self.architecture == "jumprelu_skip_transcoder"


@dataclass(frozen=True)
class SuiteMember:
    """A trained SAE about to join a run's suite: its name, its standardized module (anything with
    ``save(folder)``), where it reads (``site`` id, ``kind`` sae / transcoder), its width and the training record
    its ``config.json`` holds (``final_l0`` names the folder)."""

    name: str
    sae: Any
    site: str
    kind: str
    width: int
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_folder(self) -> Path:
        """``<site>/width_<W>/average_l0_<k>`` (transcoders under ``transcoder/layer_<L>``), ``k`` the rounded L0."""
        site = (Path("transcoder") / f"layer_{Site.parse(self.site).layer}" if self.kind == "transcoder"
                else Path(self.site))
        l0 = float(self.training.get("final_l0", float("nan")))
        return site / f"width_{width_name(self.width)}" / f"average_l0_{round(l0) if math.isfinite(l0) else 0}"


def write_suite(run_dir: str | Path, members: Sequence[SuiteMember]) -> dict[str, Path]:
    """Save each member under ``RUN_DIR/suite/<relative_folder>`` (a second SAE landing on the same folder gets
    ``_2``, ``_3``, …) and list them all in ``suite/training_summary.json``; returns ``{name: folder}``."""
    run_dir = Path(run_dir)
    out: dict[str, Path] = {}
    used: set[Path] = set()
    rows = []
    for member in members:
        base = folder = run_dir / "suite" / member.relative_folder
        n = 2
        while folder in used:
            folder = base.with_name(f"{base.name}_{n}")
            n += 1
        used.add(folder)
        member.sae.save(folder)
        out[member.name] = folder
        rows.append({"sae": member.name, "folder": str(folder.relative_to(run_dir)), **member.training})
    (run_dir / "suite").mkdir(parents=True, exist_ok=True)
    (run_dir / "suite" / "training_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return out


def sae_folders(run_dir: str | Path) -> list[Path]:
    """Every folder holding an SAE (any format) under ``RUN_DIR/suite``, or under ``run_dir`` itself when it
    has no ``suite/``; sorted. The one place that decides what counts as a suite member (the evaluator, the
    browser and the exporter all use it)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise SaescopeError(f"{root} is not a folder; pass a run directory (runs/<name>) or a folder of SAEs")
    base = root / "suite" if (root / "suite").is_dir() else root
    found = []
    for folder in sorted({p.parent for p in base.rglob("*") if p.is_file()}):
        try:
            detect_format(folder)
        except SAEFileError:  # not an SAE folder (suite/ itself, dashboards/, ...)
            continue
        found.append(folder)
    if not found:
        raise SaescopeError(f"no SAEs found under {base}: expected folders like "
                            "suite/resid_post/layer_6/width_16k/average_l0_50/ (written by saescope train)")
    return found


def find_suite(root: str | Path) -> list[SuiteEntry]:
    """Every SAE under ``root`` (any format), with its site, layer, width and measured L0."""
    entries = []
    for folder in sae_folders(root):
        c = load_sae(folder).config
        if c.site is None or c.layer is None:
            raise SaescopeError(f"the SAE in {folder} does not say which site and layer it reads; "
                                "re-save it with site and layer in its config")
        kind = Site.parse(c.site).kind if "/layer_" in c.site else c.site
        if c.is_transcoder:
            kind = TRANSCODER_SITE
        entries.append(SuiteEntry(folder, kind, c.layer, c.d_sae, _average_l0(folder, c.training), c.architecture))
    return sorted(entries, key=lambda e: (e.site, e.layer, e.d_sae, e.architecture, e.average_l0))


def _average_l0(folder: Path, training: dict) -> int:
    match = _AVERAGE_L0.match(folder.name)
    if match:
        return int(match.group(1))
    for key in ("average_l0", "final_l0", "l0"):
        if isinstance(training.get(key), (int, float)):
            return round(training[key])
    raise SaescopeError(f"cannot tell the average L0 of the SAE in {folder}: its folder is not named "
                        "average_l0_<k> and its config has no training summary with the L0")


def size_names(entries: list[SuiteEntry]) -> dict[Path, str]:
    """Gemma Scope 2's ``l0_<size>`` names, by rank of L0 within each (site, layer, width)."""
    groups: dict[tuple, list[SuiteEntry]] = {}
    for e in entries:
        groups.setdefault(e.key, []).append(e)
    names = {}
    for group in groups.values():
        group = sorted(group, key=lambda e: e.average_l0)
        labels = {1: ["medium"], 2: ["small", "big"], 3: ["small", "medium", "big"]}.get(
            len(group), [str(e.average_l0) for e in group])
        for e, label in zip(group, labels):
            names[e.folder] = label
    return names


def export_suite(root: str | Path, out: str | Path, layout: str = "gemma-scope-2", *, site_suffix: str = "",
                 sizes: dict[Path, str] | None = None, dashboards: bool = False) -> list[Path]:
    """Write every SAE under ``root`` to ``out`` in a Gemma Scope release layout; returns the folders.

    ``site_suffix``: appended to each site folder (``"_all"``: Gemma Scope 2's whole-model folders
    ``resid_post_all/``, ``transcoder_all/``). ``sizes``: the ``l0_<size>`` name of SAE folders (e.g. the
    target-L0 ladder they were trained for); the others are named by :func:`size_names`. ``dashboards``: also
    copy each SAE's ``dashboards/`` folder (built by :mod:`saescope.dashboards`) into its release folder."""
    if layout not in LAYOUTS:
        raise SaescopeError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    entries = find_suite(root)
    skips = [e.folder for e in entries if e.affine]
    if layout == "gemma-scope" and skips:
        raise SaescopeError(f"the gemma-scope layout (params.npz) has no skip matrix, but {len(skips)} member(s) are "
                            f"skip transcoders (e.g. {skips[0]}); export with --layout gemma-scope-2 instead")
    out = Path(out)
    given = {Path(k).resolve(): v for k, v in (sizes or {}).items()}
    sizes = {**size_names(entries), **{e.folder: given[e.folder.resolve()] for e in entries
                                       if e.folder.resolve() in given}}
    written = []
    for e in entries:
        sae = load_sae(e.folder)
        if layout == "gemma-scope":
            target = (out / f"{e.site}{site_suffix}" / f"layer_{e.layer}" / f"width_{width_name(e.d_sae)}"
                      / f"average_l0_{e.average_l0}")
        else:
            target = gemma_scope_2_folder(out, f"{e.site}{site_suffix}", e.layer, e.d_sae, sizes[e.folder],
                                          affine=e.affine)
        if target.exists() and any(target.iterdir()):
            raise SaescopeError(f"{target} already holds files; two SAEs map to the same release folder "
                                "or the export ran before — choose an empty output folder")
        written.append(sae.save(target, format=layout))
        if dashboards and (e.folder / "dashboards").is_dir():
            shutil.copytree(e.folder / "dashboards", target / "dashboards")
    return written
