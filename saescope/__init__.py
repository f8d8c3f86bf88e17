"""saescope: train, standardize, evaluate and browse JumpReLU SAEs on any transformer LM."""

from saescope.formats import load_sae, save_sae
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.version import __version__

__all__ = ["JumpReLUSAE", "__version__", "load_sae", "save_sae"]
