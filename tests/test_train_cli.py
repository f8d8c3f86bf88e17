"""``saescope train`` from flags and from a config file, on a real activation store; same command resumes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from saescope.cli import app
from saescope.formats import load_sae
from saescope.store import StoreWriter

runner = CliRunner()
SITE = "resid_post/layer_1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "acts"
    gen = torch.Generator().manual_seed(0)
    writer = StoreWriter(path, {SITE: 16, "mlp_in/layer_0": 16, "mlp_out/layer_0": 16}, shard_rows=500)
    dirs = torch.randn(40, 16, generator=gen)
    for chunk in range(6):
        n = 400
        codes = torch.rand(n, 40, generator=gen) * (torch.rand(n, 40, generator=gen) < 0.1)
        x = (codes @ dirs + 1.0) * 30
        writer.add({SITE: x, "mlp_in/layer_0": x / x.norm(dim=1, keepdim=True) * 4,
                    "mlp_out/layer_0": torch.randn(n, 16, generator=gen)},
                   token_ids=torch.arange(n), document_ids=torch.full((n,), chunk), positions=torch.arange(n))
    writer.close()
    return path


def _flags(store, out, tokens):
    return ["train", "--store", str(store), "--out", str(out), "--sites", SITE, "--width", "32", "--width", "48",
            "--lambda", "0.01", "--lambda", "0.1", "--transcoder-layer", "0", "--total-tokens", str(tokens),
            "--batch-size", "100", "--lr", "3e-3", "--lr-warmup-steps", "3", "--sparsity-warmup-steps", "5",
            "--log-every", "5", "--checkpoint-every", "7"]


def _suite(out):
    rows = json.loads((out / "suite" / "training_summary.json").read_text())
    return {row["sae"]: load_sae(out / row["folder"]) for row in rows}


def test_train_from_flags_and_resume_with_same_command(store, tmp_path):
    straight = tmp_path / "straight"
    result = runner.invoke(app, _flags(store, straight, 3000))
    assert result.exit_code == 0, result.output
    suite = _suite(straight)
    assert len(suite) == 8                          # (1 site + 1 transcoder layer) × 2 widths × 2 λ
    assert (straight / "suite" / "transcoder" / "layer_0").is_dir()
    # stop half-way (a shorter run), then the same command with the full length continues from the checkpoint
    resumed = tmp_path / "resumed"
    assert runner.invoke(app, _flags(store, resumed, 1500)).exit_code == 0
    result = runner.invoke(app, _flags(store, resumed, 3000))
    assert result.exit_code == 0, result.output
    again = _suite(resumed)
    for name, sae in suite.items():
        for key, value in sae.state_tensors().items():
            assert torch.equal(value, again[name].state_tensors()[key]), (name, key)
    # rerunning a finished run changes nothing
    assert runner.invoke(app, _flags(store, resumed, 3000)).exit_code == 0


def test_train_from_config_file(store, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "train.toml"
    config.write_text(f'store = "{store}"\nout_dir = "{out}"\ntotal_tokens = 1000\nbatch_size = 100\n'
                      'lr = 1e-3\nmodel = "toy"\n\n[[saes]]\nsite = "resid_post:1"\nwidth = 32\n'
                      'sparsity_coefficient = 0.05\n')
    result = runner.invoke(app, ["train", str(config), "--log-every", "2"])
    assert result.exit_code == 0, result.output
    (sae,) = _suite(out).values()
    assert sae.config.model == "toy" and sae.config.site == "resid_post" and sae.config.layer == 1
    assert sae.config.training["tokens_seen"] == 1000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_train_cli_errors(store, tmp_path):
    result = runner.invoke(app, ["train", "--store", str(store), "--sites", SITE, "--total-tokens", "100"])
    assert result.exit_code == 2 and "--width" in result.output
    result = runner.invoke(app, ["train", "--store", str(store), "--out", str(tmp_path), "--sites",
                                 "resid_post/layer_5", "--width", "8", "--lambda", "0.1", "--total-tokens", "200",
                                 "--batch-size", "100"])
    assert result.exit_code == 2 and "resid_post/layer_5" in result.output
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "nope"), "--sites", SITE, "--width", "8",
                                 "--lambda", "0.1", "--total-tokens", "200", "--batch-size", "100"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_train_gemma_scope2_flags(store, tmp_path):
    """--target-l0 (a list, λ optional), --skip transcoders and --matryoshka SAEs from flags."""
    out = tmp_path / "gs2"
    result = runner.invoke(app, ["train", "--store", str(store), "--out", str(out), "--sites", SITE,
                                 "--transcoder-layer", "0", "--width", "32", "--target-l0", "4", "--target-l0", "8",
                                 "--skip", "--matryoshka", "--total-tokens", "600", "--batch-size", "100",
                                 "--lr", "3e-3", "--lr-warmup-steps", "2", "--sparsity-warmup-steps", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "suite" / "training_summary.json").read_text())
    assert [row["sae"] for row in rows] == [
        f"{SITE}/width_32/target_l0_4_matryoshka", f"{SITE}/width_32/target_l0_8_matryoshka",
        "transcoder_skip/mlp_in/layer_0/width_32/target_l0_4", "transcoder_skip/mlp_in/layer_0/width_32/target_l0_8"]
    assert rows[0]["matryoshka_prefixes"] == [2, 4, 8, 16, 32] and rows[0]["target_l0"] == 4
    assert rows[2]["skip"] is True and rows[2]["sparsity_coefficient"] > 0
    config = (out / "config.toml").read_text()
    assert "target_l0 = 8.0" in config and "skip = true" in config
    # λ and targets cross: one SAE per (λ, target)
    out2 = tmp_path / "cross"
    result = runner.invoke(app, ["train", "--store", str(store), "--out", str(out2), "--sites", SITE, "--width", "32",
                                 "--target-l0", "4", "--lambda", "0.5", "--lambda", "2", "--matryoshka-prefix", "8",
                                 "--matryoshka-prefix", "32", "--matryoshka-weight", "2", "--matryoshka-weight", "1",
                                 "--total-tokens", "200", "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out2 / "suite" / "training_summary.json").read_text())
    assert [row["sparsity_coefficient"] for row in rows] == [0.5, 2.0]
    assert rows[0]["matryoshka_prefixes"] == [8, 32] and rows[0]["matryoshka_weights"] == [2.0, 1.0]


def test_train_gemma_scope2_from_config_file(store, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "train.toml"
    config.write_text(f'store = "{store}"\nout_dir = "{out}"\ntotal_tokens = 400\nbatch_size = 100\n'
                      '\n[[saes]]\nsite = "resid_post:1"\nwidth = 32\ntarget_l0 = 6\nmatryoshka_prefixes = "default"\n'
                      '\n[[saes]]\nsite = "mlp_in:0"\nkind = "transcoder"\nwidth = 32\ntarget_l0 = 6\nskip = true\n'
                      '\n[[saes]]\nsite = "mlp_in:0"\nkind = "transcoder"\nwidth = 32\ntarget_l0 = 6\n')
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "suite" / "training_summary.json").read_text())
    assert [row["skip"] for row in rows[1:]] == [True, False]
    skip_sae = load_sae(out / rows[1]["folder"])
    assert skip_sae.W_skip is not None and skip_sae.W_skip.abs().max() > 0
    assert load_sae(out / rows[2]["folder"]).W_skip is None


@pytest.mark.parametrize("args, message", [
    (["--sites", SITE, "--width", "8", "--target-l0", "4", "--skip"], "--skip applies to transcoders"),
    (["--transcoder-layer", "0", "--width", "8", "--target-l0", "4", "--matryoshka"], "apply to SAEs"),
    (["--sites", SITE, "--width", "8", "--target-l0", "4", "--matryoshka-weight", "1"], "needs --matryoshka"),
    (["--sites", SITE, "--width", "8", "--target-l0", "4", "--matryoshka-prefix", "4", "--matryoshka-prefix", "6"],
     "last matryoshka prefix must be the full width"),
    (["--sites", SITE, "--width", "8", "--target-l0", "20"], "more latents than the width"),
    (["--sites", SITE, "--width", "8"], "--lambda or --target-l0"),
    (["--target-l0", "4"], "need --sites or --transcoder-layer"),
    (["--transcoder-layer", "0", "--width", "8", "--lambda", "1", "--transcoder-target-scale", "own"],
     "transcoder_target_scale"),
])
def test_train_gemma_scope2_cli_errors(store, tmp_path, args, message):
    result = runner.invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "x"), "--total-tokens",
                                 "200", "--batch-size", "100", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_transcoder_target_scale_flag(store, tmp_path):
    """--transcoder-target-scale target: the transcoder's target is divided by mlp_out's own norm scale (in its
    saved config until standardized; the suite file maps raw to raw)."""
    out = tmp_path / "own"
    result = runner.invoke(app, ["train", "--store", str(store), "--out", str(out), "--transcoder-layer", "0",
                                 "--width", "16", "--lambda", "0.01", "--transcoder-target-scale", "target",
                                 "--total-tokens", "300", "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    assert 'transcoder_target_scale = "target"' in (out / "config.toml").read_text()


def test_suite_names_the_store_model_and_a_different_model_is_refused(tmp_path):
    """The README tour: `train --store` then `evaluate RUN` with no --model. The SAEs name the store's model;
    --model naming another model stops before training (exit 2), the same one is accepted."""
    from saescope.store import StoreIndex

    store = tmp_path / "acts"
    writer = StoreWriter(store, {SITE: 16}, shard_rows=500)
    writer.add({SITE: torch.randn(600, 16) * 30}, token_ids=torch.arange(600), document_ids=torch.zeros(600),
               positions=torch.arange(600))
    writer.close()
    index = StoreIndex.load(store)
    index.model = "tiny-lm"
    index.save(store)
    flags = ["train", "--store", str(store), "--sites", SITE, "--width", "32", "--lambda", "0.01",
             "--total-tokens", "400", "--batch-size", "100"]
    result = runner.invoke(app, [*flags, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    (sae,) = _suite(tmp_path / "a").values()
    assert sae.config.model == "tiny-lm"
    result = runner.invoke(app, [*flags, "--out", str(tmp_path / "b"), "--model", "other-lm"])
    assert result.exit_code == 2 and "disagrees" in result.output and "tiny-lm" in result.output
    assert not (tmp_path / "b" / "suite").exists()
    assert runner.invoke(app, [*flags, "--out", str(tmp_path / "c"), "--model", "tiny-lm"]).exit_code == 0
