"""Transcoder files (plain and skip) in every format: bit-identical round trips, what the files hold (written
and read by hand with safetensors / numpy / json as the references), old files, and refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saescope import JumpReLUSAE, load_sae
from saescope.errors import SAEFileError, SaescopeError
from saescope.sae.transcoder import JumpReLUTranscoder

D_IN, D_SAE = 10, 32


def trained_like(skip: bool, d_out: int = 7, dtype=torch.float32, norm_scale: float = 2.5, seed: int = 0,
                 layer: int = 4) -> JumpReLUTranscoder:
    g = torch.Generator().manual_seed(seed)
    tc = JumpReLUTranscoder(D_IN, D_SAE, norm_scale, d_out=d_out, skip=skip, dtype=dtype, seed=seed,
                            model="tiny", site="mlp_in", layer=layer, training={"kind": "transcoder"})
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        tc.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.2)
    return tc


def inputs(n=50, seed=1, scale=2.5):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * scale


def assert_same_tensors(a, b):
    ta, tb = a.state_tensors(), b.state_tensors()
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_out", [D_IN, 7])
@pytest.mark.parametrize("fmt", ["native", "gemma-scope", "gemma-scope-2", "saelens"])
def test_standardized_transcoder_round_trips_bit_identically(tmp_path, fmt, d_out, skip):
    std = trained_like(skip, d_out).standardize()
    if fmt == "gemma-scope" and skip:
        with pytest.raises(SaescopeError, match="no skip matrix"):
            std.save(tmp_path / "transcoder" / "layer_4" / "width_32" / "average_l0_5", format=fmt)
        return
    folder = std.save(tmp_path / "transcoder" / "layer_4" / "width_32" / "average_l0_5", format=fmt)
    back = load_sae(folder)
    assert type(back) is JumpReLUTranscoder
    assert back.config.architecture == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
    assert back.d_out == d_out and back.skip == skip and (back.config.site, back.config.layer) == ("mlp_in", 4)
    assert_same_tensors(std, back)
    x = inputs()
    assert torch.equal(back(x), std(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_keeps_an_unstandardized_skip_transcoder_bit_for_bit(tmp_path, dtype):
    tc = trained_like(True, dtype=dtype)
    back = load_sae(tc.save(tmp_path / "t"))
    assert back.norm_scale == tc.norm_scale and not back.config.standardized
    assert back.config == tc.config
    assert_same_tensors(tc, back)
    tensors = load_file(str(tmp_path / "t" / "sae.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"}
    assert tuple(tensors["W_skip"].shape) == (D_IN, 7)
    cfg = json.loads((tmp_path / "t" / "saescope.json").read_text())
    assert (cfg["architecture"], cfg["d_out"], cfg["format_version"]) == ("jumprelu_skip_transcoder", 7, 2)


@pytest.mark.parametrize("fmt", ["gemma-scope-2", "saelens"])
def test_unstandardized_skip_transcoder_keeps_its_outputs_in_raw_formats(tmp_path, fmt):
    tc = trained_like(True, norm_scale=4.0)
    back = load_sae(tc.save(tmp_path / "t", format=fmt))
    assert back.norm_scale == 1.0
    assert torch.equal(back.W_skip, tc.W_skip)        # W_skip reads raw x the same as normalized x
    x = inputs(scale=4.0)
    torch.testing.assert_close(back(x), tc(x).detach(), rtol=1e-5, atol=1e-5)


def test_old_native_files_still_load(tmp_path):
    """Files written before architecture/d_out existed: an SAE, and a transcoder marked only by training.kind."""
    for kind, apply_b_dec in (("sae", True), ("transcoder", False)):
        folder = tmp_path / kind
        folder.mkdir()
        g = torch.Generator().manual_seed(0)
        tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
                   "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g),
                   "threshold": torch.rand(D_SAE, generator=g)}
        save_file(tensors, str(folder / "sae.safetensors"), metadata={"format": "saescope", "version": "1"})
        config = {"format": "saescope", "format_version": 1, "saescope_version": "0.1.0", "architecture": "jumprelu",
                  "d_in": D_IN, "d_sae": D_SAE, "norm_scale": 1.0, "apply_b_dec_to_input": apply_b_dec,
                  "standardized": not apply_b_dec, "bandwidth": 0.001, "dtype": "float32", "model": "tiny",
                  "site": "mlp_in" if kind == "transcoder" else "resid_post", "layer": 2, "hook_point": None,
                  "training": {"kind": kind}}
        (folder / "saescope.json").write_text(json.dumps(config))
        back = load_sae(folder)
        assert type(back) is (JumpReLUTranscoder if kind == "transcoder" else JumpReLUSAE)
        for name, value in tensors.items():
            assert torch.equal(getattr(back, name).detach(), value)
        x = inputs()
        z = (x - tensors["b_dec"] * apply_b_dec) @ tensors["W_enc"] + tensors["b_enc"]
        f = torch.where(z > tensors["threshold"], z, torch.zeros_like(z))
        torch.testing.assert_close(back(x), f @ tensors["W_dec"] + tensors["b_dec"])


def test_sae_files_do_not_write_d_out_and_stay_version_1(tmp_path):
    JumpReLUSAE(D_IN, D_SAE, seed=0).save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "saescope.json").read_text())
    assert "d_out" not in cfg and cfg["format_version"] == 1 and cfg["architecture"] == "jumprelu"


def test_gemma_scope_2_file_as_the_release_writes_it(tmp_path):
    """A folder built by hand the way Gemma Scope 2 ships a skip transcoder (no saescope metadata)."""
    g = torch.Generator().manual_seed(3)
    d_out = 6
    tensors = {"w_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
               "w_dec": torch.randn(D_SAE, d_out, generator=g), "b_dec": torch.randn(d_out, generator=g),
               "threshold": torch.rand(D_SAE, generator=g) * 0.3,
               "affine_skip_connection": torch.randn(D_IN, d_out, generator=g)}
    folder = tmp_path / "transcoder_all" / "layer_5_width_16k_l0_small_affine"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "affine_connection": True,
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}))
    tc = load_sae(folder)
    assert type(tc) is JumpReLUTranscoder and tc.skip and tc.d_out == d_out
    assert (tc.config.site, tc.config.layer, tc.config.standardized) == ("mlp_in", 5, True)
    x = inputs()
    z = x @ tensors["w_enc"] + tensors["b_enc"]
    f = torch.where(z > tensors["threshold"], z, torch.zeros_like(z))
    expected = f @ tensors["w_dec"] + tensors["b_dec"] + x @ tensors["affine_skip_connection"]
    torch.testing.assert_close(tc(x), expected)
    # config says affine but the skip matrix is missing: refused, naming the key
    del tensors["affine_skip_connection"]
    save_file(tensors, str(folder / "params.safetensors"))
    with pytest.raises(SAEFileError, match="affine_skip_connection"):
        load_sae(folder)


def test_gemma_scope_2_writes_the_release_keys_and_config(tmp_path):
    tc = trained_like(True)
    folder = tc.save(tmp_path / "t", format="gemma-scope-2")
    tensors = load_file(str(folder / "params.safetensors"))
    assert set(tensors) == {"w_enc", "b_enc", "w_dec", "b_dec", "threshold", "affine_skip_connection"}
    assert tuple(tensors["affine_skip_connection"].shape) == (D_IN, 7)
    assert tuple(tensors["w_dec"].shape) == (D_SAE, 7)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "jump_relu" and cfg["affine_connection"] is True and cfg["type"] == "transcoder"
    assert cfg["hf_hook_point_in"] == "model.layers.4.pre_feedforward_layernorm.output"
    assert cfg["hf_hook_point_out"] == "model.layers.4.post_feedforward_layernorm.output"
    plain = json.loads((trained_like(False).save(tmp_path / "p", format="gemma-scope-2") / "config.json").read_text())
    assert plain["affine_connection"] is False and plain["type"] == "transcoder"
    assert "affine_skip_connection" not in load_file(str(tmp_path / "p" / "params.safetensors"))


def test_gemma_scope_npz_transcoder_with_another_output_width(tmp_path):
    tc = trained_like(False, d_out=7).standardize()
    folder = tc.save(tmp_path / "layer_4" / "width_32" / "average_l0_5", format="gemma-scope")
    arrays = np.load(folder / "params.npz", allow_pickle=False)
    assert set(arrays.files) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert arrays["W_dec"].shape == (D_SAE, 7)
    back = load_sae(folder)
    assert type(back) is JumpReLUTranscoder and back.d_out == 7 and back.config.layer == 4


@pytest.mark.parametrize("fmt,key", [("native", "W_skip"), ("gemma-scope-2", "affine_skip_connection"),
                                     ("saelens", "W_skip")])
def test_bad_skip_matrix_is_refused_naming_the_key(tmp_path, fmt, key):
    folder = trained_like(True).standardize().save(tmp_path / "t", format=fmt)
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    good = load_file(str(weights))
    bad_values = dict(good)
    bad_values[key] = good[key].clone()
    bad_values[key][0, 0] = float("nan")
    save_file(bad_values, str(weights))
    with pytest.raises(SAEFileError, match="non-finite") as err:
        load_sae(folder)
    assert err.value.key == key
    bad_shape = dict(good)
    bad_shape[key] = torch.zeros(3, 3)
    save_file(bad_shape, str(weights))
    with pytest.raises(SAEFileError, match="shape") as err:
        load_sae(folder)
    assert err.value.key == key
    bad_dtype = dict(good)
    bad_dtype[key] = good[key].to(torch.float64)
    save_file(bad_dtype, str(weights))
    with pytest.raises(SAEFileError, match="dtype") as err:
        load_sae(folder)
    assert err.value.key == key


def test_native_config_and_weights_must_agree_about_the_skip(tmp_path):
    folder = trained_like(False).save(tmp_path / "t")
    tensors = load_file(str(folder / "sae.safetensors"))
    tensors["W_skip"] = torch.zeros(D_IN, 7)
    save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFileError, match="holds a W_skip matrix"):
        load_sae(folder)


def test_convert_command_moves_a_skip_transcoder_between_formats(tmp_path):
    from typer.testing import CliRunner

    from saescope.cli import app

    tc = trained_like(True)
    tc.save(tmp_path / "t")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "t"), str(tmp_path / "gs"), "--to", "gemma-scope"])
    assert result.exit_code == 2 and "no skip matrix" in result.output, result.output
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "t"), str(tmp_path / "gs2"), "--to", "gemma-scope-2"])
    assert result.exit_code == 0, result.output
    x = inputs()
    torch.testing.assert_close(load_sae(tmp_path / "gs2")(x), tc(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_gemma_scope_2_release_config_type_decides_the_module(tmp_path, kind):
    """Release config.json as published: ``type`` sae / transcoder, same width in and out, no skip matrix."""
    g = torch.Generator().manual_seed(5)
    tensors = {"w_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
               "w_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g),
               "threshold": torch.rand(D_SAE, generator=g) * 0.3}
    folder = tmp_path / "release" / "layer_2_width_16k_l0_big"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "params.safetensors"))
    hook_in = "model.layers.2.output" if kind == "sae" else "model.layers.2.pre_feedforward_layernorm.output"
    hook_out = "model.layers.2.output" if kind == "sae" else "model.layers.2.post_feedforward_layernorm.output"
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out, "width": 16384, "model_name": "google/gemma-3-270m",
        "architecture": "jump_relu", "l0": 120, "affine_connection": False, "type": kind}))
    module = load_sae(folder)
    assert type(module) is (JumpReLUSAE if kind == "sae" else JumpReLUTranscoder)
    assert module.config.site == ("resid_post" if kind == "sae" else "mlp_in") and module.config.layer == 2
    x = inputs()
    z = x @ tensors["w_enc"] + tensors["b_enc"]
    f = torch.where(z > tensors["threshold"], z, torch.zeros_like(z))
    torch.testing.assert_close(module(x), f @ tensors["w_dec"] + tensors["b_dec"])
