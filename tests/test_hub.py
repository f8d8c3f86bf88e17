"""Loading from a hub repository id + folder, tested offline against a folder in the hub's cache layout."""

from __future__ import annotations

import pytest
import torch

from saescope import JumpReLUSAE, load_sae
from saescope.errors import SaescopeError
from saescope.formats.hub import looks_like_repo_id

REPO = "google/gemma-scope-2-270m-pt"
FOLDER = "resid_post/layer_12_width_16k_l0_medium"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path):
    """The layout huggingface_hub keeps: models--<owner>--<name>/refs/main and snapshots/<commit>/..."""
    repo = tmp_path / "cache" / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    sae = JumpReLUSAE(8, 16, seed=0, model="gemma-3-270m", site="resid_post", layer=12).standardize()
    sae.save(repo / "snapshots" / COMMIT / FOLDER, format="gemma-scope-2")
    return tmp_path / "cache", sae


def test_load_from_repo_id_and_folder_uses_the_cache(hub_cache):
    cache, sae = hub_cache
    back = load_sae(REPO, folder=FOLDER, cache_dir=cache)
    assert (back.config.site, back.config.layer) == ("resid_post", 12)
    assert back.config.hook_point == "model.layers.12.output"
    x = torch.randn(10, 8)
    assert torch.equal(back(x), sae(x))


def test_missing_folder_and_bare_repo_id_get_clear_errors(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(SaescopeError, match="no folder 'resid_post/layer_13"):
        load_sae(REPO, folder="resid_post/layer_13_width_16k_l0_medium", cache_dir=cache)
    with pytest.raises(SaescopeError, match="looks like a hub repository id"):
        load_sae(REPO)


def test_repo_id_detection(tmp_path):
    assert looks_like_repo_id("google/gemma-scope-2-270m-pt")
    assert not looks_like_repo_id("/abs/path")
    assert not looks_like_repo_id("a/b/c")
    assert not looks_like_repo_id(str(tmp_path))


def test_skip_transcoder_folder_from_the_hub_cache(tmp_path):
    """A Gemma Scope 2 skip-transcoder folder (transcoder_all/..._affine) read by repo id + folder."""
    from saescope.sae.transcoder import JumpReLUTranscoder

    folder = "transcoder_all/layer_7_width_16k_l0_small_affine"
    repo = tmp_path / "cache" / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    tc = JumpReLUTranscoder(8, 16, skip=True, seed=0, model="gemma-3-270m", site="mlp_in", layer=7)
    with torch.no_grad():
        tc.W_skip.normal_()
        tc.b_dec.normal_()
    tc = tc.standardize()
    tc.save(repo / "snapshots" / COMMIT / folder, format="gemma-scope-2")
    back = load_sae(REPO, folder=folder, cache_dir=tmp_path / "cache")
    assert type(back) is JumpReLUTranscoder and back.skip
    assert (back.config.site, back.config.layer) == ("mlp_in", 7)
    assert back.config.hook_point == "model.layers.7.pre_feedforward_layernorm.output"
    x = torch.randn(10, 8)
    assert torch.equal(back(x), tc(x))
