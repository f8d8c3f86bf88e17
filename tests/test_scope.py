"""``saescope scope``: the whole-model suite on a tiny model (streamed and cached), its resume, the by-layer report,
the Gemma Scope 2 release layout, the latent dashboards (``--dashboards``), the target-L0 ladder, and the checks
that run before any long work."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from stream_helpers import CharTokenizer, final_weights, tiny_loaded
from typer.testing import CliRunner

from saescope.cli import app
from saescope.errors import SaescopeError
from saescope.scope import ScopeConfig, ladder_l0, parse_layers, run_scope

WORDS = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()


def text_file(root: Path) -> str:
    path = root / "text.jsonl"
    with path.open("w") as fh:
        for i in range(120):
            fh.write(json.dumps({"text": " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(30 + i % 11))}) + "\n")
    return f"file:{path}"


def config(root: Path, **kw) -> ScopeConfig:
    base = {"model": "tiny-gemma3", "out": root / "run", "layers": "all", "sites": ["resid_post", "mlp_out"],
            "transcoders": True, "widths": [32], "target_l0": [4, 8], "tokens": 32 * 24, "text": text_file(root),
            "eval_windows": 2, "stream": True, "batch_size": 32, "buffer_rows": 96, "context_len": 32,
            "export": True, "norm_sample_tokens": 200}
    base.update(kw)
    return ScopeConfig(**base)


def test_ladder_is_gemma_scope_2s_for_gemma_3_270m():
    assert [ladder_l0("small", layer) for layer in range(18)] == [10, 11, 13, 15, 16, 18] + [20] * 12
    assert [ladder_l0("big", layer) for layer in range(18)] == [60, 70, 80, 90, 100, 110] + [120] * 12
    assert [ladder_l0("medium", layer) for layer in (5, 9, 12, 15)] == [55, 60, 60, 60]
    assert ladder_l0("medium", 0) == round(math.sqrt(10 * 60))
    # another depth: the same relative layer of gemma-3-270m
    assert ladder_l0("small", 0, 30) == 10 and ladder_l0("big", 29, 30) == 120 and ladder_l0("small", 2, 30) == 11


def test_layers_parse_and_refuse_what_the_model_lacks():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-2", 18) == [0, 1, 2] and parse_layers("5,9,12", 18) == [5, 9, 12]
    assert parse_layers("0-1,7", 18) == [0, 1, 7]
    for bad, message in (("0-18", "layer\\(s\\) 18"), ("3-1", "backwards"), ("x", "cannot read")):
        with pytest.raises(SaescopeError, match=message):
            parse_layers(bad, 18)


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        config(tmp_path, l0=["small"])
    with pytest.raises(ValueError, match="resid_post"):
        config(tmp_path, sites=["resid_pre"])
    with pytest.raises(SaescopeError, match="layer\\(s\\) 3"):
        run_scope(config(tmp_path, layers="0-3"), model=tiny_loaded(), progress=False, echo=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_streamed_scope_trains_evaluates_reports_and_releases_every_layer(tmp_path):
    cfg = config(tmp_path)
    summary = run_scope(cfg, model=tiny_loaded(), progress=False, echo=lambda _: None)
    run = cfg.out
    assert summary["saes"] == 3 * 3 * 2 and summary["activation_shards"] == 0
    assert cfg.prefetch == 1 and not any(t.name == "saescope-forward" for t in threading.enumerate())
    assert not (run / "activations").exists()
    assert summary["memory"]["shuffle_buffer_bytes"] == 96 * 32 * 9 * 4     # 9 sites of width 32, float32
    table = json.loads((run / "eval" / "table.json").read_text())
    assert len(table["rows"]) == 18 and all(math.isfinite(r["delta_loss"]) for r in table["rows"])
    layers = json.loads((run / "report" / "by_layer.json").read_text())["rows"]
    assert sorted({(r["site"], r["layer"]) for r in layers}) == [(s, n) for s in ("mlp_out", "resid_post", "transcoder")
                                                                  for n in range(3)]
    figures = sorted(p.name for p in (run / "report" / "figures").glob("*layer*.png"))
    assert len(figures) == 4 * 3 and all("by_layer" in f for f in figures)
    page = (run / "report" / "by_layer.html").read_text()
    assert page.index("<h3>mlp_out</h3>") < page.index("<h3>resid_post</h3>") < page.index("<h3>transcoder</h3>")
    assert "layer 0:" in page and "layer 2:" in page
    # the release: Gemma Scope 2's whole-model folders, sizes named by target (4 → small, 8 → big)
    release = sorted(p.relative_to(run / "release").as_posix() for p in (run / "release").glob("*/*"))
    assert release == sorted(f"{site}_all/layer_{n}_width_32_l0_{size}" for site in ("resid_post", "mlp_out",
                             "transcoder") for n in range(3) for size in ("small", "big"))
    cfg_json = json.loads((run / "release" / "resid_post_all" / "layer_1_width_32_l0_small" / "config.json").read_text())
    assert cfg_json["hf_hook_point_in"] == "model.layers.1.output"
    scales = json.loads((run / "stream" / "norm_scales.json").read_text())["norm_scales"]
    sae_cfg = json.loads(next((run / "suite" / "resid_post" / "layer_1").rglob("saescope.json")).read_text())
    assert sae_cfg["training"]["norm_scale"] == pytest.approx(scales["resid_post/layer_1"], rel=1e-12)
    # re-running resumes from the final checkpoint: nothing retrained, the same SAEs
    before = final_weights(run)
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    run_scope(cfg, model=tiny_loaded(), progress=False, echo=lambda _: None)
    after = final_weights(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == steps
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SaescopeError, match="other settings"):
        run_scope(config(tmp_path, tokens=32 * 30), model=tiny_loaded(), progress=False, echo=lambda _: None)


def test_cached_scope_checks_the_disk_then_writes_a_store(tmp_path, monkeypatch):
    cfg = config(tmp_path, stream=False, transcoders=False, sites=["resid_post"], target_l0=[6], export=False)

    class Usage:
        free = 1000
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(SaescopeError, match=r"needs 0\.3 MiB \(310,272 bytes more.*0\.0 MiB free; use --stream"):
        run_scope(cfg, model=tiny_loaded(), progress=False, echo=lambda _: None)
    monkeypatch.setattr(shutil, "disk_usage", real)
    summary = run_scope(cfg, model=tiny_loaded(), progress=False, echo=lambda _: None)
    assert summary["saes"] == 3 and summary["activation_shards"] >= 3
    assert summary["memory"]["store_bytes"] == 768 * (3 * 32 * 4 + 20)


def test_cli_refuses_bad_layers_and_sites_with_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["scope", "tiny", "--out", str(tmp_path / "x"), "--sites", "resid_post,resid_pre"])
    assert result.exit_code == 2 and "resid_pre" in result.output
    result = runner.invoke(app, ["scope", "tiny", "--out", str(tmp_path / "x"), "--l0", "huge"])
    assert result.exit_code == 2 and "small" in result.output
    result = runner.invoke(app, ["scope", "tiny", "--out", str(tmp_path / "x"), "--text", "nonsense:spec"])
    assert result.exit_code == 2 and "text spec" in result.output
    assert not (tmp_path / "x").exists()


def test_browser_index_groups_saes_by_site_then_layer_numerically(tmp_path):
    from saescope.browse.server import BrowseApp

    cfg = config(tmp_path, transcoders=False, target_l0=[6], tokens=32 * 12, export=False)
    run_scope(cfg, model=tiny_loaded(), progress=False, echo=lambda _: None)
    suite = cfg.out / "suite" / "resid_post"
    shutil.copytree(suite / "layer_1", suite / "layer_10")      # sorts before layer_2 as text
    home = BrowseApp(cfg.out).home_page()
    heads = [f"{site} · layer {n}" for site in ("mlp_out", "resid_post") for n in ((0, 1, 2) if site == "mlp_out"
                                                                                    else (0, 1, 2, 10))]
    places = [home.index(h) for h in heads]
    assert places == sorted(places)
    assert home.index("resid_post/layer_2/") < home.index("resid_post/layer_10/") < home.index("</table>")


@pytest.mark.integration
def test_cli_scope_on_the_embedded_gemma_streams_two_layers(tmp_path):
    """The acceptance command, smaller: the real model, its first and last layer, streamed."""
    runner = CliRunner()
    out = tmp_path / "gemma"
    result = runner.invoke(app, ["scope", "gemma-3-270m", "--out", str(out), "--layers", "0-18"])
    assert result.exit_code == 2 and "layer(s) 18" in result.output and "0-17" in result.output
    result = runner.invoke(app, ["scope", "gemma-3-270m", "--out", str(out), "--layers", "0,17", "--sites", "resid_post",
                                 "--width", "64", "--target-l0", "20", "--tokens", "6144", "--batch-size", "512",
                                 "--context-len", "128", "--buffer-rows", "2048", "--stream", "--eval-windows", "1",
                                 "--export"])
    assert result.exit_code == 0, result.output
    assert not list(out.rglob("shard_*.safetensors"))
    rows = json.loads((out / "eval" / "table.json").read_text())["rows"]
    assert sorted(r["name"].split("/")[1] for r in rows) == ["layer_0", "layer_17"]
    assert all(math.isfinite(r["delta_loss"]) for r in rows)
    assert {p.name for p in (out / "report" / "figures").glob("*by_layer_resid_post.png")} == {
        f"{m}_by_layer_resid_post.png" for m in ("fvu", "delta_loss", "l0", "dead_dense")}
    assert sorted(p.name for p in (out / "release" / "resid_post_all").iterdir()) == [
        "layer_0_width_64_l0_medium", "layer_17_width_64_l0_medium"]


class CharText(CharTokenizer):
    """The tiny model's character tokenizer, with what dashboards need to print a token."""

    def convert_ids_to_tokens(self, token_id):
        return f"t{token_id}"

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def tiny_with_text():
    lm = tiny_loaded()
    lm.tokenizer = CharText()
    return lm


