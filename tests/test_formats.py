"""Every file format: round trips, independent references for what the files hold, and refusal of bad files."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saescope import JumpReLUSAE, load_sae
from saescope.errors import SAEFileError
from saescope.formats import FORMATS, detect_format
from saescope.formats.gemma_scope import release_folder, width_name
from saescope.formats.gemma_scope_2 import release_folder as release_folder_2

D_IN, D_SAE = 12, 40


def trained_like(dtype=torch.float32, norm_scale=3.5, seed=0, **metadata) -> JumpReLUSAE:
    """An SAE with random (non-initial) parameters, as if trained: every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(D_IN, D_SAE, norm_scale=norm_scale, dtype=dtype, seed=seed, **metadata)
    with torch.no_grad():
        for name in ("W_enc", "W_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.4)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.1)
        sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae


def raw_inputs(n=64, seed=1, scale=3.5) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_round_trip_is_bit_identical(tmp_path, dtype):
    sae = trained_like(dtype, model="tiny", site="resid_post", layer=3, training={"tokens": 123})
    sae.save(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert back.config == sae.config
    for name, t in sae.state_tensors().items():
        u = getattr(back, name).detach()
        assert u.dtype == t.dtype and torch.equal(u, t), name
    x = raw_inputs()
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))


@pytest.mark.parametrize("fmt", ["gemma-scope", "gemma-scope-2", "saelens"])
def test_standardized_sae_round_trips_bit_identically_in_every_format(tmp_path, fmt):
    sae = trained_like(site="mlp_out", layer=2).standardize()
    sae.save(tmp_path / fmt, format=fmt)
    assert detect_format(tmp_path / fmt)[0] == fmt
    back = load_sae(tmp_path / fmt)
    for name, t in sae.state_tensors().items():
        assert torch.equal(getattr(back, name).detach(), t), (fmt, name)
    x = raw_inputs()
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))


