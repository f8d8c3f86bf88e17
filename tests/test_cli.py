"""The ``saescope`` command: info and convert on real files, and clear exit-2 errors on bad input."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from saescope import JumpReLUSAE, load_sae
from saescope.cli import app

runner = CliRunner()


def _sae(tmp_path):
    sae = JumpReLUSAE(8, 24, norm_scale=2.0, seed=1, model="tiny", site="mlp_out", layer=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8, generator=torch.Generator().manual_seed(0)))
    return sae, sae.save(tmp_path / "native")


def test_info_prints_format_and_config(tmp_path):
    sae, folder = _sae(tmp_path)
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "format: native" in result.output
    config = json.loads(result.output.split("\n", 2)[2])
    assert config["d_in"] == 8 and config["d_sae"] == 24 and config["norm_scale"] == 2.0


def test_convert_to_every_format_keeps_reconstructions(tmp_path):
    sae, folder = _sae(tmp_path)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(5)) * 2
    for fmt in ("gemma-scope", "gemma-scope-2", "saelens", "native"):
        result = runner.invoke(app, ["convert", str(folder), str(tmp_path / fmt), "--to", fmt, "--standardize"])
        assert result.exit_code == 0, result.output
        back = load_sae(tmp_path / fmt)
        assert back.config.standardized
        torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)


def test_bad_input_exits_2_with_a_message(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    _, folder = _sae(tmp_path)
    result = runner.invoke(app, ["convert", str(folder), str(tmp_path / "x"), "--to", "onnx"])
    assert result.exit_code == 2 and "unknown format 'onnx'" in result.output


def test_demo_and_evaluate_flags_default_to_their_configs():
    """The flags read their defaults from DemoConfig / EvalConfig, so the CLI and the library cannot drift."""
    import typer.main

    from saescope.demo import DemoConfig
    from saescope.evaluate.run import EvalConfig

    commands = typer.main.get_command(app).commands
    pairs = {"demo": (DemoConfig, {}), "evaluate": (EvalConfig, {"windows": "windows_per_domain"})}
    for command, (config, renamed) in pairs.items():
        checked = 0
        for param in commands[command].params:
            field = renamed.get(param.name, param.name)
            if field in config.model_fields and param.name != "lambdas":   # --lambda unset: the config's list
                expected = config.model_fields[field].get_default(call_default_factory=True)
                default = param.default
                assert (list(default) if isinstance(expected, list) else default) == expected, (command, field)
                checked += 1
        assert checked >= 6, (command, checked)


# train flags with no config field of their own (they pick among fields, or name several at once)
TRAIN_CLI_ONLY = {"config", "sites", "transcoder_layers", "matryoshka", "preset", "dense", "no_cpu_kernels"}


def test_train_flags_take_their_help_from_the_config_fields():
    """Every `train` option is either mapped to a TrainConfig / SAESpec field, whose description is its help, or
    listed as CLI-only: a new flag, or a changed description, cannot drift from the config."""
    import typer.main

    from saescope.cli import TRAIN_FLAG_FIELDS
    from saescope.train.config import SAESpec, TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    assert set(params) == set(TRAIN_FLAG_FIELDS) | TRAIN_CLI_ONLY, set(params) ^ (set(TRAIN_FLAG_FIELDS) | TRAIN_CLI_ONLY)
    for name, (where, field) in TRAIN_FLAG_FIELDS.items():
        description = (TrainConfig if where == "run" else SAESpec).model_fields[field].description
        assert description and "\n" not in description, field
        assert params[name].help.startswith(description), (name, params[name].help, description)
    # the check is not vacuous: a flag whose help is another field's fails it
    assert not params["lr"].help.startswith(TrainConfig.model_fields["batch_size"].description)


def test_train_flags_build_frequency_and_baseline_specs(tmp_path, monkeypatch):
    import saescope.train as train_module

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(train_module, "train_from_store", fake_train)
    base = ["train", "--sites", "resid_post/layer_1", "--width", "64", "--total-tokens", "8192",
            "--out", str(tmp_path / "run")]
    result = runner.invoke(app, base + ["--target-l0", "8", "--frequency-penalty", "0"])
    assert result.exit_code == 0, result.output
    (spec,) = seen["cfg"].saes
    assert spec.target_l0 == 8 and spec.frequency_penalty == 0.0 and spec.name.endswith("_freq_0")
    result = runner.invoke(app, base + ["--target-l0", "8", "--frequency-cap", "0.3"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].saes[0].frequency_cap == 0.3 and seen["cfg"].saes[0].frequency_penalty == 10.0
    result = runner.invoke(app, base + ["--architecture", "topk", "--k", "8"])
    assert result.exit_code == 0, result.output
    (spec,) = seen["cfg"].saes
    assert spec.architecture == "topk" and spec.k == 8 and spec.name.endswith("topk_8")
    result = runner.invoke(app, base + ["--architecture", "topk"])
    assert result.exit_code == 2 and "needs --k" in result.output
    result = runner.invoke(app, ["train", "--k", "8", "--total-tokens", "10"])
    assert result.exit_code == 2 and "need --sites" in result.output
