"""evaluate_run on a run directory (SAEs + a transcoder, two text domains) and the offline HTML report,
checked by parsing the page and by opening it in headless Chromium."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from saescope.cli import app
from saescope.evaluate.run import EvalConfig, evaluate_run, held_out_batches
from saescope.folding import fold_mlp_in_norm
from saescope.models import LoadedModel
from saescope.report import write_report
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.transcoder import JumpReLUTranscoder
from saescope.sites import read_sites
from saescope.splice import run_with_splice

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
D = 32


class ByteTokenizer:
    """Bytes → ids 3..258; BOS 1, EOS 2, pad 0 (enough for saescope.corpus.pack_windows)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]


def _model() -> LoadedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lm = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial RMSNorm gains, so folding the mlp_in gain (App. B) matters
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return LoadedModel(model=lm, tokenizer=ByteTokenizer(), name="tiny-llama", architecture="llama",
                       n_layers=3, d_model=D)


def _save(sae, run: Path, rel: str) -> None:
    sae.config.model = "tiny-llama"
    sae.standardize().save(run / "suite" / rel)


CONFIG = {"context_len": 24, "windows_per_domain": 4, "batch_size": 2, "uniformity_tokens": 64,
          "position_bins": 8}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for i, (width, threshold) in enumerate([(48, 0.02), (48, 0.15), (96, 0.06)]):
        sae = JumpReLUSAE(D, width, seed=i, norm_scale=0.12)  # resid_post of the tiny model: ‖x‖ ≈ 0.12
        sae.config.site, sae.config.layer = "resid_post", 1
        with torch.no_grad():
            sae.threshold.fill_(threshold)
        _save(sae, run, f"resid_post/layer_1/width_{width}/average_l0_{i}")
    transcoder = JumpReLUTranscoder(D, 40, seed=7)
    transcoder.config.site, transcoder.config.layer = "mlp_in", 1
    transcoder.config = transcoder.config.model_copy(update={"training": {"target_site": "mlp_out/layer_1"}})
    with torch.no_grad():
        transcoder.threshold.fill_(0.02)
    _save(transcoder, run, "transcoder/layer_1/width_40/average_l0_5")
    (run / "config.toml").write_text('model = "tiny-llama"\n')
    loaded = _model()
    table_path = evaluate_run(run, model=loaded, progress=False, **CONFIG)
    return run, loaded, json.loads(table_path.read_text())


def test_evaluate_run_writes_every_number(evaluated):
    run, _, table = evaluated
    names = [r["name"] for r in table["results"]]
    assert len(names) == 4 and any(n.startswith("transcoder/") for n in names)
    for r in table["results"]:
        m = r["metrics"]
        for key in ("l0", "fvu", "mse", "cosine", "clean_loss", "spliced_loss", "delta_loss", "loss_recovered",
                    "dead", "dense", "r_l0", "effective_active_latents"):
            assert isinstance(m[key], (int, float)), (r["name"], key)
        assert 0 < m["uniformity_tokens"] <= 64  # tokens with at least one active latent, of the first 64
        assert m["delta_loss_by_position"]["start"]
        assert sum(m["log10_frequency_histogram"]["counts"]) + m["dead"] == m["d_sae"]
        assert set(r["domains"]) == {"shakespeare", "python"}
        assert (run / "eval" / (r["name"].replace("/", "__") + ".json")).is_file()
    kinds = {r["name"]: r["kind"] for r in table["results"]}
    tc = next(r for r in table["results"] if r["kind"] == "transcoder")
    assert tc["site"] == "mlp_in/layer_1->mlp_out/layer_1"
    assert sorted(kinds.values()).count("sae") == 3
    assert table["results"][0]["metrics"]["l0"] > table["results"][1]["metrics"]["l0"]  # higher threshold
    assert table["eval_config"]["context_len"] == 24 and table["run_config"]["model"] == "tiny-llama"


