"""saescope: train, standardize, evaluate and browse JumpReLU SAEs on any transformer LM."""

__version__ = "0.1.0"

from saescope.formats import load_sae, save_sae
from saescope.sae.jumprelu import JumpReLUSAE

__all__ = ["JumpReLUSAE", "__version__", "load_sae", "save_sae"]
