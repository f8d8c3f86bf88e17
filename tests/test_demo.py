"""The README's main command end to end, at toy size on the embedded Gemma 3 270M: every stage runs and writes
what the summary points to; the numbers it reports are the evaluator's."""

from __future__ import annotations

import json
import math

from saescope.demo import DemoConfig, run_demo, short_budget_train_config


def test_demo_runs_every_stage_on_the_embedded_model(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", tokens=3072, context_len=64, width=64, lambdas=[1e-4, 1e-2],
                     transcoder_lambda=1e-5, batch_size=256, eval_windows=1, eval_domains=["shakespeare"])
    summary = run_demo(cfg, progress=False, echo=lambda *_: None)
    out = tmp_path / "demo"
    assert (out / "report" / "index.html").is_file() and summary["report"].endswith("index.html")
    assert summary["dashboards"] and (out / summary["dashboards"].split(str(out) + "/")[1]).is_file()
    assert json.loads((out / "demo_summary.json").read_text()) == summary
    names = [row["name"] for row in summary["saes"]]
    assert sum(n.startswith("resid_post/layer_6/width_64/") for n in names) == 2
    assert sum(n.startswith("transcoder/layer_6/") for n in names) == 1
    table = {row["name"]: row for row in json.loads((out / "eval" / "table.json").read_text())["rows"]}
    for row in summary["saes"]:
        assert math.isfinite(row["l0"]) and math.isfinite(row["fvu"]) and math.isfinite(row["delta_loss"])
        assert row["l0"] == table[row["name"]]["l0"] and row["delta_loss"] == table[row["name"]]["delta_loss"]
    # the preset the command uses: the recipe plus the documented short-budget settings
    train = short_budget_train_config(cfg, out / "activations")
    assert train.initial_exclude_top_pcs == 1 and train.threshold_lr_scale == 0.1
    assert [s.threshold_lr_scale for s in train.saes if s.kind == "transcoder"] == [1.0]
    assert train.transcoder_target_scale == "target"