def dashboard_mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "suite").rglob("dashboards/*")
            if p.is_file()}


def test_streamed_scope_builds_dashboards_on_a_finished_run_resumes_them_and_releases_them(tmp_path):
    from saescope.store.index import StoreIndex
    from saescope.suite import sae_folders

    quiet = {"progress": False, "echo": lambda _: None}
    kw = {"layers": "1-2", "sites": ["resid_post"], "target_l0": [6], "tokens": 32 * 12}
    cfg = config(tmp_path, **kw)
    summary = run_scope(cfg, model=tiny_with_text(), **quiet)       # the default: no dashboards, no store for them
    run = cfg.out
    assert summary["dashboards"] is None and "dashboards" not in summary["seconds"]
    assert not (run / "dashboard_activations").exists() and not list(run.rglob("dashboards"))
    # --dashboards added to the finished run: allowed (a post-training stage), builds every SAE's dashboards
    lines: list[str] = []
    cfg = config(tmp_path, **kw, dashboards=True, dashboard_tokens=200)
    summary = run_scope(cfg, model=tiny_with_text(), progress=False, echo=lines.append)
    folders = sae_folders(run)
    assert len(folders) == 4 and summary["dashboards"] == {"built": 4, "skipped": 0,
                                                           "store": str(run / "dashboard_activations"), "rows": [200]}
    assert summary["seconds"]["dashboards"] > 0
    assert any(line.startswith("[5/6] latent dashboards of 4 SAE(s)") for line in lines)
    assert any(line.startswith("[6/6] report") for line in lines)
    index = StoreIndex.load(run / "dashboard_activations")
    assert index.complete and index.rows == 200
    assert set(index.sites) == {f"{kind}/layer_{n}" for kind in ("resid_post", "mlp_in") for n in (1, 2)}
    assert index.settings["held_out_fraction"] == cfg.held_out_fraction        # training documents only
    assert summary["memory"]["dashboard_store_bytes"] == 200 * (4 * 32 * 4 + 20)
    for folder in folders:
        dash = folder / "dashboards"
        assert (dash / "index.html").is_file()
        records = (dash / "latents.jsonl").read_text().splitlines()
        assert len(records) == 32 and json.loads(records[0])["index"] == 0
        assert json.loads((dash / "summary.json").read_text())["rows"] == 200
    assert sum(json.loads(r)["count"] for f in folders for r in (f / "dashboards" / "latents.jsonl").open()) > 0
    page = (run / "report" / "by_layer.html").read_text()
    assert page.count("/dashboards/index.html'>dashboards</a>") == 4       # the report, written after, links them
    # the release carries each SAE's dashboards beside its parameters
    released = sorted((run / "release").glob("*_all/*"))
    assert len(released) == 4
    for folder in released:
        assert (folder / "params.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "dashboards" / "index.html").is_file() and (folder / "dashboards" / "latents.jsonl").is_file()
    # re-running skips the dashboards already built (files untouched) and the store is finished already
    before = dashboard_mtimes(run)
    shards = sorted(p.stat().st_mtime_ns for p in (run / "dashboard_activations").rglob("*.safetensors"))
    assert len(before) >= 4 * 3
    summary = run_scope(cfg, model=tiny_with_text(), **quiet)
    assert summary["dashboards"]["built"] == 0 and summary["dashboards"]["skipped"] == 4
    assert dashboard_mtimes(run) == before
    assert sorted(p.stat().st_mtime_ns for p in (run / "dashboard_activations").rglob("*.safetensors")) == shards
    assert all((f / "dashboards" / "index.html").is_file() for f in sorted((run / "release").glob("*_all/*")))
    # one SAE's dashboards removed: only that one is rebuilt
    shutil.rmtree(folders[0] / "dashboards")
    summary = run_scope(cfg, model=tiny_with_text(), **quiet)
    assert summary["dashboards"]["built"] == 1 and (folders[0] / "dashboards" / "index.html").is_file()
    assert {k: v for k, v in dashboard_mtimes(run).items() if k in before and not k.startswith(
        str(folders[0].relative_to(run)))} == {k: v for k, v in before.items()
                                              if not k.startswith(str(folders[0].relative_to(run)))}


def test_cached_scope_builds_dashboards_from_the_training_store(tmp_path):
    cfg = config(tmp_path, stream=False, layers="1", sites=["resid_post"], transcoders=False, target_l0=[6],
                 tokens=32 * 12, export=False, dashboards=True, dashboard_tokens=150)
    summary = run_scope(cfg, model=tiny_with_text(), progress=False, echo=lambda _: None)
    assert not (cfg.out / "dashboard_activations").exists()
    assert summary["dashboards"]["built"] == 1 and summary["dashboards"]["store"] == str(cfg.out / "activations")
    dash = next((cfg.out / "suite").rglob("dashboards"))
    assert json.loads((dash / "summary.json").read_text())["rows"] == 150      # the first 150 of 384 stored rows
    assert (dash / "index.html").is_file() and len((dash / "latents.jsonl").read_text().splitlines()) == 32


def test_cli_scope_dashboard_flags_reach_the_config(tmp_path, monkeypatch):
    import saescope.scope

    seen = []

    def fake(cfg, echo=print):
        seen.append(cfg)
        return {"saes": 1, "by_layer": "x", "release": None, "seconds": {"total": 1.0},
                "dashboards": {"built": 1, "skipped": 0} if cfg.dashboards else None}
    monkeypatch.setattr(saescope.scope, "run_scope", fake)
    runner = CliRunner()
    result = runner.invoke(app, ["scope", "tiny", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert not seen[-1].dashboards and seen[-1].dashboard_tokens == ScopeConfig.model_fields["dashboard_tokens"].default
    result = runner.invoke(app, ["scope", "tiny", "--out", str(tmp_path / "a"), "--dashboards", "--dashboard-tokens",
                                 "4096"])
    assert result.exit_code == 0, result.output
    assert seen[-1].dashboards and seen[-1].dashboard_tokens == 4096 and "dashboards: 1 built" in result.output
    result = runner.invoke(app, ["scope", "tiny", "--out", str(tmp_path / "a"), "--dashboard-tokens", "0"])
    assert result.exit_code == 2 and "dashboard_tokens" in result.output
