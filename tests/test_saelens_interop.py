"""Interoperability with SAELens itself (the second implementation): it loads our files, we load its files,
and both compute the same latents and reconstructions."""

from __future__ import annotations

import pytest
import torch

from saescope import JumpReLUSAE, load_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is a dev extra (pip install -e '.[dev]')")
from sae_lens import SAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE as LensJumpReLUSAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig  # noqa: E402

D_IN, D_SAE = 16, 48


def random_sae(norm_scale: float, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(D_IN, D_SAE, norm_scale=norm_scale, seed=seed, model="tiny", site="resid_post", layer=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) * 0.4)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.4)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.2)
        sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae


@pytest.mark.parametrize("norm_scale", [1.0, 4.0])
def test_saelens_loads_our_file_and_computes_the_same(tmp_path, norm_scale):
    ours = random_sae(norm_scale)
    ours.save(tmp_path / "s", format="saelens")
    theirs = SAE.load_from_disk(tmp_path / "s")
    assert isinstance(theirs, LensJumpReLUSAE)
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(3)) * norm_scale
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        x_hat_theirs = theirs.decode(f_theirs)
        f_ours = ours.encode(x)
        x_hat_ours = ours(x)
    assert (f_ours > 0).float().mean() > 0.1          # the comparison is not all zeros
    # SAELens reads raw activations: its latents are C × ours (Appendix A), reconstructions equal.
    torch.testing.assert_close(f_theirs, norm_scale * f_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_theirs, x_hat_ours, rtol=1e-5, atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"


def test_we_load_a_file_saelens_saved(tmp_path):
    torch.manual_seed(0)
    theirs = LensJumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        theirs.threshold.copy_(torch.rand(D_SAE) * 0.3)
    theirs.save_model(tmp_path / "lens")
    ours = load_sae(tmp_path / "lens")
    assert ours.config.apply_b_dec_to_input and ours.norm_scale == 1.0
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        f_theirs = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), f_theirs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), theirs.decode(f_theirs), rtol=1e-6, atol=1e-6)
        assert (f_theirs > 0).float().mean() > 0.1
    # and back: our standardized version in SAELens format still agrees with SAELens's original
    std = ours.standardize()
    std.save(tmp_path / "again", format="saelens")
    again = SAE.load_from_disk(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x)), theirs.decode(theirs.encode(x)),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- transcoders (jumprelu_transcoder / _skip_)
from sae_lens.saes.transcoder import JumpReLUSkipTranscoder as LensSkipTranscoder  # noqa: E402
from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig  # noqa: E402
from sae_lens.saes.transcoder import JumpReLUTranscoder as LensTranscoder  # noqa: E402

from saescope.sae.transcoder import JumpReLUTranscoder  # noqa: E402

D_OUT = 11


def random_transcoder(skip: bool, norm_scale: float, seed: int = 0) -> JumpReLUTranscoder:
    g = torch.Generator().manual_seed(seed)
    tc = JumpReLUTranscoder(D_IN, D_SAE, norm_scale, d_out=D_OUT, skip=skip, seed=seed, model="tiny",
                            site="mlp_in", layer=3)
    with torch.no_grad():
        for _, p in tc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        tc.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.2)
    return tc


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("norm_scale", [1.0, 4.0])
def test_saelens_loads_our_transcoder_and_computes_the_same(tmp_path, skip, norm_scale):
    ours = random_transcoder(skip, norm_scale)
    ours.save(tmp_path / "t", format="saelens")
    theirs = SAE.load_from_disk(tmp_path / "t")
    assert type(theirs) is (LensSkipTranscoder if skip else LensTranscoder)
    assert theirs.cfg.d_out == D_OUT
    assert (theirs.cfg.metadata.hook_name, theirs.cfg.metadata.hook_name_out) == ("blocks.3.hook_mlp_in",
                                                                                  "blocks.3.hook_mlp_out")
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(5)) * norm_scale
    with torch.no_grad():
        f_ours = ours.encode(x)
        assert (f_ours > 0).float().mean() > 0.1
        torch.testing.assert_close(theirs.encode(x), norm_scale * f_ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_we_load_a_skip_transcoder_saelens_saved(tmp_path):
    torch.manual_seed(0)
    theirs = LensSkipTranscoder(JumpReLUSkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT,
                                                             apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        theirs.threshold.copy_(torch.rand(D_SAE) * 0.2)
    assert tuple(theirs.W_skip.shape) == (D_OUT, D_IN)      # SAELens keeps the transpose of ours
    theirs.save_model(tmp_path / "lens")
    ours = load_sae(tmp_path / "lens")
    assert isinstance(ours, JumpReLUTranscoder) and ours.skip and ours.d_out == D_OUT
    torch.testing.assert_close(ours.W_skip, theirs.W_skip.detach().T, rtol=0, atol=0)
    x = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        assert (ours.encode(x) > 0).float().mean() > 0.1