@pytest.mark.parametrize("fmt", ["gemma-scope", "gemma-scope-2", "saelens"])
def test_unstandardized_sae_saved_in_raw_formats_keeps_reconstructions(tmp_path, fmt):
    """Formats without a norm scale fold C (and, except SAELens, b_dec) in: same x̂, latents C×."""
    sae = trained_like(dtype=torch.float64)
    sae.save(tmp_path / fmt, format=fmt)
    back = load_sae(tmp_path / fmt)
    assert back.norm_scale == 1.0
    x = raw_inputs().double()
    C = sae.norm_scale
    torch.testing.assert_close(back(x), sae(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.encode(x), C * sae.encode(x), rtol=1e-9, atol=1e-9)
    assert back.config.apply_b_dec_to_input == (fmt == "saelens")


def test_metadata_survives_formats_that_can_hold_it(tmp_path):
    sae = trained_like(model="gemma-3-270m", site="attn_out", layer=5, training={"tokens_seen": 10}).standardize()
    for fmt in ("native", "gemma-scope-2", "saelens"):
        back = load_sae(sae.save(tmp_path / fmt, format=fmt))
        assert (back.config.model, back.config.site, back.config.layer) == ("gemma-3-270m", "attn_out", 5), fmt
    # the Gemma Scope folder layout carries the layer
    folder = release_folder(tmp_path / "release", 5, D_SAE, 41.6)
    assert load_sae(sae.save(folder, format="gemma-scope")).config.layer == 5


def test_release_folder_names_match_gemma_scope():
    assert width_name(16384) == "16k" and width_name(131072) == "131k" and width_name(2**20) == "1m"
    assert width_name(65536) == "65k" and width_name(4096) == "4k"
    assert release_folder("r", 12, 16384, 82.4) == Path("r/layer_12/width_16k/average_l0_82")
    assert release_folder_2("r", "resid_post", 9, 262144, "small") == Path(
        "r/resid_post/layer_9_width_262k_l0_small")


# ------------------------------------------------------------------------- independent reference for the files
def test_hand_built_params_npz_matches_a_numpy_reference(tmp_path):
    """A params.npz written by numpy alone (as the release ships it) gives the eq. 10-11 numbers in float64."""
    rng = np.random.default_rng(0)
    p = {"W_enc": rng.normal(size=(D_IN, D_SAE)) * 0.3, "W_dec": rng.normal(size=(D_SAE, D_IN)) * 0.3,
         "b_enc": rng.normal(size=D_SAE) * 0.1, "b_dec": rng.normal(size=D_IN) * 0.1,
         "threshold": rng.uniform(0, 0.5, size=D_SAE)}
    folder = tmp_path / "layer_7" / "width_0k" / "average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    sae = load_sae(folder)
    assert sae.config.standardized and sae.config.layer == 7 and sae.dtype == torch.float64
    x = rng.normal(size=(50, D_IN)) * 2
    z = x @ p["W_enc"] + p["b_enc"]
    f = np.where(z > p["threshold"], z, 0.0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(sae.encode(xt).detach().numpy(), f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sae(xt).detach().numpy(), x_hat, rtol=1e-12, atol=1e-12)


def test_saelens_file_holds_the_keys_saelens_writes(tmp_path):
    sae = trained_like(model="m", site="resid_post", layer=4)
    sae.save(tmp_path / "s", format="saelens")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "architecture", "metadata"):
        assert key in cfg, key
    assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.4.hook_resid_post"
    tensors = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    # SAELens's own forward, written out: z = (x − b_dec) W_enc + b_enc; f = z·1[z>θ]; x̂ = f W_dec + b_dec
    x = raw_inputs().double()
    t = {k: v.double() for k, v in tensors.items()}
    z = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f = torch.relu(z) * (z > t["threshold"])
    torch.testing.assert_close(f @ t["W_dec"] + t["b_dec"], sae.double()(x), rtol=1e-5, atol=1e-5)


def test_gemma_scope_2_file_holds_lower_case_keys(tmp_path):
    sae = trained_like(site="mlp_out", layer=1)
    sae.save(tmp_path / "g", format="gemma-scope-2")
    tensors = load_file(str(tmp_path / "g" / "params.safetensors"))
    assert set(tensors) == {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["architecture"] == "jump_relu"
    assert cfg["hf_hook_point_in"] == "model.layers.1.post_feedforward_layernorm.output"


# --------------------------------------------------------------------------------------------- bad input
def _write_native(tmp_path) -> Path:
    return trained_like(site="resid_post", layer=0).save(tmp_path / "n")


def test_missing_key_names_file_and_key(tmp_path):
    folder = _write_native(tmp_path)
    tensors = load_file(str(folder / "sae.safetensors"))
    del tensors["threshold"]
    save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFileError) as exc:
        load_sae(folder)
    msg = str(exc.value)
    assert "sae.safetensors" in msg and "threshold" in msg and "missing" in msg


def test_wrong_shape_names_key_and_expected_shape(tmp_path):
    folder = _write_native(tmp_path)
    tensors = load_file(str(folder / "sae.safetensors"))
    tensors["b_dec"] = torch.zeros(D_IN + 1)
    save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(SAEFileError, match=rf"b_dec.*\[{D_IN}\]"):
        load_sae(folder)


def test_d_in_that_does_not_match_the_site_is_refused(tmp_path):
    folder = _write_native(tmp_path)
    assert load_sae(folder, expect_d_in=D_IN).d_in == D_IN
    with pytest.raises(SAEFileError, match=r"d_in 12 but site resid_post has width 640") as exc:
        load_sae(folder, expect_d_in=640)
    assert "W_enc" in str(exc.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_values_are_refused_in_every_format(tmp_path, fmt):
    sae = trained_like().standardize()
    with torch.no_grad():
        sae.W_dec[3, 4] = float("nan")
    sae.save(tmp_path / fmt, format=fmt)
    with pytest.raises(SAEFileError, match="non-finite") as exc:
        load_sae(tmp_path / fmt)
    assert ("W_dec" in str(exc.value)) or ("w_dec" in str(exc.value))


class _Exploit:
    """Unpickling this runs code: it would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_npz_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    arrays = {n: np.zeros(s) for n, s in (("W_enc", (2, 3)), ("W_dec", (3, 2)), ("b_enc", 3), ("b_dec", 2))}
    threshold = np.empty(1, dtype=object)
    threshold[0] = _Exploit(marker)
    np.savez(folder / "params.npz", threshold=threshold, **arrays)
    with pytest.raises(SAEFileError, match="never unpickles") as exc:
        load_sae(folder)
    assert "threshold" in str(exc.value) and "params.npz" in str(exc.value)
    assert not marker.exists()


def test_torch_save_file_posing_as_safetensors_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 2, "d_sae": 3, "architecture": "jumprelu"}))
    torch.save({"W_enc": _Exploit(marker)}, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFileError, match="pickle") as exc:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(exc.value)
    assert not marker.exists()


def test_raw_pickle_and_pt_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    pt = tmp_path / "sae.pt"
    pt.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(SAEFileError, match="never unpickles"):
        load_sae(pt)
    assert not marker.exists()


def test_corrupt_files_and_wrong_architecture_get_clear_errors(tmp_path):
    folder = _write_native(tmp_path)
    (folder / "sae.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(SAEFileError, match="cannot be read as safetensors"):
        load_sae(folder)
    (folder / "saescope.json").write_text("{broken")
    with pytest.raises(SAEFileError, match="not valid JSON"):
        load_sae(folder)
    other = trained_like().save(tmp_path / "s", format="saelens")
    cfg = json.loads((other / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (other / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="'gated'.*jumprelu"):
        load_sae(other)
    with pytest.raises(SAEFileError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SAEFileError, match="holds no SAE"):
        load_sae(empty)


def test_npz_that_is_not_an_archive_is_refused(tmp_path):
    folder = tmp_path / "z"
    folder.mkdir()
    with zipfile.ZipFile(folder / "params.npz", "w") as zf:
        zf.writestr("junk.txt", "hello")
    with pytest.raises(SAEFileError, match="params.npz"):
        load_sae(folder)
