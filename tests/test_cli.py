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
