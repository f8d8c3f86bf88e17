"""Training JumpReLU SAEs and transcoders with the Gemma Scope recipe (§3 of the paper, App. B).

- :mod:`~saescope.train.config` — ``TrainConfig`` / ``SAESpec`` (every recipe default, changeable)
- :mod:`~saescope.train.schedules` — learning-rate and sparsity-coefficient warm-ups
- :mod:`~saescope.train.decoder_norm` — unit-norm decoder rows (gradient projection + renormalisation)
- :mod:`~saescope.train.optim` — Adam (β1 = 0 by default) with explicit, checkpointable state
- :mod:`~saescope.train.fast_path` — the sparse training step (same loss and gradients as the dense one)
- :mod:`~saescope.train.sources` — in-memory batch source with the activation-store protocol
- :mod:`~saescope.train.checkpoint` — checkpoints (safetensors + JSON) for exact resume
- :mod:`~saescope.train.trainer` — many SAEs per batch, metrics, progress, checkpoints, suite output
"""

from saescope.train.config import SAESpec, TrainConfig
from saescope.train.trainer import Trainer, TrainingInterrupted, train, train_from_store

__all__ = ["SAESpec", "TrainConfig", "Trainer", "TrainingInterrupted", "train", "train_from_store"]
