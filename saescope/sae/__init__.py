"""Sparse autoencoder architectures and their maths."""

from saescope.sae.jumprelu import JumpReLUSAE, TrainingOutput
from saescope.sae.standardize import fold_norm_scale, standardize

__all__ = ["JumpReLUSAE", "TrainingOutput", "fold_norm_scale", "standardize"]
