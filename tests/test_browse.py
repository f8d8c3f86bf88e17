"""``saescope browse`` end to end in headless Chromium: load, pick an SAE, sort, open a latent, type a text,
click through to a firing latent's dashboard, and check that ``<script>`` from the corpus and from the user
shows as text (and never runs)."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import pytest
import torch
from dash_helpers import SCRIPT, documents, make_model, make_sae, make_tokenizer, write_store

from saescope.browse import make_server
from saescope.dashboards import DashboardSettings, build_dashboards
from saescope.errors import SaescopeError
from saescope.store import StoreIndex

SITE = "resid_post/layer_0"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browse")
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), seed=1)
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = tmp / "run"
    store = run / "activations"
    write_store(store, model, tokenizer, SITE, documents(50, seed=4))
    scale = StoreIndex.load(store).sites[SITE].norm_scale
    sae = make_sae(32, 24, SITE, model_name=str(model_dir), norm_scale=scale)
    # latent 0 reads the <script> row of the corpus, so its dashboard must show that token
    from saescope.dashboards.store_reader import iter_site_rows, read_token_table

    table = read_token_table(store)
    rows = torch.cat([b for _, b in iter_site_rows(store, SITE, 10_000)])
    script_row = int((torch.from_numpy(table.token_ids) == tokenizer.convert_tokens_to_ids(SCRIPT)).nonzero()[0])
    with torch.no_grad():
        v = rows[script_row] / scale
        sae.W_enc[:, 0] = v / v.norm() ** 2 * 6
        sae.b_enc[0] = 0
        sae.threshold[0] = 5.0
    folder = run / "suite" / "resid_post" / "layer_0" / "width_24" / "average_l0_5"
    sae.save(folder)
    build_dashboards(sae, store, tokenizer, model, out=folder / "dashboards",
                     settings=DashboardSettings(top_k=5, n_samples=8), progress=False)
    # a second SAE without dashboards
    make_sae(32, 8, SITE, model_name=str(model_dir), seed=9, norm_scale=scale).save(
        run / "suite" / "resid_post" / "layer_0" / "width_8" / "average_l0_2")
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    srv = make_server(run_dir, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}"
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_server_binds_localhost_and_escapes(server):
    assert server.startswith("http://127.0.0.1:")
    status, home = _get(server + "/")
    assert status == 200 and "width_24/average_l0_5" in home and "width_8/average_l0_2" in home
    status, body = _get(server + "/sae/0/analyze?text=" + urllib.parse.quote("the cat <script>alert(1)</script>"))
    assert status == 200 and "<script>alert(1)" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert _get(server + "/sae/7/")[0] == 404
    assert _get(server + "/sae/0/latent/999")[0] == 400
    assert _get(server + "/etc/passwd")[0] == 404
    status, body = _get(server + "/sae/1/")
    assert status == 200 and "No dashboards yet" in body


def test_find_saes_refuses_an_empty_folder(tmp_path):
    with pytest.raises(SaescopeError, match="no SAEs"):
        make_server(tmp_path, port=0)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_browser_load_search_click_through_and_escaping(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(css: str) -> None:
        """Wait for the page a click navigated to (clicks do not wait for form submissions)."""
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, css))

    def heading_has(text: str) -> None:
        WebDriverWait(browser, 60).until(lambda b: text in b.find_element(By.TAG_NAME, "h1").text)

    browser.get(server + "/")
    links = browser.find_elements(By.CSS_SELECTOR, "a.sae")
    assert [a.text for a in links] == ["resid_post/layer_0/width_24/average_l0_5", "resid_post/layer_0/width_8/average_l0_2"]
    links[0].click()
    wait_for("#latents")
    # the latent index: sort by max activation (descending) with the header's script
    assert len(browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")) == 24
    browser.find_element(By.CSS_SELECTOR, "th[data-key='max']").click()
    maxes = [float(r.get_attribute("data-max")) for r in browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")]
    assert maxes == sorted(maxes, reverse=True) and maxes[0] > 0
    browser.find_element(By.CSS_SELECTOR, "th[data-key='freq']").click()
    freqs = [float(r.get_attribute("data-freq")) for r in browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")]
    assert freqs == sorted(freqs, reverse=True)
    # open latent 0: its top context holds the corpus's <script> token, shown as text, never run
    browser.find_element(By.CSS_SELECTOR, "#latents a[href$='/latent/0']").click()
    heading_has("latent 0")
    top = browser.find_element(By.ID, "top")
    focus = top.find_element(By.CSS_SELECTOR, ".focus")
    assert focus.text == SCRIPT
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "#top script") == []
    # navigate to the next latent and back to the index
    browser.find_element(By.ID, "next").click()
    heading_has("latent 1")
    browser.find_element(By.LINK_TEXT, "all latents").click()
    wait_for("#latents")
    # search: type a text, see per-token latents, click one, land on its dashboard
    box = browser.find_element(By.ID, "text")
    typed = "the king said <img src=x onerror=window.__pwned=1> " + SCRIPT
    box.send_keys(typed)
    browser.find_element(By.ID, "go").click()
    wait_for("#tokens")
    tokens = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "code.token")]
    assert tokens[:3] == ["the", "king", "said"] and tokens[-1] == SCRIPT
    assert browser.find_element(By.ID, "typed").text == typed
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.execute_script("return window.__pwned === undefined")
    # the <script> token fires latent 0 (it was built to read that activation)
    last_row = browser.find_elements(By.CSS_SELECTOR, "#tokens tr")[-1]
    link = [a for a in last_row.find_elements(By.CSS_SELECTOR, "a.latent") if a.text == "#0"]
    assert link, last_row.text
    link[0].click()
    heading_has("latent 0")
    assert float(browser.find_element(By.ID, "maxact").text) > 0


def test_cli_dashboards_and_steer(run_dir, tmp_path):
    from typer.testing import CliRunner

    from saescope.cli import app

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    runner = CliRunner()
    result = runner.invoke(app, ["dashboards", str(run), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    small = run / "suite" / "resid_post" / "layer_0" / "width_8" / "average_l0_2"
    summary = json.loads((small / "dashboards" / "summary.json").read_text())
    assert summary["d_sae"] == 8 and summary["settings"]["top_k"] == 3
    assert summary["rows"] == StoreIndex.load(run / "activations").rows
    assert (small / "dashboards" / "latents" / "7.html").is_file()
    # bad input fails fast with exit code 2 and a message
    result = runner.invoke(app, ["dashboards", str(small), "--store", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no activation store" in result.output
    result = runner.invoke(app, ["steer", str(small), "--latent", "3", "--coefficient", "40", "--prompt",
                                 "the king said", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "steered (latent 3, α = 40)" in result.output
    result = runner.invoke(app, ["steer", str(small), "--latent", "8", "--coefficient", "1", "--prompt", "x"])
    assert result.exit_code == 2 and "latent 8 does not exist" in result.output