def test_transcoder_numbers_match_an_independent_computation(evaluated):
    """The transcoder reads the gain-free mlp_in (App. B) and is spliced at mlp_out."""
    run, _, table = evaluated
    from saescope.formats import load_sae
    tc = load_sae(run / "suite" / "transcoder/layer_1/width_40/average_l0_5")
    model = _model().model
    fold_mlp_in_norm(model)
    batches = held_out_batches(ByteTokenizer(), EvalConfig(**CONFIG))
    ys, yhs, deltas = [], [], []
    for b in batches:
        acts = read_sites(model, b.input_ids, ["mlp_in/layer_1", "mlp_out/layer_1"])
        with torch.no_grad():
            y_hat_full = tc(acts["mlp_in/layer_1"])
        ys.append(acts["mlp_out/layer_1"][b.mask].double().numpy())
        yhs.append(y_hat_full[b.mask].double().numpy())
        clean = run_with_splice(model, b.input_ids, None, None).loss_per_token
        spliced = run_with_splice(model, b.input_ids, "mlp_out/layer_1", lambda a, r=y_hat_full: r,
                                  splice_mask=b.mask).loss_per_token
        counted = b.mask[:, :-1]
        deltas.append(((spliced - clean)[counted]).double().numpy())
    y, yh = np.concatenate(ys), np.concatenate(yhs)
    m = next(r for r in table["results"] if r["kind"] == "transcoder")["metrics"]
    assert m["fvu"] == pytest.approx(((y - yh) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-5)
    assert m["delta_loss"] == pytest.approx(np.concatenate(deltas).mean(), abs=1e-5)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.rows, self.links = [], set(), {}, []
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("a", "link", "script"):
            self.links.append(a.get("href") or a.get("src") or "")
        if tag == "table":
            self._table = a.get("id")
            self.rows[self._table] = 0
        if tag == "tr" and self._table:
            self.rows[self._table] += 1


def test_report_page_has_figures_tables_and_config(evaluated):
    run, _, table = evaluated
    page = write_report(run)
    text = page.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(text)
    assert len(parsed.images) == 6
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for fig in ("frontier_fvu", "frontier_delta_loss", "delta_loss_by_position", "density", "domains",
                "uniformity"):
        assert (run / "report" / "figures" / f"{fig}.png").stat().st_size > 5000
        assert f"fig-{fig}" in parsed.ids
    assert parsed.rows["summary-table"] == 1 + 4
    assert parsed.rows["domain-table"] == 1 + 4 * 2
    assert parsed.rows["uniformity-table"] == 1 + 4
    assert "config-json" in parsed.ids and "context_len" in text
    assert not any(link.startswith(("http:", "https:", "//")) for link in parsed.links)  # works offline
    assert "<script" not in text
    assert json.loads((run / "report" / "metrics.json").read_text()) == table


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("the browser check needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,2400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_report_renders_in_headless_chromium(evaluated, browser, tmp_path):
    run, _, _ = evaluated
    page = write_report(run)
    browser.get(page.resolve().as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == 6
    assert all(done and w > 300 and h > 200 for done, w, h in images)
    rows = browser.execute_script("return document.querySelectorAll('#domain-table tbody tr').length")
    assert rows == 8
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.id)")
    assert {"summary", "figures", "uniformity", "domains", "config"} <= set(headings)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10000


def test_cli_report_and_clear_errors(evaluated, tmp_path):
    run, _, _ = evaluated
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output
    missing = runner.invoke(app, ["report", str(tmp_path)])
    assert missing.exit_code == 2 and "saescope evaluate" in missing.output
    empty = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert empty.exit_code == 2 and "no SAEs found" in empty.output
    bad = runner.invoke(app, ["evaluate", str(run), "--windows", "0"])
    assert bad.exit_code == 2


def test_delta_loss_frontier_draws_the_bootstrap_interval(evaluated):
    """The Δ loss frontier's error bars are the evaluator's interval (table.json), point by point; the
    per-domain table carries each domain's interval."""
    from saescope.report.figures import frontier_lines

    _, _, table = evaluated
    results = table["results"]
    lines = frontier_lines(results, "delta_loss")
    by_l0 = {r["metrics"]["l0"]: r["metrics"] for r in results}
    drawn = 0
    for line in lines:
        assert line["yerr"] is not None and "95% interval" in line["label"]
        for x, y, down, up in zip(line["x"], line["y"], *line["yerr"]):
            ci = by_l0[x]["delta_loss_ci"]
            assert y == by_l0[x]["delta_loss"] and down >= 0 and up >= 0
            assert down == pytest.approx(max(y - ci["lower"], 0.0), abs=1e-12)
            assert up == pytest.approx(max(ci["upper"] - y, 0.0), abs=1e-12)
            drawn += 1
    assert drawn == len(results)
    assert all(line["yerr"] is None for line in frontier_lines(results, "fvu"))    # FVU has no interval
    no_ci = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "delta_loss_ci"}} for r in results]
    assert all(line["yerr"] is None for line in frontier_lines(no_ci, "delta_loss"))
    from saescope.report.html import _domain_rows

    columns, rows = _domain_rows(results)
    assert "delta_loss_lower" in columns and "fvu_rest" in columns
    for row in rows:
        r = next(r for r in results if r["name"] == row["sae"])
        assert row["delta_loss_lower"] == r["domains"][row["domain"]]["delta_loss_ci"]["lower"]


def test_frontier_groups_keep_baselines_penalties_and_batch_targets_apart():
    from saescope.report.figures import group_key

    base = {"kind": "sae", "site": "resid_post/layer_6", "d_sae": 4096}
    keys = {group_key({**base, "training": training}) for training in (
        {"target_l0": 60, "frequency_penalty": 10}, {"target_l0": 60, "frequency_penalty": 10, "target_l0_over": "batch"},
        {"architecture": "topk", "k": 60}, {"sparsity_coefficient": 1e-3})}
    assert len(keys) == 4
    assert any(k.endswith("target on the batch mean L0") for k in keys)
