"""Exporting a suite to the Gemma Scope and Gemma Scope 2 release layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saescope import JumpReLUSAE, load_sae
from saescope.errors import SaescopeError
from saescope.suite import export_suite, find_suite


def make_suite(root: Path) -> dict[tuple[int, int], JumpReLUSAE]:
    saes = {}
    for d_sae in (32, 64):
        for l0 in (9, 40, 120):
            sae = JumpReLUSAE(8, d_sae, norm_scale=3.0, seed=l0 + d_sae, site="resid_post", layer=6,
                              training={"final_l0": l0 + 0.3})
            with torch.no_grad():
                sae.b_dec.normal_()
            sae.save(root / "resid_post" / "layer_6" / f"width_{d_sae}" / f"average_l0_{l0}")
            saes[d_sae, l0] = sae
    return saes


def test_find_suite_reads_site_layer_width_and_l0(tmp_path):
    make_suite(tmp_path / "suite")
    entries = find_suite(tmp_path / "suite")
    assert [(e.site, e.layer, e.d_sae, e.average_l0) for e in entries] == [
        ("resid_post", 6, 32, 9), ("resid_post", 6, 32, 40), ("resid_post", 6, 32, 120),
        ("resid_post", 6, 64, 9), ("resid_post", 6, 64, 40), ("resid_post", 6, 64, 120)]


def test_export_gemma_scope_2_layout_names_sizes_by_l0(tmp_path):
    saes = make_suite(tmp_path / "suite")
    export_suite(tmp_path / "suite", tmp_path / "gs2", layout="gemma-scope-2")
    x = torch.randn(20, 8) * 3
    for (d_sae, l0), size in [((32, 9), "small"), ((32, 40), "medium"), ((64, 120), "big")]:
        folder = tmp_path / "gs2" / "resid_post" / f"layer_6_width_{d_sae}_l0_{size}"
        assert (folder / "params.safetensors").is_file() and (folder / "config.json").is_file()
        back = load_sae(folder)
        assert back.config.standardized and (back.config.site, back.config.layer) == ("resid_post", 6)
        torch.testing.assert_close(back(x), saes[d_sae, l0](x), rtol=1e-5, atol=1e-5)


def test_export_gemma_scope_layout(tmp_path):
    saes = make_suite(tmp_path / "suite")
    export_suite(tmp_path / "suite", tmp_path / "gs", layout="gemma-scope")
    folder = tmp_path / "gs" / "resid_post" / "layer_6" / "width_32" / "average_l0_40"
    assert sorted(p.name for p in folder.iterdir()) == ["params.npz"]
    x = torch.randn(20, 8) * 3
    torch.testing.assert_close(load_sae(folder)(x), saes[32, 40](x), rtol=1e-5, atol=1e-5)


def test_export_refuses_to_overwrite_and_bad_layouts(tmp_path):
    make_suite(tmp_path / "suite")
    export_suite(tmp_path / "suite", tmp_path / "gs2")
    with pytest.raises(SaescopeError, match="already holds files"):
        export_suite(tmp_path / "suite", tmp_path / "gs2")
    with pytest.raises(SaescopeError, match="unknown layout"):
        export_suite(tmp_path / "suite", tmp_path / "x", layout="onnx")
    with pytest.raises(SaescopeError, match="no SAEs found"):
        (tmp_path / "empty").mkdir()
        export_suite(tmp_path / "empty", tmp_path / "y")


def test_export_command(tmp_path):
    from typer.testing import CliRunner

    from saescope.cli import app

    make_suite(tmp_path / "suite")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "suite"), str(tmp_path / "gs"), "--layout",
                                      "gemma-scope"])
    assert result.exit_code == 0 and "wrote 6 SAEs" in result.output, result.output
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), str(tmp_path / "gs3")])
    assert result.exit_code == 2 and "is not a folder" in result.output


def make_transcoder_suite(root: Path) -> dict[tuple[bool, int], torch.nn.Module]:
    """Plain and skip transcoders of layer 3 (two L0s each), saved as the trainer does (standardized, native,
    under transcoder/layer_<L>/...), beside one SAE."""
    from saescope.sae.transcoder import JumpReLUTranscoder

    modules: dict[tuple[bool, int], torch.nn.Module] = {}
    for skip in (False, True):
        for l0 in (12, 50):
            tc = JumpReLUTranscoder(8, 32, 3.0, skip=skip, seed=l0 + skip, site="mlp_in", layer=3,
                                    training={"kind": "transcoder", "final_l0": l0})
            with torch.no_grad():
                tc.b_dec.normal_()
                if skip:
                    tc.W_skip.normal_()
            std = tc.standardize()
            name = f"average_l0_{l0}" if not skip else f"average_l0_{l0}_2"
            std.save(root / "transcoder" / "layer_3" / "width_32" / name)
            modules[skip, l0] = std
    JumpReLUSAE(8, 32, seed=1, site="resid_post", layer=3, training={"final_l0": 20}).save(
        root / "resid_post" / "layer_3" / "width_32" / "average_l0_20")
    return modules


def test_export_transcoders_to_gemma_scope_2(tmp_path):
    from saescope.sae.transcoder import JumpReLUTranscoder

    modules = make_transcoder_suite(tmp_path / "suite")
    written = export_suite(tmp_path / "suite", tmp_path / "gs2", layout="gemma-scope-2")
    assert len(written) == 5
    x = torch.randn(20, 8) * 3
    for (skip, l0), size in [((False, 12), "small"), ((False, 50), "big"), ((True, 12), "small"),
                             ((True, 50), "big")]:
        folder = tmp_path / "gs2" / "transcoder" / f"layer_3_width_32_l0_{size}{'_affine' if skip else ''}"
        back = load_sae(folder)
        assert type(back) is JumpReLUTranscoder and back.skip == skip
        assert (back.config.site, back.config.layer) == ("mlp_in", 3)
        torch.testing.assert_close(back(x), modules[skip, l0](x), rtol=0, atol=0)
    assert (tmp_path / "gs2" / "resid_post" / "layer_3_width_32_l0_medium" / "params.safetensors").is_file()


def test_export_transcoders_to_gemma_scope_and_refuse_skip_there(tmp_path):
    from saescope.sae.transcoder import JumpReLUTranscoder

    modules = make_transcoder_suite(tmp_path / "suite")
    with pytest.raises(SaescopeError, match="no skip matrix"):
        export_suite(tmp_path / "suite", tmp_path / "gs", layout="gemma-scope")
    assert not (tmp_path / "gs").exists()                   # refused before writing anything
    for folder in (tmp_path / "suite" / "transcoder" / "layer_3" / "width_32").glob("*_2"):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    export_suite(tmp_path / "suite", tmp_path / "gs", layout="gemma-scope")
    folder = tmp_path / "gs" / "transcoder" / "layer_3" / "width_32" / "average_l0_12"
    back = load_sae(folder)
    assert type(back) is JumpReLUTranscoder and not back.skip and back.config.layer == 3
    x = torch.randn(20, 8) * 3
    torch.testing.assert_close(back(x), modules[False, 12](x), rtol=0, atol=0)
