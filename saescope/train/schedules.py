"""Learning-rate and sparsity-coefficient schedules (Gemma Scope §3, as read in the recipe §2).

- Learning rate: cosine warm-up from ``start·lr`` to ``lr`` over the first ``warmup`` steps, then constant::

      lr(t) = lr · (start + (1 − start) · (1 − cos(π t / warmup)) / 2)     for t < warmup

- Sparsity coefficient: linear warm-up from 0 to λ over the first ``warmup`` steps, then constant::

      λ(t) = λ · min(1, t / warmup)

``t`` is the index of the optimizer step being taken (0 for the first step).
"""

from __future__ import annotations

import math


def learning_rate(step: int, lr: float, warmup_steps: int = 1000, start: float = 0.1) -> float:
    """The learning rate for step ``step`` (cosine warm-up from ``start·lr`` to ``lr``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return lr
    progress = step / warmup_steps
    return lr * (start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * progress)))


def sparsity_coefficient(step: int, final: float, warmup_steps: int = 10_000) -> float:
    """λ for step ``step`` (linear warm-up from 0 to ``final``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return final
    return final * (step / warmup_steps)
